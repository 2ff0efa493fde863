"""Tests for the synthetic data recipe: shards are read back with the real webdataset reader."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from PIL import Image

from data_recipes import synthetic
from data_recipes.synthetic import BACKGROUNDS, COLORS, SHAPES, SyntheticRecipe, is_built

SAMPLES, PER_SHARD, SHARDS = 200, 50, 4


def read_shards(out_dir: Path, shards: int, prefix: str = "train") -> list[dict[str, Any]]:
    """All samples of a build, through ``webdataset.WebDataset`` with a brace pattern."""
    pattern = f"{out_dir}/{prefix}-{{000000..{shards - 1:06d}}}.tar"
    return list(wds.WebDataset(pattern, shardshuffle=False))


def decoded(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample as comparable Python values: parsed json and raw pixels per image."""
    images = {k: Image.open(io.BytesIO(v)).tobytes() for k, v in sample.items() if k.startswith("img")}
    return {"key": sample["__key__"], "json": json.loads(sample["json"]), **images}


def assistant_answers(messages: list[dict[str, Any]]) -> list[str]:
    return [
        "".join(p["text"] for p in m["content"] if p["type"] == "text") for m in messages if m["role"] == "assistant"
    ]


def image_parts(messages: list[dict[str, Any]]) -> int:
    return sum(p["type"] == "image" for m in messages for p in m["content"])


def components(image: Image.Image) -> list[list[tuple[int, int]]]:
    """Connected regions (8-connectivity) of non-background pixels."""
    px, (w, h) = image.load(), image.size
    background = px[0, 0]  # shapes keep a 1 px margin, so the corner is always background
    seen: set[tuple[int, int]] = set()
    regions = []
    for start in ((x, y) for y in range(h) for x in range(w)):
        if start in seen or px[start] == background:
            continue
        stack, region = [start], []
        seen.add(start)
        while stack:
            x, y = stack.pop()
            region.append((x, y))
            for nx in range(max(0, x - 1), min(w, x + 2)):
                for ny in range(max(0, y - 1), min(h, y + 2)):
                    if (nx, ny) not in seen and px[nx, ny] != background:
                        seen.add((nx, ny))
                        stack.append((nx, ny))
        regions.append(region)
    return regions


def fill_ratio(region: list[tuple[int, int]]) -> float:
    xs, ys = [p[0] for p in region], [p[1] for p in region]
    return len(region) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))


def shape_of(region: list[tuple[int, int]]) -> str:
    """Square fills its bounding box, a circle ~pi/4 of it, a triangle ~1/2."""
    ratio = fill_ratio(region)
    return "square" if ratio > 0.95 else "circle" if ratio > 0.68 else "triangle" if ratio > 0.4 else "?"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("synthetic")
    manifest = SyntheticRecipe(samples=SAMPLES, samples_per_shard=PER_SHARD, seed=0).build(out, progress=False)
    return out, manifest, read_shards(out, SHARDS)


def test_shard_files_and_manifest(built: tuple[Path, dict[str, Any], list[dict[str, Any]]]) -> None:
    out, manifest, _ = built
    names = [f"train-{i:06d}.tar" for i in range(SHARDS)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["dataset.json"])  # no *.tmp left
    assert json.loads((out / "dataset.json").read_text()) == manifest
    assert manifest["format"] == "mmpeft-shards/1" and manifest["recipe"] == "synthetic"
    assert manifest["args"] == {
        "samples": SAMPLES,
        "samples_per_shard": PER_SHARD,
        "tasks": ["color", "shape", "count", "caption"],
        "image_size": 32,
        "seed": 0,
        "prefix": "train",
    }
    assert manifest["tasks"] == ["caption", "color", "count", "shape"]
    assert [s["name"] for s in manifest["shards"]] == names
    for shard in manifest["shards"]:
        assert shard["samples"] == PER_SHARD
        assert shard["bytes"] == (out / shard["name"]).stat().st_size


