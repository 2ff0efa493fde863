"""Chat rendering, label masks, truncation and skipped samples, for both families' processors."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from mmpeft.data.encode import ChatEncoder
from mmpeft.data.sample import Sample
from mmpeft.models.backbone import load_processor
from mmpeft.objective import IGNORE_INDEX

FAMILIES = ["llava", "qwen2_vl"]
# What each assistant turn is trained on: its text and the template's end-of-turn.
ANSWER = {"llava": " {}</s>", "qwen2_vl": "{}<|im_end|>"}


@pytest.fixture(scope="module")
def processors(tiny_model_dirs):
    return {family: load_processor(tiny_model_dirs[family]) for family in FAMILIES}


def user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def image(colour=(10, 200, 30), size=(40, 36)) -> Image.Image:
    return Image.new("RGB", size, colour)


def target_runs(labels: torch.Tensor) -> list[torch.Tensor]:
    """The contiguous stretches of trained tokens."""
    mask = (labels != IGNORE_INDEX).tolist() + [False]
    runs, start = [], None
    for i, on in enumerate(mask):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append(labels[start:i])
            start = None
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_labels_cover_exactly_the_assistant_turns(processors, family):
    processor = processors[family]
    encoder = ChatEncoder(processor, ["chat"], max_length=512)
    messages = [
        user("What colour is the circle?", images=1),
        assistant("green"),
        user("And the square in this one?", images=1),
        assistant("It is blue."),
        user("Thanks. Anything else?"),
        assistant("no"),
    ]
    item = encoder.encode(Sample("k", "chat", messages, [image(), image((0, 0, 255), (64, 20))]))
    ids, labels = item["tokens"]["input_ids"], item["labels"]
    assert labels.shape == ids.shape
    runs = target_runs(labels)
    decode = processor.tokenizer.decode
    assert [decode(run) for run in runs] == [ANSWER[family].format(t) for t in ("green", "It is blue.", "no")]
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], ids[trained])
    # Image placeholders were expanded by the processor and are never trained. LLaVA gives every
    # image its 16 patch tokens; Qwen2-VL one token per 2x2 block of 8x8-pixel patches after resizing.
    is_image = ids == encoder.image_token_id
    if family == "llava":
        assert is_image.sum() == 2 * 16
    else:
        assert item["images"]["image_grid_thw"].tolist() == [[1, 8, 10], [1, 6, 16]]
        assert is_image.sum() == (8 * 10 + 6 * 16) // 4
    assert not trained[is_image].any()
    # Every prompt word is masked.
    prompt_text = decode(ids[~trained])
    for text in ("What colour is the circle?", "And the square in this one?", "Thanks. Anything else?"):
        assert text in prompt_text


@pytest.mark.parametrize("family", FAMILIES)
def test_collate_pads_on_the_right_and_masks_padding(processors, family):
    encoder = ChatEncoder(processors[family], ["a", "b"], max_length=512)
    short = encoder.encode(Sample("s", "a", [user("Hi?", 1), assistant("yes")], [image()]))
    long = encoder.encode(
        Sample(
            "l",
            "b",
            [user("Describe the picture in many words please.", 1), assistant("A green square on a white background.")],
            [image()],
        )
    )
    batch = encoder.collate([short, long])
    n_short, n_long = short["labels"].numel(), long["labels"].numel()
    assert n_long > n_short
    inputs, labels = batch["inputs"], batch["labels"]
    assert inputs["input_ids"].shape == labels.shape == (2, n_long)
    assert torch.equal(inputs["attention_mask"][0], torch.arange(n_long) < n_short)
    assert (labels[0, n_short:] == IGNORE_INDEX).all()
    assert (inputs["input_ids"][0, n_short:] == encoder.pad_token_id).all()
    assert batch["task_ids"].tolist() == [0, 1] and batch["keys"] == ["s", "l"]
    # Image inputs of the two samples are concatenated along their first axis.
    assert inputs["pixel_values"].shape[0] == sum(item["images"]["pixel_values"].shape[0] for item in (short, long))


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_keeps_image_tokens_whole(processors, family):
    processor = processors[family]
    messages = [
        user("What colour?", 1),
        assistant("green"),
        user("Tell me a long story about it."),
        assistant("Once upon a time there was a green square " * 4),
    ]
    full = ChatEncoder(processor, ["t"], max_length=4096).encode(Sample("k", "t", messages, [image()]))
    n = full["labels"].numel()
    image_end = (
        int((full["tokens"]["input_ids"] == ChatEncoder(processor, ["t"], 1).image_token_id).nonzero().max()) + 1
    )

    # A cut in the last answer keeps the sample at exactly max_length with the first answer intact.
    cut = n - 10
    short = ChatEncoder(processor, ["t"], max_length=cut).encode(Sample("k", "t", messages, [image()]))
    assert short["labels"].numel() == cut
    assert torch.equal(short["tokens"]["input_ids"], full["tokens"]["input_ids"][:cut])
    assert torch.equal(short["labels"], full["labels"][:cut])
    assert short["tokens"]["attention_mask"].numel() == cut

    # A cut through the image tokens drops (and counts) the sample instead.
    encoder = ChatEncoder(processor, ["t"], max_length=image_end - 3)
    raw = raw_sample("k", "t", messages, [image()])
    assert encoder(raw) is None
    assert encoder.skipped == {"cuts_image_tokens": 1}

    # A cut after the images but before any answer leaves nothing to train on.
    encoder = ChatEncoder(processor, ["t"], max_length=image_end + 2)
    assert encoder(raw) is None
    assert encoder.skipped == {"no_target_tokens": 1}


def raw_sample(key: str, task: str, messages: list, images: list[Image.Image], fmt: str = "png") -> dict:
    raw = {"__key__": key, "__url__": "test.tar", "json": json.dumps({"task": task, "messages": messages}).encode()}
    for k, im in enumerate(images):
        buf = io.BytesIO()
        im.save(buf, format=fmt.upper().replace("JPG", "JPEG"))
        raw[f"img{k}.{fmt}"] = buf.getvalue()
    return raw


def test_bad_samples_are_skipped_and_counted_by_reason(processors, caplog):
    encoder = ChatEncoder(processors["llava"], ["color"], max_length=256)
    good = raw_sample("ok", "color", [user("What colour?", 1), assistant("green")], [image()])
    two_images = raw_sample("x", "color", [user("What colour?", 1), assistant("green")], [image(), image()])
    corrupt = dict(good, **{"__key__": "corrupt", "img0.png": b"\x89PNG not really"})
    bad = [
        dict(good, **{"__key__": "notjson", "json": b"{oops"}),
        dict(good, **{"__key__": "nomessages", "json": json.dumps({"task": "color"}).encode()}),
        raw_sample("noimage", "color", [user("What colour?", 1), assistant("green")], []),
        dict(two_images, **{"__key__": "extra"}),
        corrupt,
        raw_sample("noanswer", "color", [user("What colour?", 1)], [image()]),
        raw_sample("othertask", "shape", [user("What colour?", 1), assistant("green")], [image()]),
    ]
    with caplog.at_level("WARNING", logger="mmpeft.data"):
        results = [encoder(raw) for raw in [good, *bad, good]]
    assert [r is not None for r in results] == [True] + [False] * len(bad) + [True]
    assert encoder.skipped == {
        "bad_json": 2,
        "image_count_mismatch": 2,
        "bad_image": 1,
        "no_assistant_turn": 1,
        "unknown_task": 1,
    }
    # Each skip is reported with the sample's key and shard.
    assert "notjson" in caplog.text and "test.tar" in caplog.text and "corrupt" in caplog.text
    # The counts travel with the next batch and are reset.
    batch = encoder.collate([results[0], results[-1]])
    assert sum(batch["skipped"].values()) == len(bad)
    assert not encoder.skipped


def test_jpeg_and_lone_image_file_forms(processors):
    encoder = ChatEncoder(processors["qwen2_vl"], ["color"], max_length=256)
    raw = raw_sample("j", "color", [user("What colour?", 1), assistant("green")], [image()], fmt="jpg")
    raw["jpg"] = raw.pop("img0.jpg")
    item = encoder(raw)
    assert item is not None and item["images"]["image_grid_thw"].tolist() == [[1, 8, 10]]
