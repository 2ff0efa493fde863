"""Tests for the file-based data recipes (llava, vision_flan, chat): small sources written here,
shards read back with the real webdataset reader and parsed as training parses them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from PIL import Image

from data_recipes.chat import ChatRecipe
from data_recipes.llava import LlavaRecipe
from data_recipes.vision_flan import VisionFlanRecipe
from mmpeft import registry
from mmpeft.data.build import INDEX, is_built
from mmpeft.data.sample import Sample, parse_sample
from mmpeft.errors import ConfigError

FRENCH = "Qu'est-ce que c'est ? 猫 🐈"


def write_image(path: Path, fmt: str, size: tuple[int, int] = (20, 14)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.radial_gradient("L").resize(size).convert("RGB").save(path, format=fmt)
    return path.read_bytes()


def write_corrupt_jpeg(path: Path) -> None:
    data = write_image(path, "JPEG", (64, 64))
    path.write_bytes(data[: len(data) // 2])  # truncated in the middle of the scan


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n",
        encoding="utf-8",
    )
    return path


def text(t: str) -> dict[str, str]:
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}


def build(recipe: Any, out: Path) -> tuple[dict[str, Any], dict[str, tuple[dict[str, Any], Sample]]]:
    """Build, then read every shard back: the index and ``{record id: (raw sample, parsed sample)}``."""
    returned = recipe.build(out, progress=False)
    index = json.loads((out / INDEX).read_text(encoding="utf-8"))
    assert index == returned
    urls = [str(out / s["name"]) for s in index["shards"]]
    samples = {}
    for raw in wds.WebDataset(urls, shardshuffle=False):
        assert "." not in raw["__key__"]
        samples[json.loads(raw["json"])["id"]] = (raw, parse_sample(raw))
    assert len(samples) == index["samples"]
    return index, samples


def bad_ids(index: dict[str, Any]) -> dict[str, str]:
    return {b["id"]: b["reason"] for b in index["bad_records"]["first"]}


# ----------------------------------------------------------------------------- llava


@pytest.fixture
def llava_src(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    files = {
        "cat.jpg": write_image(tmp_path / "coco" / "cat.jpg", "JPEG"),
        "dog.png": write_image(tmp_path / "coco" / "dog.png", "PNG", (9, 7)),
    }
    write_corrupt_jpeg(tmp_path / "coco" / "broken.jpg")
    records = [
        {
            "id": "multi",
            "image": "coco/cat.jpg",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": f"<image>\n{FRENCH}"},
                {"from": "gpt", "value": "Un chat gris."},
                {"from": "human", "value": "And its tail?"},
                {"from": "gpt", "value": "Long."},
            ],
        },
        {
            "id": "two",
            "image": ["coco/cat.jpg", "coco/dog.png"],
            "conversations": [
                {"from": "human", "value": "Compare <image> with\n<image>"},
                {"from": "gpt", "value": "Cat, dog."},
            ],
        },
        {
            "id": "no_token",
            "image": "coco/dog.png",
            "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A gradient."}],
        },
        {
            "id": "text_only",
            "task": "chitchat",
            "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi!"}],
        },
        {
            "id": "corrupt",
            "image": "coco/broken.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "?"}],
        },
        {
            "id": "missing",
            "image": "coco/gone.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "?"}],
        },
        {"id": "unanswered", "image": "coco/cat.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]},
        {
            "id": "mismatch",
            "image": "coco/cat.jpg",
            "conversations": [{"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "?"}],
        },
        {"id": "bad_from", "conversations": [{"from": "bot", "value": "Hi"}, {"from": "gpt", "value": "Hi"}]},
    ]
    return write_json(tmp_path / "llava_instruct_mini.json", records), files


def test_llava_build(tmp_path: Path, llava_src: tuple[Path, dict[str, bytes]]) -> None:
    src, files = llava_src
    index, samples = build(LlavaRecipe(src=str(src), samples_per_shard=4), tmp_path / "out")

    assert index["recipe"] == "llava" and [s["name"] for s in index["shards"]] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert index["samples"] == 4
    assert index["samples_per_task"] == {"chitchat": 1, "llava_instruct_mini": 3}  # the field, else the src file's stem
    assert index["bad_records"]["by_reason"] == {
        "bad_image": 1,
        "bad_record": 1,
        "image_count_mismatch": 1,
        "missing_image": 1,
        "no_assistant_turn": 1,
    }
    assert bad_ids(index) == {
        "corrupt": "bad_image",
        "missing": "missing_image",
        "unanswered": "no_assistant_turn",
        "mismatch": "image_count_mismatch",
        "bad_from": "bad_record",
    }
    assert str(tmp_path / "coco" / "gone.jpg") in next(
        b["detail"] for b in index["bad_records"]["first"] if b["id"] == "missing"
    )

    raw, sample = samples["multi"]
    assert raw["__key__"] == "000000000" and sample.task == "llava_instruct_mini"
    assert sample.messages == [
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": [IMAGE, text(FRENCH)]},
        {"role": "assistant", "content": [text("Un chat gris.")]},
        {"role": "user", "content": [text("And its tail?")]},
        {"role": "assistant", "content": [text("Long.")]},
    ]
    assert raw["img0.jpg"] == files["cat.jpg"] and [im.size for im in sample.images] == [(20, 14)]

    raw, sample = samples["two"]
    assert sample.messages[0] == {"role": "user", "content": [text("Compare "), IMAGE, text(" with"), IMAGE]}
    assert (raw["img0.jpg"], raw["img1.png"]) == (files["cat.jpg"], files["dog.png"])
    assert [im.size for im in sample.images] == [(20, 14), (9, 7)]

    raw, sample = samples["no_token"]  # LLaVA's convention: the image opens the first human turn
    assert sample.messages[0] == {"role": "user", "content": [IMAGE, text("Describe it.")]}
    assert raw["img0.png"] == files["dog.png"]

    raw, sample = samples["text_only"]
    assert sample.task == "chitchat" and sample.images == [] and not [k for k in raw if k.startswith("img")]


def test_rebuild_gives_identical_shards(tmp_path: Path, llava_src: tuple[Path, dict[str, bytes]]) -> None:
    src, _ = llava_src
    recipe = LlavaRecipe(src=str(src), samples_per_shard=4)
    first = recipe.build(tmp_path / "a", progress=False)
    shards = {s["name"]: (tmp_path / "a" / s["name"]).read_bytes() for s in first["shards"]}
    LlavaRecipe(src=str(src), samples_per_shard=4).build(tmp_path / "a", progress=False)  # same folder, again
    LlavaRecipe(src=str(src), samples_per_shard=4).build(tmp_path / "b", progress=False)  # another folder
    for out in ("a", "b"):
        assert {p.name: p.read_bytes() for p in (tmp_path / out).glob("*.tar")} == shards


# ----------------------------------------------------------------------------- vision_flan


def test_vision_flan_build(tmp_path: Path) -> None:
    photo = write_image(tmp_path / "pictures" / "p1.jpg", "JPEG")
    elsewhere = write_image(tmp_path / "abs" / "p2.png", "PNG")
    src = write_jsonl(
        tmp_path / "annotations" / "vision_flan.jsonl",
        [
            {"unique_id": "vf-1", "task_name": "VQA-E", "image": "p1.jpg", "instruction": FRENCH, "output": "Un chat."},
            {
                "id": "vf-2",
                "unique_id": "ignored",
                "task_name": "VQA-E",
                "image": str(tmp_path / "abs" / "p2.png"),
                "instruction": "Look: <image>\nWhat shape?",
                "output": "A circle.",
            },
            {
                "unique_id": "vf-3",
                "task_name": "VQA-E",
                "image": "p1.jpg",
                "instruction": "Caption it.",
                "output": "A cat.",
            },
            {"unique_id": "vf-4", "task_name": "ocr", "image": "p1.jpg", "instruction": "Read it."},
            '{"unique_id": "vf-5", "task_name": "ocr", ',
            {"unique_id": "vf-6", "image": "p1.jpg", "instruction": "Read it.", "output": "Nothing."},
            {"unique_id": "vf-7", "task_name": "", "image": "p1.jpg", "instruction": "Read it.", "output": "Nothing."},
            {
                "unique_id": "vf-8",
                "task_name": "ocr",
                "image": "p9.jpg",
                "instruction": "Read it.",
                "output": "Nothing.",
            },
        ],
    )
    task_map = write_json(tmp_path / "tasks.json", {"VQA-E": "vqa", "vf-3": "caption"})
    recipe = VisionFlanRecipe(src=str(src), images=str(tmp_path / "pictures"), task_map=str(task_map))
    index, samples = build(recipe, tmp_path / "out")

    assert index["samples"] == 3 and index["samples_per_task"] == {"caption": 1, "vqa": 2}
    assert index["bad_records"]["by_reason"] == {"bad_json": 1, "bad_record": 1, "bad_task": 2, "missing_image": 1}
    assert bad_ids(index) == {
        "vf-4": "bad_record",
        "line 5": "bad_json",
        "vf-6": "bad_task",
        "vf-7": "bad_task",
        "vf-8": "missing_image",
    }
    assert "line 5" in next(b["detail"] for b in index["bad_records"]["first"] if b["reason"] == "bad_json")

    raw, sample = samples["vf-1"]
    assert sample.task == "vqa"  # raw label mapped
    assert sample.messages == [
        {"role": "user", "content": [IMAGE, text(FRENCH)]},
        {"role": "assistant", "content": [text("Un chat.")]},
    ]
    assert raw["img0.jpg"] == photo
    raw, sample = samples["vf-2"]  # `id` before `unique_id`; an absolute path; <image> places the image
    assert (
        sample.messages[0]["content"] == [text("Look: "), IMAGE, text("What shape?")] and raw["img0.png"] == elsewhere
    )
    assert samples["vf-3"][1].task == "caption"  # the record id is looked up before the label


# ----------------------------------------------------------------------------- chat


def test_chat_build(tmp_path: Path) -> None:
    files = {
        name: write_image(tmp_path / "img" / name, "PNG" if name.endswith("png") else "JPEG")
        for name in ("a.jpg", "b.png", "c.jpg")
    }
    write_corrupt_jpeg(tmp_path / "img" / "bad.jpg")
    src = write_jsonl(
        tmp_path / "mixed_chat.jsonl",
        [
            {
                "id": "c1",
                "task": "vqa",
                "images": ["img/a.jpg", "img/b.png"],
                "messages": [
                    {"role": "system", "content": "Answer in French."},
                    {"role": "user", "content": [IMAGE, {"type": "image", "image": "img/c.jpg"}, IMAGE, text(FRENCH)]},
                    {"role": "assistant", "content": "Des chats. 🐈"},
                    {"role": "user", "content": [{"type": "text", "text": "Sûr ?"}]},
                    {"role": "assistant", "content": [text("Oui.")]},
                ],
            },
            {
                "messages": [
                    {"role": "user", "content": "<image>\nWhat is it?"},
                    {"role": "assistant", "content": "A cat."},
                ],
                "images": ["img/a.jpg"],
            },
            {
                "id": "c3",
                "messages": [
                    {"role": "user", "content": [{"type": "image", "path": "img/bad.jpg"}, text("?")]},
                    {"role": "assistant", "content": "?"},
                ],
            },
            "not json at all",
            {"id": "c5", "messages": [{"role": "user", "content": "Hello?"}]},
            {"id": "c6", "messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {
                "id": "c7",
                "images": ["img/a.jpg"],
                "messages": [{"role": "user", "content": "No image part."}, {"role": "assistant", "content": "ok"}],
            },
            {
                "id": "c8",
                "messages": [
                    {"role": "user", "content": [{"type": "image", "path": "img/zz.jpg"}]},
                    {"role": "assistant", "content": "?"},
                ],
            },
        ],
    )
    index, samples = build(ChatRecipe(src=str(src)), tmp_path / "out")

    assert index["samples"] == 2 and index["samples_per_task"] == {"mixed_chat": 1, "vqa": 1}
    assert index["bad_records"]["by_reason"] == {
        "bad_image": 1,
        "bad_json": 1,
        "bad_record": 1,
        "image_count_mismatch": 1,
        "missing_image": 1,
        "no_assistant_turn": 1,
    }
    assert bad_ids(index) == {
        "c3": "bad_image",
        "line 4": "bad_json",
        "c5": "no_assistant_turn",
        "c6": "bad_record",
        "c7": "image_count_mismatch",
        "c8": "missing_image",
    }

    raw, sample = samples["c1"]
    assert sample.task == "vqa"
    assert sample.messages == [
        {"role": "system", "content": [text("Answer in French.")]},
        {"role": "user", "content": [IMAGE, IMAGE, IMAGE, text(FRENCH)]},
        {"role": "assistant", "content": [text("Des chats. 🐈")]},
        {"role": "user", "content": [text("Sûr ?")]},
        {"role": "assistant", "content": [text("Oui.")]},
    ]
    # Parts with their own path take it; the others take the record's `images` in order.
    assert (raw["img0.jpg"], raw["img1.jpg"], raw["img2.png"]) == (files["a.jpg"], files["c.jpg"], files["b.png"])
    assert len(sample.images) == 3
    assert FRENCH in raw["json"].decode("utf-8")  # written as UTF-8, not \u escapes

    raw, sample = samples["line 2"]  # no id: where it is
    assert sample.task == "mixed_chat" and sample.messages[0]["content"] == [IMAGE, text("What is it?")]
    assert raw["img0.jpg"] == files["a.jpg"]


# ----------------------------------------------------------------------------- task labels and errors


def text_chats(tmp_path: Path) -> Path:
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    return write_json(
        tmp_path / "labels_src.json",
        [
            {"id": "r0", "task": "vqa", "messages": chat},
            {"id": "r1", "task": "ocr", "messages": chat},
            {"id": "r2", "messages": chat},
            {"id": "r3", "kind": "ocr", "messages": chat},
            {"id": "r4", "task": 7, "messages": chat},
        ],
    )


@pytest.mark.parametrize(
    ("args", "tasks", "bad"),
    [
        ({}, {"r0": "vqa", "r1": "ocr", "r2": "labels_src", "r3": "labels_src"}, {"r4": "bad_task"}),
        (
            {"task_field": "kind"},
            {"r0": "labels_src", "r1": "labels_src", "r2": "labels_src", "r3": "ocr", "r4": "labels_src"},
            {},
        ),
        (
            {"task_map": {"r1": "reading", "ocr": "text", "labels_src": "general", "r4": "fixed"}},
            {"r0": "vqa", "r1": "reading", "r2": "general", "r3": "general", "r4": "fixed"},
            {},
        ),
        ({"task": "all", "task_map": {"r1": "reading"}}, {f"r{i}": "all" for i in range(5)}, {}),
    ],
)
def test_task_labels(tmp_path: Path, args: dict[str, Any], tasks: dict[str, str], bad: dict[str, str]) -> None:
    if "task_map" in args:
        args = dict(args, task_map=str(write_json(tmp_path / "map.json", args["task_map"])))
    index, samples = build(ChatRecipe(src=str(text_chats(tmp_path)), **args), tmp_path / "out")
    assert {rid: sample.task for rid, (_, sample) in samples.items()} == tasks
    assert bad_ids(index) == bad


def test_source_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(ConfigError, match=re.escape(f"src {missing}: no such file")):
        LlavaRecipe(src=str(missing)).build(tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError, match=re.escape(f"task_map {tmp_path / 'maps.json'}: no such file")):
        len(ChatRecipe(src=str(text_chats(tmp_path)), task_map=str(tmp_path / "maps.json")))

    broken = tmp_path / "broken.json"
    broken.write_text(
        '[\n  {"id": "a", "conversations": []},\n  {"id": "b" "conversations": []}\n]\n', encoding="utf-8"
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / INDEX).write_text("{}")  # an earlier build's index survives a failed start
    with pytest.raises(ConfigError, match=re.escape(f"src {broken}, line 3, column 14: malformed JSON")):
        LlavaRecipe(src=str(broken)).build(out, progress=False)
    assert (out / INDEX).read_text() == "{}"

    pretty = tmp_path / "one.json"
    pretty.write_text(json.dumps({"data": []}, indent=2))
    with pytest.raises(ConfigError, match="one JSON object"):
        len(ChatRecipe(src=str(pretty)))


def test_built_shards_need_no_source(tmp_path: Path) -> None:
    """`data.prepare` constructs the recipe on every run to check the build: that works once the source is gone."""
    src = text_chats(tmp_path)
    ChatRecipe(src=str(src)).build(tmp_path / "out", progress=False)
    src.unlink()
    assert is_built(tmp_path / "out", ChatRecipe(src=str(src)))
    assert not is_built(tmp_path / "out", ChatRecipe(src=str(src), task="other"))


def test_recipes_are_registered() -> None:
    for name, cls in (("llava", LlavaRecipe), ("vision_flan", VisionFlanRecipe), ("chat", ChatRecipe)):
        assert registry.load(registry.DATA_RECIPES, name) is cls and cls.name == name