def test_samples_follow_the_contract(built: tuple[Path, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, samples = built
    assert len(samples) == SAMPLES
    for sample in samples:
        key = sample["__key__"]
        assert "." not in key
        record = json.loads(sample["json"].decode("utf-8"))
        assert record["task"] in {"color", "shape", "count", "caption"}
        assert record["id"] == key and key.startswith(record["task"] + "-")
        messages = record["messages"]
        assert all(m["role"] in {"user", "assistant", "system"} for m in messages)
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
        assert all(a for a in assistant_answers(messages))
        image_keys = sorted(k for k in sample if k.startswith("img"))
        assert image_keys == [f"img{k}.png" for k in range(image_parts(messages))] and image_keys
        for k in image_keys:
            image = Image.open(io.BytesIO(sample[k]))
            assert image.format == "PNG" and image.size == (32, 32)


def test_manifest_counts_match_what_was_read(built: tuple[Path, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, manifest, samples = built
    per_shard: dict[str, Counter[str]] = {}
    for sample in samples:
        per_shard.setdefault(Path(sample["__url__"]).name, Counter())[json.loads(sample["json"])["task"]] += 1
    assert manifest["samples"] == len(samples)
    for shard in manifest["shards"]:
        assert shard["tasks"] == dict(per_shard[shard["name"]])
        # Interleaved, not grouped: every shard is a mixture of all tasks.
        assert all(n > 0 for n in shard["tasks"].values())
    total = sum(per_shard.values(), Counter())
    assert manifest["samples_per_task"] == dict(total)
    assert total == {t: SAMPLES // 4 for t in ("color", "shape", "count", "caption")}


def test_multi_turn_samples_exist(built: tuple[Path, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, samples = built
    multi = [r for r in (json.loads(s["json"]) for s in samples) if len(assistant_answers(r["messages"])) > 1]
    assert multi
    for record in multi:
        first, second = assistant_answers(record["messages"])
        if record["task"] == "color":
            assert first in COLORS and second in SHAPES
        else:
            assert record["task"] == "shape" and first in SHAPES and second in COLORS


def test_answers_match_the_pixels(built: tuple[Path, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, samples = built
    for sample in samples:
        record = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["img0.png"])).convert("RGB")
        answers = assistant_answers(record["messages"])
        regions = components(image)
        colours = {image.getpixel(p) for r in regions for p in r}
        task = record["task"]
        if task in ("color", "shape"):
            # Turn one answers the task's question; a follow-up turn answers the other one.
            asked = ("color", "shape") if task == "color" else ("shape", "color")
            answer = dict(zip(asked, answers))
            assert len(regions) == 1
            if "color" in answer:
                assert colours == {COLORS[answer["color"]]}
            if "shape" in answer:
                assert shape_of(regions[0]) == answer["shape"]
        elif task == "count":
            assert len(regions) == int(answers[0])
            assert len({shape_of(r) for r in regions}) == 1
        else:
            match = re.fullmatch(r"(\d) (\w+) (circle|square|triangle)s? on a (white|black) background\.", answers[0])
            assert match, answers[0]
            n, colour, shape, background = match.groups()
            assert len(regions) == int(n) and colours == {COLORS[colour]}
            assert {shape_of(r) for r in regions} == {shape}
            assert image.getpixel((0, 0)) == BACKGROUNDS[background]


def test_caption_answers_are_longer_than_color_answers(
    built: tuple[Path, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, _, samples = built
    lengths: dict[str, list[int]] = {"caption": [], "color": []}
    for record in (json.loads(s["json"]) for s in samples):
        if record["task"] in lengths:
            lengths[record["task"]].append(len(assistant_answers(record["messages"])[0]))
    assert min(lengths["caption"]) > max(lengths["color"])


def test_prompts_are_paraphrased(built: tuple[Path, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, samples = built
    prompts: dict[str, set[str]] = {}
    for record in (json.loads(s["json"]) for s in samples):
        text = next(p["text"] for p in record["messages"][0]["content"] if p["type"] == "text")
        prompts.setdefault(record["task"], set()).add(text)
    for task, seen in prompts.items():
        assert 1 < len(seen) <= len(synthetic.PROMPTS[task])
        assert seen <= set(synthetic.PROMPTS[task])


def test_builds_are_deterministic(tmp_path: Path, built: tuple[Path, dict[str, Any], list[dict[str, Any]]]) -> None:
    first_dir, first_manifest, first_samples = built
    recipe = SyntheticRecipe(samples=SAMPLES, samples_per_shard=PER_SHARD, seed=0)
    # The progress bar must not influence the output.
    again = recipe.build(tmp_path / "again", progress=True)
    assert again == first_manifest
    assert [decoded(s) for s in read_shards(tmp_path / "again", SHARDS)] == [decoded(s) for s in first_samples]
    for shard in first_manifest["shards"]:
        assert (tmp_path / "again" / shard["name"]).read_bytes() == (first_dir / shard["name"]).read_bytes()
        # Byte equality alone would also pass for two builds within the same second if the
        # writer stamped the wall clock; pin the header time explicitly.
        with tarfile.open(first_dir / shard["name"]) as tar:
            assert {m.mtime for m in tar.getmembers()} == {0}

    SyntheticRecipe(samples=SAMPLES, samples_per_shard=PER_SHARD, seed=1).build(tmp_path / "other", progress=False)
    other = [decoded(s) for s in read_shards(tmp_path / "other", SHARDS)]
    assert len(other) == SAMPLES
    assert other != [decoded(s) for s in first_samples]


def test_unknown_task_raises_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"'ocr'") as info:
        SyntheticRecipe(tasks=("color", "ocr"))
    for valid in ("color", "shape", "count", "caption"):
        assert valid in str(info.value)


def test_compare_task_has_two_images(tmp_path: Path) -> None:
    SyntheticRecipe(samples=40, samples_per_shard=40, tasks=("compare",), image_size=24).build(tmp_path, progress=False)
    samples = read_shards(tmp_path, 1)
    answers = Counter()
    for sample in samples:
        messages = json.loads(sample["json"])["messages"]
        assert image_parts(messages) == 2 and {"img0.png", "img1.png"} <= sample.keys()
        images = [Image.open(io.BytesIO(sample[k])).convert("RGB") for k in ("img0.png", "img1.png")]
        assert all(im.size == (24, 24) for im in images)
        (answer,) = assistant_answers(messages)
        same = shape_of(components(images[0])[0]) == shape_of(components(images[1])[0])
        assert answer == ("yes" if same else "no")
        answers[answer] += 1
    assert answers["yes"] > 0 and answers["no"] > 0


def test_is_built(tmp_path: Path) -> None:
    recipe = SyntheticRecipe(samples=20, samples_per_shard=10, seed=3)
    assert not is_built(tmp_path, recipe)
    recipe.build(tmp_path, progress=False)
    assert is_built(tmp_path, recipe)
    assert is_built(tmp_path, SyntheticRecipe(samples=20, samples_per_shard=10, seed=3))
    assert not is_built(tmp_path, SyntheticRecipe(samples=20, samples_per_shard=10, seed=4))
    assert not is_built(tmp_path, SyntheticRecipe(samples=20, samples_per_shard=10, seed=3, tasks=("color",)))

    (tmp_path / "train-000001.tar").unlink()
    assert not is_built(tmp_path, recipe)
    recipe.build(tmp_path, progress=False)
    (tmp_path / "dataset.json").write_text("{not json")
    assert not is_built(tmp_path, recipe)


def test_failed_build_leaves_no_valid_build_or_tmp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = SyntheticRecipe(samples=40, samples_per_shard=10, tasks=("color", "shape"))
    recipe.build(tmp_path, progress=False)
    calls = 0

    def failing_shape(rng: Any, size: int) -> Any:
        nonlocal calls
        calls += 1
        if calls == 8:
            raise RuntimeError("boom")
        return original(rng, size)

    original = synthetic.TASKS["shape"]
    monkeypatch.setitem(synthetic.TASKS, "shape", failing_shape)
    with pytest.raises(RuntimeError, match="boom"):
        recipe.build(tmp_path, progress=False)
    # A rebuild in progress invalidates the old manifest, so a crash cannot look like a cache hit.
    assert not is_built(tmp_path, recipe)
    assert not list(tmp_path.glob("*.tmp"))


def test_rebuild_removes_stale_shards(tmp_path: Path) -> None:
    SyntheticRecipe(samples=40, samples_per_shard=10).build(tmp_path, progress=False)
    (tmp_path / "train-000009.tar.tmp").write_bytes(b"left over from a crash")
    (tmp_path / "notes.txt").write_text("not ours")
    # Another build's data set is replaced only when asked (tests/test_issue14_data.py: refused otherwise).
    manifest = SyntheticRecipe(samples=40, samples_per_shard=20).build(tmp_path, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dataset.json",
        "notes.txt",
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert len(read_shards(tmp_path, 2)) == manifest["samples"] == 40
