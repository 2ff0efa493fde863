"""``python -m mmpeft estimate`` on every shipped config and every supported family.

Every ``configs/*.yaml`` (a new config is covered without editing this file) is planned through the estimate's
own path (``fit``'s parser, the data module's worst-case batch, :func:`mmpeft.planner.plan`) on its checkpoint's
published shape: ``benchmarks/published.py`` writes a stand-in folder with the published ``config.json`` and
processor settings (no weights, no network). ``configs/demo.yaml`` runs on its own tiny model.

Every supported family's tiny model is planned at two lengths; the rows (image tokens, static part, step peak,
the step's largest line) are printed as a table at the end of the run (conftest.py). How close each family's plan
is to a measured peak is not checked here (``benchmarks/memory_model.py`` compares them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_families import SUPPORTED
from transformers import AutoConfig

from mmpeft.adapters import AdapterGroup
from mmpeft.data.filled import FilledBatches
from mmpeft.errors import ConfigError
from mmpeft.memory import NESTED_BLOCK, NF4_BLOCK
from mmpeft.models.backbone import Backbone, load_processor
from mmpeft.models.images import image_tokens
from mmpeft.planner import COMMON_SIZES, plan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))
MIB = 2**20

CHECKS = ("max_length", "image tokens", "static MiB", "step peak MiB", "top step line", "LM line x2 tokens")
PEAK_MOVES = {"paligemma"}
"""Families whose step peak moves from the loss into backward between max_length and twice it (see below)."""
RESULTS: dict[str, dict[str, str]] = {}
"""family -> column -> value, printed as the table by conftest's terminal summary."""

# Bytes per value of an NF4 weight with double quantization: 4 bits, a uint8 absmax per block of 64 values and a
# float32 absmax per 256 of those (the code tables are a few hundred bytes per layer).
NF4_DQ = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NESTED_BLOCK)

# Values in the linear layers the 4-bit loading quantizes (every nn.Linear but the LM head), from the published
# config.json sizes (L layers, d hidden, f MLP width, kv the key/value width):
#
# LLaVA-1.5-7B: language model 32 x (4 x 4096^2 [q, k, v, o; kv = d] + 3 x 4096 x 11008 [gate, up, down])
#   = 6,476,005,376; CLIP ViT-L/14 24 x (4 x 1024^2 + 2 x 1024 x 4096) = 301,989,888; projector 1024 x 4096 +
#   4096 x 4096 = 20,971,520. In all 6,798,966,784 values: x 0.5159 bytes = 3.51e9 bytes (3.27 GiB).
# Qwen2.5-VL-7B: language model 28 x (2 x 3584^2 [q, o] + 2 x 3584 x 512 [k, v: 4 heads of 128]
#   + 3 x 3584 x 18944) = 6,525,288,448; ViT 32 x (1280 x 3840 [qkv] + 1280^2 [proj] + 3 x 1280 x 3420 [SwiGLU])
#   = 629,964,800; merger 5120^2 + 5120 x 3584 = 44,564,480. In all 7,199,817,728 values: 3.71e9 bytes (3.46 GiB).
LINEAR_VALUES = {
    "llava-hf/llava-1.5-7b-hf": 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    + 24 * (4 * 1024**2 + 2 * 1024 * 4096)
    + (1024 * 4096 + 4096 * 4096),
    "Qwen/Qwen2.5-VL-7B-Instruct": 28 * (2 * 3584**2 + 2 * 3584 * 512 + 3 * 3584 * 18944)
    + 32 * (1280 * 3840 + 1280**2 + 3 * 1280 * 3420)
    + (5120**2 + 5120 * 3584),
}


@pytest.fixture(scope="module")
def published(monkeypatch_module):
    monkeypatch_module.syspath_prepend(str(ROOT / "benchmarks"))
    import published

    return published


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def standins(tmp_path_factory, published):
    """The stand-in folder of a hub repository, written the first time it is asked for."""
    root = tmp_path_factory.mktemp("standins")
    made: dict[str, str] = {}

    def get(repo: str) -> str:
        if repo not in made:
            made[repo] = str(published.standin(repo, root / published.standin_name(repo)))
        return made[repo]

    return get


