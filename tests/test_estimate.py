"""``python -m mmpeft estimate`` and ``fit --dry-run`` (mmpeft/estimate.py), and the plan's response to each setting.

The plan's accuracy against measured peaks is benchmarks/memory_model.py's (its quick run is in
tests/test_benchmarks.py); the shipped configs and every family are in tests/test_estimate_configs.py.
"""

from __future__ import annotations

import json

import pytest
from test_cli import demo_config, run_cli

from mmpeft.adapters import AdapterGroup
from mmpeft.data.filled import FilledBatches
from mmpeft.models.backbone import Backbone
from mmpeft.planner import COMMON_SIZES, card, largest, plan
from mmpeft.speed import Speed


@pytest.fixture()
def config(tmp_path, tiny_model_dirs):
    return demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)


def test_estimate_prints_the_plan_the_cards_and_the_largest_settings(tmp_path, config, capsys):
    out_json = tmp_path / "plan.json"
    code, out, err = run_cli(capsys, "estimate", "--config", str(config), "--gpu", "rtx4070", "--json", str(out_json))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"memory plan of {config} on CUDA: 8 samples x 256 tokens, 1 image(s) each")
    for name in ("quantized weights", "optimizer state", "step: backward", "peak (allocated)", "CUDA allowance"):
        assert any(line.startswith(name) for line in lines), name
    assert "RTX 4070 (12 GB)" in out and ": fits" in out
    report = json.loads(out_json.read_text())
    assert report["device"] == "cuda"
    assert report["peak"] == sum(part["bytes"] for part in report["parts"])
    assert report["needed"] == report["peak"] + report["allowance"] > report["peak"]
    assert list(report["cards"]) == [str(size) for size in COMMON_SIZES] and all(report["cards"].values())
    assert report["batch"]["samples"] == 8 and report["batch"]["tokens_per_sample"] == 256
    assert report["batch"]["image_tokens_per_sample"] == 16  # the tiny LLaVA: 32 px / 8 px patches = 4 x 4
    # A tiny model fits 12 GB at 4x every setting: the search stops at its bound.
    assert report["suggestions"] == {"data.batch_size": 32, "data.max_length": 1024}
    # --json never overwrites a file unless told to.
    code, _, err = run_cli(capsys, "estimate", "--config", str(config), "--json", str(out_json), "--no-search")
    assert code == 2 and f"--json: {out_json} exists" in err
    code, _, err = run_cli(capsys, "estimate", "--config", str(config), "--json", str(out_json), "--overwrite")
    assert code == 0, err


def test_fit_dry_run_prints_the_same_plan_and_trains_nothing(tmp_path, config, capsys):
    code, dry, err = run_cli(capsys, "fit", "--config", str(config), "--dry-run", "--data.batch_size", "2")
    assert code == 0, err
    code, plain, err = run_cli(capsys, "estimate", "--config", str(config), "--data.batch_size", "2")
    assert code == 0, err
    assert dry == plain and "on a CPU: 2 samples x 256 tokens" in dry  # the demo trains on the CPU
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "potato"], "--gpu: 'potato' is neither a size (12GiB, 16GB) nor a card mmpeft knows"),
        (["--images", "-1"], "--images must be positive, got -1"),
        (["--image-size", "big"], "--image-size: 'big' is not a whole number"),
        (["--gpu"], "--gpu needs a value"),
        (["--data.max_length", "8"], "does not fit data.max_length=8"),
        (["--data.nope", "1"], "--data.nope"),
    ],
)
def test_estimate_errors_name_the_bad_option(config, capsys, args, message):
    code, _, err = run_cli(capsys, "estimate", "--config", str(config), *args)
    assert code == 2
    assert message in err


def test_cards_by_name_and_by_size():
    assert card("rtx4070") == ("RTX 4070 (12 GB)", 12 * 2**30)
    assert card("RTX 4090") == ("RTX 4090 (24 GB)", 24 * 2**30)
    assert card("12GiB")[1] == 12 * 2**30 and card("16GB")[1] == 16 * 10**9 and card("8")[1] == 8 * 2**30


