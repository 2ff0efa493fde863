"""``python -m mmpeft``: the demo config trains for real in a subprocess; bad input gives clear errors."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import lightning  # noqa: F401  imported at collection: its log handlers bind to the real stderr, not to one test's capture
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def mmpeft(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "mmpeft", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def demo_config(tmp_path: Path, model_dir: str, family: str, steps: int) -> Path:
    """configs/demo.yaml, unchanged except for where it writes, the family and a shorter run."""
    config = yaml.safe_load(DEMO.read_text())
    config["trainer"].update(max_steps=steps, val_check_interval=steps // 2, default_root_dir=str(tmp_path))
    config["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path / "runs"))
    config["trainer"]["callbacks"][0]["init_args"].update(
        every_n_train_steps=steps // 2, dirpath=str(tmp_path / "checkpoints")
    )
    config["model"]["backbone"].update(pretrained=model_dir, build_tiny=family)
    data = config["data"]
    for split, run, samples in (("train", data["prepare"][0], 320), ("val", data["prepare"][1], 40)):
        data[split] = run["out"] = str(tmp_path / "shards" / split)
        run["args"].update(samples=samples, samples_per_shard=samples // 4)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def scalars(run_dir: Path, tag: str) -> list[float]:
    (events,) = glob.glob(str(run_dir / "events.out.tfevents.*"))
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_demo_config_trains_in_a_subprocess(tmp_path, tiny_model_dirs, family):
    result = mmpeft("fit", "--config", str(demo_config(tmp_path, tiny_model_dirs[family], family, steps=40)))
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "demo").iterdir()

    losses = scalars(run_dir, "train/loss")
    assert len(losses) == 8  # every 5 steps
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 1.0, losses
    assert len(scalars(run_dir, "val/loss")) == 2
    lr = scalars(run_dir, "train/lr")
    assert max(lr) == pytest.approx(3e-3, rel=0.05) and lr[-1] < lr[len(lr) // 2]

    # The checkpoint holds the LoRA tensors and their optimizer state, not the frozen base.
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    assert state and all(".adapter." in key for key in state)
    assert len(state) == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 decoder layers
    adapter_bytes = sum(t.numel() * t.element_size() for t in state.values())
    (adam,) = ckpt["optimizer_states"]
    assert len(adam["state"]) == len(state) and ckpt["global_step"] == 40
    base_bytes = sum(
        t.numel() * t.element_size() for t in load_file(Path(tiny_model_dirs[family]) / "model.safetensors").values()
    )
    assert ckpt_path.stat().st_size < 3 * adapter_bytes + 64_000  # weights + two Adam moments + metadata
    assert "lm_head" not in str(list(state)) and ckpt_path.stat().st_size < base_bytes
    # The task vocabulary travels with it, so a resumed run keeps the task ids.
    tasks = json.loads((tmp_path / "shards" / "train" / "dataset.json").read_text())["tasks"]
    assert ckpt["ShardDataModule"]["tasks"] == tasks
    # So does the data stream's position: one worker (the demo's), 40 batches trained.
    (position,) = ckpt["ShardDataModule"]["stream"]
    assert position["epoch"] == 0 and position["workers"] == 1 and position["batches"] == {0: 40}

    # Beside it, and at the end of the run, the adapter as a directory with the same tensors.
    from mmpeft.saving import read_spec, read_tensors

    for adapter_dir in (tmp_path / "checkpoints" / "last-adapter", run_dir / "adapter"):
        tensors = read_tensors(adapter_dir)
        assert sorted(tensors) == sorted(k.removeprefix("model.") for k in state)
        assert all(torch.equal(tensors[k.removeprefix("model.")], v) for k, v in state.items())
        spec = read_spec(adapter_dir)
        assert (
            spec.tasks == tasks
            and spec.groups[0].name == "lora"
            and spec.groups[0].config == {"r": 16, "alpha": 32, "dropout": 0.0}
        )
        assert spec.base_model == tiny_model_dirs[family] and spec.base["architecture"].lower().startswith(
            family.replace("_", "")
        )
        assert (spec.quantization, spec.double_quant) == (
            "nf4",
            True,
        )  # how the base was loaded, for merge and load_adapted


def test_adapters_lists_lora_with_its_distribution():
    result = mmpeft("adapters")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["name", "distribution", "class"]
    assert ["lora", "mmpeft", version("mmpeft"), "mmpeft.adapters.lora:LoRA"] in rows


def test_tiny_model_tool_builds_a_loadable_checkpoint(tmp_path):
    result = mmpeft("tiny-model", "--family", "qwen2_vl", "--out", str(tmp_path / "tq"))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "tq"
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in (tmp_path / "tq").iterdir()
    }


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m mmpeft ARGS`` in this process (the same ``main``; faster than a subprocess): exit code, stdout,
    stderr."""
    from mmpeft.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argument errors exit from inside LightningCLI's parser
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_main(capsys, *args: str) -> tuple[int, str]:
    """:func:`run_cli`'s exit code and stderr."""
    code, _, err = run_cli(capsys, *args)
    return code, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.adapters", '[{"name": "nope"}]'],
            "unknown adapter 'nope'; registered adapters: asymlora, lora, mixlora, moelora",
        ),
        (
            ["--model.adapters", '[{"name": "lora", "config": {"rank": 8}}]'],
            "adapters[0] (lora).config: unknown key(s) 'rank'",
        ),
        (
            ["--model.backbone.pretrained", "/no/such/model", "--model.backbone.build_tiny", "null"],
            "model.backbone.pretrained: no checkpoint at '/no/such/model'",
        ),
        (
            ["--data.prepare", "[]", "--data.train", "/no/such/shards/train-*.tar"],
            "data.train: shard pattern '/no/such/shards/train-*.tar' matches no file",
        ),
        (["--model.backbone.quantisation", "nf4"], "quantisation"),
        (["--trainer.max_stepz", "3"], "max_stepz"),
    ],
    ids=["unknown-adapter", "unknown-adapter-key", "missing-model", "no-shards", "unknown-key", "unknown-trainer-key"],
)
def test_bad_input_fails_with_a_message_naming_it(tmp_path, tiny_model_dirs, capsys, args, message):
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)
    code, stderr = run_main(capsys, "fit", "--config", str(config), *args)
    assert code == 2, stderr[-2000:]
    assert message in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "shards").exists()  # failed before any work


def test_unknown_key_in_a_config_file_is_named(tmp_path, tiny_model_dirs, capsys):
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)
    broken = yaml.safe_load(config.read_text())
    broken["data"]["batchsize"] = 4
    config.write_text(yaml.safe_dump(broken))
    code, stderr = run_main(capsys, "fit", "--config", str(config))
    assert code == 2 and "batchsize" in stderr and "Traceback" not in stderr