def test_standins_have_the_published_shapes(published, standins):
    """Each stand-in builds the published checkpoint's parameter count (the hub pages' sizes, counted here on the
    meta device) and gives the published image tokens."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    # the hub pages' sizes in billions
    billions = {
        "llava-hf/llava-1.5-7b-hf": 7.06,
        "Qwen/Qwen2-VL-2B-Instruct": 2.21,
        "Qwen/Qwen2-VL-7B-Instruct": 8.29,
        "Qwen/Qwen2.5-VL-7B-Instruct": 8.29,
        "google/gemma-3-4b-it": 4.3,
    }
    assert set(billions) == set(published.PUBLISHED)
    for repo, shape in published.PUBLISHED.items():
        path = standins(repo)
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights():
            model = AutoModelForImageTextToText.from_config(config)
        model.tie_weights()  # as from_pretrained: tied embeddings are one tensor
        count = sum(p.numel() for p in model.parameters())
        assert count == shape.parameters and round(count / 1e9, 2) == billions[repo], (repo, count)
        assert not list(Path(path).glob("*.safetensors")), "a stand-in holds no weights"
        processor = load_processor(path)
        if shape.family == "llava":
            assert image_tokens(processor, 336, 336) == 576  # (336 / 14)^2, CLS dropped
            assert image_tokens(processor, 1000, 700) == 576  # resized and cropped to 336 x 336
        elif shape.family == "gemma3":
            assert image_tokens(processor, 336, 336) == image_tokens(processor, 1000, 700) == 256
        else:  # Qwen-VL: (H / 28) x (W / 28) for sides that are multiples of 28, within the pixel limits
            for height, width in ((336, 336), (448, 896), (28 * 40, 28 * 30)):
                assert image_tokens(processor, height, width) == (height // 28) * (width // 28)
            assert image_tokens(processor, 28, 28) == 4  # min_pixels: 4 tokens at least
        # The tiny tokenizer's special ids are inside the published vocabulary.
        assert max(processor.tokenizer.get_vocab().values()) < config.get_text_config().vocab_size


def test_standin_static_memory_of_llava_7b(standins):
    """gpu_check's LLaVA-1.5-7B build holds 3.27 GiB of NF4 weights; the plan of the stand-in counts the same."""
    from mmpeft.memory import static_memory

    parts = {p.name: p.bytes for p in static_memory(Backbone(standins("llava-hf/llava-1.5-7b-hf")), [AdapterGroup()])}
    assert round(parts["quantized weights"] / 2**30, 2) == 3.27
    assert parts["quantized weights"] == pytest.approx(LINEAR_VALUES["llava-hf/llava-1.5-7b-hf"] * NF4_DQ, rel=1e-3)


def config_args(name: str, standins, tiny_model_dirs) -> list[str]:
    """``estimate``'s arguments for ``configs/NAME`` with its checkpoint replaced by the stand-in (or the demo's
    tiny model)."""
    values = yaml.safe_load((ROOT / "configs" / name).read_text())
    backbone = values["model"]["backbone"]
    if backbone.get("build_tiny"):
        path = tiny_model_dirs[backbone["build_tiny"]]
    else:
        path = standins(backbone["pretrained"])  # KeyError: add the checkpoint's shape to benchmarks/published.py
    return ["--config", str(ROOT / "configs" / name), "--model.backbone.pretrained", path]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_estimate_every_shipped_config(name, standins, tiny_model_dirs):
    from mmpeft.estimate import estimate, parse_config

    args = config_args(name, standins, tiny_model_dirs)
    report = estimate([*args, "--gpu", "12GiB", "--no-search"])
    values = yaml.safe_load((ROOT / "configs" / name).read_text())

    static = sum(p["bytes"] for p in report.parts if not p["name"].startswith("step:"))
    assert report.peak > static > 0
    assert report.needed > report.peak  # the CUDA allowance
    assert report.device == "cuda"

    # The planned batch: the config's batch_size samples of max_length tokens, each with one image.
    batch_size, max_length = values["data"]["batch_size"], values["data"]["max_length"]
    assert (report.batch["samples"], report.batch["tokens_per_sample"]) == (batch_size, max_length)
    assert report.batch["images_per_sample"] == 1

    # Its image tokens are the processor's count for an image of the planned side (the config's processor settings).
    module, data, _ = parse_config(args)
    batches = data.batches(images=1)
    batch = batches(batches.batch_size, batches.max_length, batches.image_side)
    config = AutoConfig.from_pretrained(module.backbone.pretrained)
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    per_sample = (batch["inputs"]["input_ids"] == image_id).sum(dim=1)  # (batch,)
    processor = load_processor(module.backbone.pretrained, **(values["data"].get("processor_kwargs") or {}))
    side = batches.image_side or 1024  # families of one fixed size give the same tokens at any side
    expected = image_tokens(processor, side, side, config)
    assert per_sample.tolist() == [expected] * batch_size
    assert report.batch["image_tokens_per_sample"] == expected

    # The card table: the six common sizes, and a card that fits is followed by larger ones that fit.
    assert list(report.cards) == [str(s) for s in COMMON_SIZES]
    fits = list(report.cards.values())
    assert fits == sorted(fits)

    # The 7B checkpoints' NF4 weights: what their linear layers' values take (LINEAR_VALUES' derivation).
    repo = values["model"]["backbone"]["pretrained"]
    if repo in LINEAR_VALUES:
        quantized = next(p["bytes"] for p in report.parts if p["name"] == "quantized weights")
        assert quantized == pytest.approx(LINEAR_VALUES[repo] * NF4_DQ, rel=0.10)