@pytest.mark.parametrize("shape", ["linear", "quadratic", "steps"])
def test_largest_finds_the_boundary_in_few_plans(shape):
    costs = {
        "linear": lambda v: 1000 + 37 * v,
        "quadratic": lambda v: 1000 + 5 * v + v * v // 50,
        "steps": lambda v: 1000 + 5000 * (v // 300),
    }
    calls = []

    def cost(value: int) -> int:
        calls.append(value)
        return costs[shape](value)

    budget = 30_000
    found = largest(cost, budget, 64, 4096, 64)
    assert found is not None and cost(found) <= budget and cost(found + 64) > budget
    calls.pop(), calls.pop()
    assert len(calls) <= (5 if shape == "linear" else 12)
    assert largest(lambda v: None, budget, 1, 8) is None  # nothing trains
    assert largest(lambda v: 10**9, budget, 1, 8) is None
    assert largest(lambda v: 1, budget, 1, 8) == 8
    assert largest(lambda v: None if v > 5 else v, budget, 1, 8) == 5  # images no longer fit past 5


@pytest.fixture()
def llava(tiny_model_dirs):
    path = tiny_model_dirs["llava"]
    return Backbone(pretrained=path), FilledBatches(path, batch_size=2, max_length=256)


def step_lines(backbone, batches, batch_size=2, max_length=256, **kwargs):
    result = plan(backbone, [AdapterGroup()], batches(batch_size, max_length, None), device_type="cpu", **kwargs)
    return {part.name: part.bytes for part in result.parts}, result


def step_total(lines: dict[str, int]) -> int:
    return sum(size for name, size in lines.items() if name.startswith("step: "))


def test_the_plan_answers_each_setting(llava):
    """What the step adds grows with the batch and the length, checkpointing cuts it, accumulation keeps the
    gradients."""
    import dataclasses

    backbone, batches = llava
    base, base_plan = step_lines(backbone, batches)
    double, _ = step_lines(backbone, batches, batch_size=4)
    longer, _ = step_lines(backbone, batches, max_length=512)
    steps = {name: step_total(lines) for name, lines in (("base", base), ("double", double), ("longer", longer))}
    # Nearly everything the step holds is per token; the gradients of the adapters are not.
    assert 1.8 < steps["double"] / steps["base"] <= 2.0
    assert 1.8 < steps["longer"] / steps["base"] <= 2.05  # (the causal mask is length x length)
    no_checkpointing, _ = step_lines(dataclasses.replace(backbone, gradient_checkpointing=False), batches)
    every_other, _ = step_lines(backbone, batches, speed=Speed(checkpoint_every=2))
    assert steps["base"] < step_total(every_other) < step_total(no_checkpointing)
    accumulating, acc_plan = step_lines(backbone, batches, accumulating=True)
    assert "gradients" in accumulating and "gradients" not in base
    assert accumulating["gradients"] == accumulating["trainable tensors"]
    assert acc_plan.peak > base_plan.peak


def test_image_side_changes_the_plan_where_the_family_reads_larger_images(tiny_model_dirs):
    """Qwen2-VL reads a larger image with more tokens (in the same max_length: the image's tokens take text's
    place), and the vision tower runs over more patches, so the plan never shrinks with the side; LLaVA resizes every
    image, so it has no side to search."""
    path = tiny_model_dirs["qwen2_vl"]
    batches = FilledBatches(path, batch_size=1, max_length=512, image_resolution=112)
    assert batches.image_side == 112
    small, large = batches(1, 512, 56), batches(1, 512, 112)
    assert batches.image_tokens_in(large) > 2 * batches.image_tokens_in(small) > 0  # (sides round to whole merges)
    backbone = Backbone(pretrained=path)
    costs = [plan(backbone, [AdapterGroup()], b, device_type="cpu").peak for b in (small, large)]
    assert costs[0] <= costs[1]
    two = FilledBatches(path, batch_size=1, max_length=512, images=2, image_resolution=112)
    assert two.image_tokens_in(two(1, 512, 112)) == 2 * batches.image_tokens_in(large)
    llava = FilledBatches(tiny_model_dirs["llava"], batch_size=1, max_length=256, image_resolution=None)
    assert llava.fixed_size and llava.image_side is None
