"""Adapter directories, atomic checkpoints and exact resume (a run killed with SIGKILL, then resumed)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_backbone import _batch
from test_cli import ROOT, demo_config, mmpeft

from mmpeft.adapters import AdaptedLinear, AdapterGroup, inject_adapters
from mmpeft.checkpoint import AtomicCheckpointIO, adapter_dir_for
from mmpeft.errors import ConfigError
from mmpeft.models.backbone import Backbone, language_model, load_backbone
from mmpeft.saving import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    AdapterSpec,
    apply_adapter,
    base_summary,
    read_spec,
    save_adapter,
    trainable_tensors,
)

CPU = torch.device("cpu")
GROUPS = [
    AdapterGroup("lora", ["attention"], {"r": 4}),
    AdapterGroup("asymlora", ["mlp"], {"r": 4, "heads": 3, "routing": "sequence"}),
]


def adapted(model_dir: str, groups=GROUPS, seed: int = 0):
    """The 4-bit tiny model with ``groups`` injected and every adapter tensor random (so the adapter changes
    outputs)."""
    model = load_backbone(Backbone(pretrained=model_dir), CPU)
    inject_adapters(language_model(model), groups)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapter." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def spec_of(model, model_dir: str, groups=GROUPS) -> AdapterSpec:
    return AdapterSpec(groups, model_dir, base_summary(model.config), ["color", "shape"]).resolved()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch["inputs"]).logits


@pytest.fixture(scope="module")
def saved(tiny_model_dirs, tmp_path_factory):
    """An adapter directory of two groups on the tiny LLaVA, and the logits of the model that wrote it."""
    model_dir = tiny_model_dirs["llava"]
    model = adapted(model_dir)
    out = save_adapter(tmp_path_factory.mktemp("adapter") / "a", spec_of(model, model_dir), trainable_tensors(model))
    return out, logits(model, _batch(model_dir))


def test_an_adapter_directory_round_trips_onto_a_fresh_base(tiny_model_dirs, saved):
    out, expected = saved
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["format"] == "mmpeft-adapter" and config["tasks"] == ["color", "shape"]
    # Every hyperparameter is spelled out, defaults included, so a later default change cannot alter it.
    assert config["adapters"][1]["config"] == {
        "r": 4,
        "alpha": 16.0,
        "dropout": 0.05,
        "heads": 3,
        "routing": "instance",  # given as "sequence", its earlier name: written in the one spelling
        "top_k": None,
        "temperature": 1.0,
        "router": "projection",
        "router_bias": False,
    }
    assert config["base_model"]["text.hidden_size"] == 64 and len(config["base_model"]["fingerprint"]) == 16
    tensors = load_file(out / WEIGHTS_NAME)
    assert len(tensors) == 2 * (4 * 2 + 3 * 3)  # 2 layers x (4 attention LoRAs x A, B + 3 MLP AsymLoRAs x A, B, router)

    fresh = load_backbone(Backbone(pretrained=tiny_model_dirs["llava"]), CPU).eval()
    before = logits(fresh, _batch(tiny_model_dirs["llava"]))
    spec = apply_adapter(fresh, out)
    assert spec.tasks == ["color", "shape"] and [g.name for g in spec.groups] == ["lora", "asymlora"]
    after = logits(fresh, _batch(tiny_model_dirs["llava"]))
    assert torch.equal(after, expected)
    assert (after - before).abs().max() > 1e-3  # the adapter is really there
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference
    trainable = load_backbone(Backbone(pretrained=tiny_model_dirs["llava"]), CPU)
    apply_adapter(trainable, out, trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {f"{k}" for k in tensors}


def test_a_different_base_model_is_refused_with_what_differs(tiny_model_dirs, saved, tmp_path):
    out, _ = saved
    qwen = load_backbone(Backbone(pretrained=tiny_model_dirs["qwen2_vl"]), CPU)
    with pytest.raises(
        AdapterError,
        match=r"architecture: adapter 'LlavaForConditionalGeneration', model 'Qwen2VLForConditionalGeneration'",
    ):
        apply_adapter(qwen, out)
    wider = tmp_path / "wider"
    wider.mkdir()
    config = json.loads((out / CONFIG_NAME).read_text())
    config["base_model"]["text.hidden_size"] = 128
    (wider / CONFIG_NAME).write_text(json.dumps(config))
    (wider / WEIGHTS_NAME).write_bytes((out / WEIGHTS_NAME).read_bytes())
    llava = load_backbone(Backbone(pretrained=tiny_model_dirs["llava"]), CPU)
    with pytest.raises(AdapterError, match=r"text\.hidden_size: adapter 128, model 64"):
        apply_adapter(llava, wider)
    assert not any(isinstance(m, AdaptedLinear) for m in llava.modules())


def copy_adapter(out: Path, to: Path) -> Path:
    to.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (to / name).write_bytes((out / name).read_bytes())
    return to


def test_damaged_or_foreign_adapter_directories_are_clear_errors(tiny_model_dirs, saved, tmp_path):
    out, _ = saved
    model = load_backbone(Backbone(pretrained=tiny_model_dirs["llava"]), CPU)

    truncated = copy_adapter(out, tmp_path / "truncated")
    data = (truncated / WEIGHTS_NAME).read_bytes()
    (truncated / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_NAME} cannot be read \(truncated"):
        apply_adapter(model, truncated)

    missing = copy_adapter(out, tmp_path / "missing")
    (missing / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=rf"missing/{WEIGHTS_NAME} is missing"):
        apply_adapter(model, missing)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())  # nothing was injected

    with pytest.raises(AdapterError, match=r"is not an adapter directory"):
        read_spec(tmp_path)
    with pytest.raises(AdapterError, match=r"does not exist"):
        read_spec(tmp_path / "nowhere")

    plugin = copy_adapter(out, tmp_path / "plugin")
    config = json.loads((plugin / CONFIG_NAME).read_text())
    config["adapters"][1]["name"] = "hydra-lora"
    (plugin / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"unknown adapter 'hydra-lora'; registered adapters: .*asymlora"):
        apply_adapter(model, plugin)


def test_a_failed_save_leaves_the_previous_directory_whole(saved, tmp_path):
    out, _ = saved
    target = copy_adapter(out, tmp_path / "a")
    spec = read_spec(target)
    with pytest.raises(ValueError):
        save_adapter(target, spec, {"x": "not a tensor"})  # safetensors refuses it half-way through the save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left behind
    assert (target / WEIGHTS_NAME).read_bytes() == (out / WEIGHTS_NAME).read_bytes()
    assert read_spec(target) == spec


# -- checkpoints --------------------------------------------------------------------------------

SAVER = textwrap.dedent(
    """
    import sys, torch
    from mmpeft.checkpoint import AtomicCheckpointIO
    io, path, version = AtomicCheckpointIO(), sys.argv[1], 0
    while True:  # ~24 MB per save, each version filled with its number
        version += 1
        io.save_checkpoint({"version": version, "state_dict": {"w": torch.full((6_000_000,), float(version))}}, path)
        print(version, flush=True)
    """
)


def test_a_kill_during_a_checkpoint_save_never_leaves_a_corrupt_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for delay in (0.05, 0.31, 0.77):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, cwd=ROOT, env=env, text=True
        )
        deadline = time.time() + 60
        while not path.exists() and proc.poll() is None and time.time() < deadline:  # one complete save first
            time.sleep(0.01)
        assert path.exists(), proc.communicate()[0]
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["version"] >= 1 and torch.equal(
            ckpt["state_dict"]["w"], torch.full((6_000_000,), float(ckpt["version"]))
        )

    # An error in the middle of a save (here: something that cannot be pickled) keeps the old file too.
    before = path.read_bytes()
    with pytest.raises((AttributeError, pickle.PicklingError)):
        AtomicCheckpointIO().save_checkpoint({"version": -1, "bad": lambda: None}, path)
    assert path.read_bytes() == before
    assert not adapter_dir_for(path).exists()


# -- resume -------------------------------------------------------------------------------------


def run_config(tmp_path: Path, tiny_model_dirs, name: str, *, every: int, steps: int) -> Path:
    """The demo config with AsymLoRA (dropout on, so the random state matters), 2 workers and a JSON-lines record of
    every step."""
    root = tmp_path / name
    root.mkdir()
    path = demo_config(root, tiny_model_dirs["llava"], "llava", steps=steps)
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(log_every_n_steps=1, val_check_interval=10)
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    config["trainer"]["callbacks"].append(
        {"class_path": "probes.RecordLosses", "init_args": {"out": str(root / "steps.jsonl")}}
    )
    # Both runs read the same shards (built once by the first run).
    for split, run in zip(("train", "val"), config["data"]["prepare"]):
        config["data"][split] = run["out"] = str(tmp_path / "shards" / split)
    config["data"]["num_workers"] = 2
    config["model"]["adapters"] = [
        {"name": "asymlora", "targets": ["all-linear"], "config": {"r": 8, "heads": 3, "dropout": 0.1}}
    ]
    path.write_text(yaml.safe_dump(config))
    return path


def steps_of(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_exactly(tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # probes.RecordLosses / KillAt in the subprocesses
    steps, every, kill = 20, 7, 10  # checkpoints after steps 7 and 14; killed at step 10
    whole = run_config(tmp_path, tiny_model_dirs, "whole", every=every, steps=steps)
    result = mmpeft("fit", "--config", str(whole))
    assert result.returncode == 0, result.stderr[-3000:]

    broken = run_config(tmp_path, tiny_model_dirs, "broken", every=every, steps=steps)
    killed = mmpeft(
        "fit", "--config", str(broken), "--trainer.callbacks+=probes.KillAt", f"--trainer.callbacks.step={kill}"
    )
    assert killed.returncode == -signal.SIGKILL
    assert [s["step"] for s in steps_of(tmp_path / "broken")] == list(range(1, kill + 1))
    resumed = mmpeft("fit", "--config", str(broken), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    reference = {s["step"]: s for s in steps_of(tmp_path / "whole")}
    after = steps_of(tmp_path / "broken")[kill:]
    # At most one checkpoint interval is lost: the resumed run starts right after the step-7 checkpoint.
    assert [s["step"] for s in after] == list(range(every + 1, steps + 1))
    for s in after:  # the same batches (2 workers, taking turns) and, with dropout, the same losses
        assert s["keys"] == reference[s["step"]]["keys"], s["step"]
        assert s["loss"] == pytest.approx(reference[s["step"]]["loss"], abs=1e-6), s["step"]
    for name in ("whole", "broken"):
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 14  # the last multiple of 7; the end of the run is in the adapter directory
    # The adapters written at the end of the two runs (the resumed one logs into the killed run's folder).
    ends = [sorted((tmp_path / name / "runs" / "demo").glob("version_*/adapter"))[-1] for name in ("whole", "broken")]
    assert [p.name for p in (tmp_path / "broken" / "runs" / "demo").iterdir()] == ["version_0"]
    a, b = (load_file(end / WEIGHTS_NAME) for end in ends)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # The run's adapter directory evaluates exactly as its checkpoint does.
    from lightning import Trainer

    from mmpeft.data.datamodule import ShardDataModule
    from mmpeft.module import MMPeftModule

    config = yaml.safe_load(broken.read_text())

    def validate(**kwargs) -> float:
        module = MMPeftModule(Backbone(pretrained=tiny_model_dirs["llava"]), **kwargs.pop("module", {}))
        data = ShardDataModule(
            val=config["data"]["val"], processor=tiny_model_dirs["llava"], batch_size=8, max_length=256
        )
        trainer = Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=3
        )
        (metrics,) = trainer.validate(module, data, **kwargs)
        return metrics["val/loss"]

    from_dir = validate(module={"init_adapter": str(tmp_path / "broken" / "checkpoints" / "last-adapter")})
    groups = [AdapterGroup(**g) for g in config["model"]["adapters"]]
    from_ckpt = validate(module={"adapters": groups}, ckpt_path=str(tmp_path / "broken" / "checkpoints" / "last.ckpt"))
    assert from_dir == pytest.approx(from_ckpt, abs=1e-6)
    with pytest.raises(ConfigError, match=r"model.adapters differs from the adapters of model.init_adapter"):
        MMPeftModule(
            Backbone(pretrained=tiny_model_dirs["llava"]),
            adapters=[AdapterGroup()],
            init_adapter=str(tmp_path / "broken" / "checkpoints" / "last-adapter"),
        )


# -- the data stream's position -----------------------------------------------------------------


@pytest.mark.parametrize(
    "workers, mixing, taken",
    [(0, None, 3), (2, None, 5), (2, {"by": "task", "temperature": 2.0, "epoch_steps": 12}, 7)],
    ids=["one-pass-0-workers", "one-pass-2-workers", "resampled-2-workers"],
)
def test_the_stream_resumes_with_the_batches_an_uninterrupted_epoch_would_give(
    tiny_model_dirs, tmp_path, workers, mixing, taken
):
    from data_recipes.synthetic import SyntheticRecipe
    from mmpeft.data.datamodule import ShardDataModule

    shards = tmp_path / "train"
    SyntheticRecipe(samples=72, samples_per_shard=12, seed=4).build(shards, progress=False)

    def datamodule(num_workers: int = workers) -> ShardDataModule:
        dm = ShardDataModule(
            train=str(shards),
            processor=tiny_model_dirs["llava"],
            batch_size=4,
            max_length=256,
            num_workers=num_workers,
            shuffle_buffer=16,
            mixing=mixing,
        )
        dm.setup("fit")
        return dm

    whole = [batch["keys"] for batch in datamodule().train_dataloader()]
    interrupted = datamodule()
    loader = iter(interrupted.train_dataloader())
    for _ in range(taken):  # the batches trained on before the checkpoint (Lightning calls this hook for each)
        interrupted.on_before_batch_transfer(next(loader), 0)
    next(loader)  # fetched ahead, never trained on: not part of the position
    state = interrupted.state_dict()
    del loader

    resumed = datamodule()
    resumed.load_state_dict(state)
    assert [batch["keys"] for batch in resumed.train_dataloader()] == whole[taken:]

    if workers:  # another worker count cannot continue exactly: the epoch restarts, and says so
        other = datamodule(num_workers=1)
        other.load_state_dict(state)
        restarted = [batch["keys"] for batch in other.train_dataloader()]
        if mixing:
            assert len(restarted) == len(whole) == 12  # a whole resampled epoch
        else:
            assert sorted(k for keys in restarted for k in keys) == sorted(
                k for keys in whole for k in keys
            )  # a whole pass


def test_load_adapted_gives_the_model_processor_and_routing(tiny_model_dirs, saved):
    from mmpeft.saving import load_adapted

    out, expected = saved
    loaded = load_adapted(out, tiny_model_dirs["llava"])  # the spec names the path it was trained from; here the same
    assert not loaded.model.training and loaded.spec.tasks == ["color", "shape"]
    assert torch.equal(logits(loaded.model, _batch(tiny_model_dirs["llava"])), expected)
    inputs = loaded.processor(
        text=["USER: <image>\nWhat color? ASSISTANT:"], images=[torch.zeros(3, 32, 32)], return_tensors="pt"
    )
    generated = loaded.routing.generate(loaded.model, **inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