@pytest.mark.slow
def test_estimate_searches_the_largest_settings(standins):
    """For a card the run does not fit, the suggested settings fit it and one more does not (LLaVA-1.5-7B QLoRA on
    12 GiB: the batch size is searched)."""
    from mmpeft.estimate import estimate

    args = ["--config", str(ROOT / "configs/llava-1.5-7b-qlora.yaml")]
    args += ["--model.backbone.pretrained", standins("llava-hf/llava-1.5-7b-hf")]
    report = estimate([*args, "--gpu", "12GiB"])
    assert report.cards["12"] is False and report.cards["24"] is True
    best = report.suggestions["data.batch_size"]
    assert best is not None and 1 <= best < 4
    fitting = estimate([*args, "--gpu", "12GiB", "--no-search", "--data.batch_size", str(best)])
    assert fitting.needed <= 12 * 2**30
    beyond = estimate([*args, "--gpu", "12GiB", "--no-search", "--data.batch_size", str(best + 1)])
    assert beyond.needed > 12 * 2**30


def family_plan(path: str, max_length: int):
    """The plan of LoRA on every linear layer of the family's tiny model, 2 samples of ``max_length`` tokens with one
    image each; ConfigError when the image does not fit ``max_length``."""
    batches = FilledBatches(path, batch_size=2, max_length=max_length)
    batch = batches(2, max_length, batches.image_side)
    return batch, plan(Backbone(path), [AdapterGroup()], batch, device_type="cuda")


@pytest.mark.parametrize("family", SUPPORTED)
def test_estimate_every_family(family, tiny_model_dirs):
    path = tiny_model_dirs[family]
    # 256 tokens, or the shortest power of two that holds the sample (Idefics3 splits a 1024-pixel image into
    # many tokens; Mistral 3's template writes a long default system prompt before it).
    max_length = 256
    while True:
        try:
            batch, short = family_plan(path, max_length)
            break
        except ConfigError:
            assert max_length < 4096, f"{family}: the planned image does not fit 4096 tokens"
            max_length *= 2
    row = RESULTS.setdefault(family, {})
    row["max_length"] = str(max_length)
    assert batch["labels"].shape == (2, max_length)

    static = sum(p.bytes for p in short.parts if not p.name.startswith("step:"))
    assert short.peak > static > 0
    assert short.step is not None and short.step.bytes > 0
    side = FilledBatches(path, batch_size=2, max_length=max_length).image_side or 1024
    row["image tokens"] = str(image_tokens(load_processor(path), side, side, AutoConfig.from_pretrained(path)))
    row["static MiB"] = f"{static / MIB:.2f}"
    row["step peak MiB"] = f"{short.step.bytes / MIB:.2f}"
    scope, size = max(short.step.by_scope.items(), key=lambda item: item[1])
    row["top step line"] = f"{scope} {size / MIB:.2f}"

    # Twice the tokens: the step's peak grows, and so does the language model's line of it, except where the peak
    # moves to another moment of the step: the lines are what is live at the peak, so PaliGemma's language-model
    # line shrinks from 256 to 512 tokens (210 to 160 KiB) when its peak moves from the loss into backward, where
    # the checkpointed layers' inputs are being freed.
    _, long = family_plan(path, 2 * max_length)
    grows = long.step.by_scope["language model"] / short.step.by_scope["language model"]
    row["LM line x2 tokens"] = f"x{grows:.2f}"
    assert long.step.bytes > short.step.bytes and long.peak > short.peak
    assert short.step.by_scope["language model"] > 0
    if family not in PEAK_MOVES:
        assert grows > 1
