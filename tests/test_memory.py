"""The memory breakdown built on the meta device (mmpeft/memory.py) against the model training really loads.

A row per family: the frozen bytes (4-bit weights with their quantization state, everything kept
unquantized) and the trainable ones must equal, byte for byte, what ``load_backbone`` plus the injected
adapters hold on the CPU; float32 for every family, bfloat16 (the CUDA default) for two.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from test_families import SUPPORTED

from mmpeft.adapters import AdapterGroup, inject_adapters
from mmpeft.errors import ConfigError
from mmpeft.memory import parse_size, static_memory
from mmpeft.models.backbone import Backbone, language_model, load_backbone

GROUPS = [AdapterGroup("lora", ["attention"], {"r": 4}), AdapterGroup("asymlora", ["mlp"], {"r": 4, "heads": 3})]


def held_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """What the loaded model holds: frozen bytes (quantization state included) and trainable bytes."""
    frozen = trainable = 0
    seen: set[int] = set()
    for _, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        if tensor.requires_grad:
            trainable += size
        else:
            frozen += size
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            state = layer.weight.quant_state
            frozen += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
            if state.nested:
                frozen += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4 + state.offset.numel() * 4
    return frozen, trainable


CASES = [(family, "float32") for family in SUPPORTED] + [("llava", "bfloat16"), ("qwen2_vl", "bfloat16")]


@pytest.mark.parametrize("family,dtype", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_the_breakdown_equals_what_training_holds(tiny_model_dirs, family, dtype):
    backbone = Backbone(pretrained=tiny_model_dirs[family], compute_dtype=dtype)
    model = load_backbone(backbone, torch.device("cpu"))
    inject_adapters(language_model(model), GROUPS)
    frozen, trainable = held_bytes(model)
    parts = {part.name: part.bytes for part in static_memory(backbone, GROUPS, device_type="cpu")}
    estimated_frozen = (
        parts["quantized weights"] + parts["vision tower (unquantized part)"] + parts["other frozen tensors"]
    )
    assert parts["quantized weights"] > 0
    assert estimated_frozen == frozen
    assert parts["trainable tensors"] == parts["gradients"] == trainable > 0
    # AdamW: two float32 moments per trainable value.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moments = sum(
        s[k].numel() * s[k].element_size() for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")
    )
    assert parts["optimizer state"] == moments


def test_the_8bit_optimizer_state_is_what_bitsandbytes_keeps(tiny_model_dirs):
    """Two bytes per value and a float32 absmax per 256 for tensors of 4096 values or more (the rest in 32 bit)."""
    groups = [AdapterGroup("lora", ["mlp"], {"r": 64, "alpha": 64}), AdapterGroup("lora", ["attention"], {"r": 2})]
    backbone = Backbone(pretrained=tiny_model_dirs["qwen2_vl"])
    model = load_backbone(backbone, torch.device("cpu"))
    inject_adapters(language_model(model), groups)
    params = [p for p in model.parameters() if p.requires_grad]
    assert min(p.numel() for p in params) < 4096 <= max(p.numel() for p in params)  # both kinds of state
    optimizer = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    held, seen = 0, set()
    for state in optimizer.state.values():
        for key, value in state.items():
            # qmap1/qmap2 are the optimizer's shared quantization maps, one pair for all tensors
            if torch.is_tensor(value) and key not in ("qmap1", "qmap2") and id(value) not in seen:
                seen.add(id(value))
                held += value.numel() * value.element_size()
    parts = {part.name: part.bytes for part in static_memory(backbone, groups, "adamw_8bit", device_type="cpu")}
    assert parts["optimizer state"] == held


def test_parse_size_reads_the_usual_spellings_and_names_the_key_otherwise():
    assert parse_size("12GiB", "k") == 12 * 2**30
    assert parse_size("16 GB", "k") == 16 * 10**9
    assert parse_size("800mib", "k") == 800 * 2**20
    assert parse_size("1.5GiB", "k") == int(1.5 * 2**30)
    with pytest.raises(ConfigError, match=r"model\.preflight\.budget: '12 gigs' is not a size"):
        parse_size("12 gigs", "model.preflight.budget")


def test_a_run_that_cannot_fit_its_budget_stops_before_any_weight_is_loaded(tmp_path, tiny_model_dirs, capsys):
    """Through the CLI: exit 2, one line with the plan and the settings that fit; and in a Trainer, the module never
    loaded a model, while a budget of exactly the planned peak trains."""
    import lightning as L
    from test_cli import demo_config, run_main

    from mmpeft.data.datamodule import ShardDataModule
    from mmpeft.module import MMPeftModule
    from mmpeft.planner import Preflight, plan

    path = tiny_model_dirs["llava"]
    config = demo_config(tmp_path, path, "llava", steps=2)
    data = ShardDataModule(train=yaml_train(config), processor=path, batch_size=2, max_length=256)
    batches = data.batches()
    planned = plan(Backbone(pretrained=path), [AdapterGroup()], batches(2, 256, None), device_type="cpu")
    static = sum(part.bytes for part in static_memory(Backbone(pretrained=path), [AdapterGroup()], "adamw", "cpu"))
    assert planned.peak > static  # the step's activations come on top

    budget = planned.peak // 2
    code, err = run_main(capsys, "fit", "--config", str(config), "--model.preflight.budget", f"{budget}B")
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: the run cannot fit: its peak is ")
    assert "quantized weights" in line and "step: backward" in line and f"model.preflight.budget={budget}B" in line
    assert "settings that fit (one at a time): data.batch_size: " in line or "no smaller batch" in line

    def fit(budget: int) -> MMPeftModule:
        module = MMPeftModule(Backbone(pretrained=path), preflight=Preflight(budget=f"{budget}B"))
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
            enable_progress_bar=False,
        )
        data = ShardDataModule(train=yaml_train(config), processor=path, batch_size=2, max_length=256)
        trainer.fit(module, data)
        assert trainer.global_step == 1
        return module

    # The demo config's batches are 8 x 256 tokens; these 2 x 256. One byte short of the plan stops it,
    # the planned peak itself trains.
    module = MMPeftModule(Backbone(pretrained=path), preflight=Preflight(budget=f"{planned.peak - 1}B"))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match="the run cannot fit"):
        trainer.fit(module, ShardDataModule(train=yaml_train(config), processor=path, batch_size=2, max_length=256))
    assert module.model is None  # stopped in configure_model, before load_backbone
    assert fit(planned.peak).model is not None


def yaml_train(config) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["data"]["train"]
