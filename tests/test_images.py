"""Image tokens per image and the ``data.image_resolution`` knob: one row per supported family.

For each family's tiny checkpoint (the real processor classes and settings):

- ``tokens HxW``: :func:`mmpeft.models.images.image_tokens` equals what the real processor produces for a real
  PIL image of that size: the ids equal to the model config's image token id in ``input_ids`` (Mllama: the tiles
  its ``aspect_ratio_mask`` marks, times the vision tokens per tile of the config).
- ``knob``: the knob at a small resolution gives fewer image tokens, counted in the real processor's output, than
  at a large one, and the count matches ``image_tokens`` at both; where the family's input size is fixed by the
  model the knob is a ConfigError naming the processor class (LLaVA, Gemma 3, PaliGemma: the tokens are the same
  at every image size; LLaVA-NeXT, LLaVA-OneVision, Mllama: they vary with the image, not with a setting).

The table of results is printed at the end of the run (tests/conftest.py).
"""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_families import SUPPORTED
from transformers import AutoConfig

from mmpeft.data.datamodule import ShardDataModule
from mmpeft.errors import ConfigError
from mmpeft.models.backbone import load_processor
from mmpeft.models.images import FIXED_SIZE, image_tokens, processor_kwargs_for_resolution, resolution_kwargs

SIZES = [(30, 40), (300, 500)]  # (height, width): smaller than every tiny family's input, and larger
KNOB = (32, 64)  # small and large data.image_resolution; the tiny processors read up to 64 px (Qwen: 64**2 pixels)
CHECKS = tuple(f"tokens {h}x{w}" for h, w in SIZES) + ("knob",)
RESULTS: dict[str, dict[str, str]] = {}
"""family -> check -> outcome, printed as a table by conftest's terminal summary."""
# The families whose image tokens do not depend on the image's size at all.
CONSTANT = {"llava", "gemma3", "paligemma"}


def record(family: str, check: str, outcome: str) -> None:
    RESULTS.setdefault(family, {})[check] = outcome


def produced(processor, config, size: tuple[int, int]) -> int:
    """The image tokens the real processor produces for one ``size`` image (see the module docstring)."""
    height, width = size
    image = Image.new("RGB", (width, height), (255, 255, 255))
    image.paste((200, 30, 30), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    placeholder = getattr(processor, "boi_token", None) or processor.image_token  # Gemma 3 expands <start_of_image>
    out = processor(text=[placeholder + "What is it?"], images=[[image]], return_tensors="pt")
    if type(processor).__name__ == "MllamaProcessor":
        vision = config.vision_config
        assert int((out["input_ids"] == processor.image_token_id).sum()) == 1
        return int(out["aspect_ratio_mask"].sum()) * ((vision.image_size // vision.patch_size) ** 2 + 1)
    token_id = getattr(config, "image_token_id", None)
    token_id = token_id if token_id is not None else config.image_token_index
    return int((out["input_ids"] == token_id).sum())


@pytest.mark.parametrize("family", SUPPORTED)
def test_image_tokens_and_knob(family, tiny_model_dirs):
    base = tiny_model_dirs[family]
    processor, config = load_processor(base), AutoConfig.from_pretrained(base)
    counts = []
    for (height, width), check in zip(SIZES, CHECKS):
        real = produced(processor, config, (height, width))
        assert real > 0
        assert image_tokens(processor, height, width, config) == real, (family, height, width)
        counts.append(real)
        record(family, check, f"{real} ok")

    name = type(processor).__name__
    if name in FIXED_SIZE:
        with pytest.raises(ConfigError, match=rf"data\.image_resolution has no effect on {name}: "):
            processor_kwargs_for_resolution(processor, KNOB[0])
        if family in CONSTANT:
            assert counts[0] == counts[1]
            record(family, "knob", f"refused: fixed {counts[0]}")
        else:
            record(family, "knob", "refused: " + ("tiles fixed" if family == "mllama" else "anyres grid"))
        return
    tokens = []
    for resolution in KNOB:
        kwargs = resolution_kwargs(processor, resolution, None)
        assert kwargs and kwargs == processor_kwargs_for_resolution(processor, resolution)
        read = load_processor(base, **kwargs)
        real = produced(read, config, SIZES[-1])
        assert image_tokens(read, *SIZES[-1], config) == real
        tokens.append(real)
    assert tokens[0] < tokens[1], tokens
    assert tokens[1] <= counts[1]  # the large resolution reads no more than the tiny checkpoint's own setting
    record(family, "knob", f"{tokens[1]} -> {tokens[0]}")


def test_knob_values(tiny_model_dirs):
    """The settings each family gets, a conflict with an explicit key, and values that are not a resolution."""
    qwen = load_processor(tiny_model_dirs["qwen2_vl"])
    assert qwen.image_processor.size["shortest_edge"] == 64**2  # the tiny one reads every image at 64**2 pixels
    assert processor_kwargs_for_resolution(qwen, 32) == {"size": {"longest_edge": 1024, "shortest_edge": 1024}}
    assert processor_kwargs_for_resolution(qwen, 100) == {"size": {"longest_edge": 10000, "shortest_edge": 4096}}
    idefics = load_processor(tiny_model_dirs["idefics3"])  # tiles of 16 px
    assert processor_kwargs_for_resolution(idefics, 40) == {"size": {"longest_edge": 32}}
    assert processor_kwargs_for_resolution(idefics, 8) == {"size": {"longest_edge": 16}}  # at least one tile
    internvl = load_processor(tiny_model_dirs["internvl"])  # tiles of 32 px
    assert processor_kwargs_for_resolution(internvl, 100) == {"max_patches": 9}
    assert processor_kwargs_for_resolution(load_processor(tiny_model_dirs["mistral3"]), 48) == {
        "size": {"longest_edge": 48}
    }

    # An explicit key that agrees stays; one that differs names both settings (Qwen's old names included).
    size = {"longest_edge": 10000, "shortest_edge": 4096}
    assert resolution_kwargs(qwen, 100, {"max_pixels": 10000, "x": 1}) == {"max_pixels": 10000, "x": 1, "size": size}
    assert resolution_kwargs(idefics, 40, {"size": {"longest_edge": 32, "x": 1}}) == {
        "size": {"longest_edge": 32, "x": 1}
    }
    with pytest.raises(
        ConfigError,
        match=r"data\.image_resolution=100 sets size\.longest_edge=10000 for Qwen2VLProcessor, but "
        r"data\.processor_kwargs\.max_pixels=401408: set one of them",
    ):
        resolution_kwargs(qwen, 100, {"max_pixels": 401408})
    with pytest.raises(ConfigError, match=r"data\.processor_kwargs\.size\.longest_edge=64"):
        resolution_kwargs(idefics, 40, {"size": {"longest_edge": 64}})
    assert resolution_kwargs(qwen, None, {"max_pixels": 401408}) == {"max_pixels": 401408}
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ConfigError, match="data.image_resolution must be a positive number of pixels"):
            processor_kwargs_for_resolution(qwen, bad)
    with pytest.raises(ValueError, match="Mllama's image tokens need the model config"):
        image_tokens(load_processor(tiny_model_dirs["mllama"]), 30, 40)


def test_datamodule_applies_knob(tiny_model_dirs, tmp_path):
    """``data.image_resolution`` reaches the processor the data module encodes with, and is refused where fixed."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Say yes."}]}) + "\n")

    def encoder_processor(family: str, **kwargs):
        data = ShardDataModule(predict=str(prompts), processor=tiny_model_dirs[family], tasks=["a"], **kwargs)
        data.setup("predict")
        return data.encoder.processor

    base = tiny_model_dirs["qwen2_vl"]
    config = AutoConfig.from_pretrained(base)
    default = encoder_processor("qwen2_vl")
    lowered = encoder_processor("qwen2_vl", image_resolution=32, processor_kwargs={"do_resize": True})
    assert lowered.image_processor.size == {"longest_edge": 1024, "shortest_edge": 1024}
    assert (
        produced(lowered, config, SIZES[-1]) == image_tokens(lowered, *SIZES[-1]) < produced(default, config, SIZES[-1])
    )
    with pytest.raises(ConfigError, match="processor_kwargs.max_pixels=2048"):
        encoder_processor("qwen2_vl", image_resolution=32, processor_kwargs={"max_pixels": 2048})
    with pytest.raises(ConfigError, match="no effect on LlavaProcessor"):
        encoder_processor("llava", image_resolution=32)
    assert encoder_processor("llava").image_processor.crop_size["height"] == 32  # unset: the processor's own size
