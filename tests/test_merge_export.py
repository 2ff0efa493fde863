"""merge and export: collapsing mixtures, PEFT parity, merged checkpoints (unquantized, NF4, re-quantized),
DoRA, bad input."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import fake_distribution
from safetensors.torch import load_file
from test_cli import mmpeft
from test_dora_plugin import PLUGIN, forget_dora, register_dora
from transformers import AutoModelForImageTextToText, AutoProcessor

from data_recipes.synthetic import SyntheticRecipe
from mmpeft.adapters import AdaptedLinear, AdapterGroup
from mmpeft.adapters.asymlora import AsymLoRA, AsymLoRAConfig
from mmpeft.adapters.moelora import MoELoRA, MoELoRAConfig
from mmpeft.adapters.quant import keep_standard_layout
from mmpeft.adapters.routing import GateMeans, RouterRecord, RoutingContext, expert_gate, top_k_gate
from mmpeft.errors import ConfigError, MergeError
from mmpeft.export import export_peft
from mmpeft.merge import REPORT_NAME, builtin_batch, merge, task_batches, token_logits
from mmpeft.models.backbone import Backbone, inject_model_adapters, load_backbone, load_processor
from mmpeft.saving import (
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
TASKS = ["color", "shape"]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("merge-shards")
    SyntheticRecipe(samples=12, samples_per_shard=6, tasks=tuple(TASKS), seed=0).build(out, progress=False)
    return str(out)


def write_adapter(
    out: Path, base: str, groups: list[AdapterGroup], seed: int = 0, train_projector: bool = False
) -> Path:
    """An adapter directory as training writes it, with random nonzero B, routers and (optionally) projector."""
    model = load_backbone(Backbone(base, quantization="none", train_projector=train_projector), CPU)
    inject_model_adapters(model, groups, RoutingContext())
    torch.manual_seed(seed)
    projector = "model.multi_modal_projector" if train_projector else None
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdaptedLinear):
                for name, param in module.adapter.named_parameters():
                    if name == "m":  # DoRA's magnitude: near its initial ||W||_row, as training leaves it
                        param.mul_(1 + 0.1 * torch.randn_like(param))
                    else:
                        param.normal_(0, 0.3 if "router" in name else 0.1)
        if projector:
            for param in model.get_submodule(projector).parameters():
                param.add_(torch.randn_like(param) * 0.05)
    spec = AdapterSpec(groups, base, base_summary(model.config), TASKS, train_projector).resolved()
    return save_adapter(out, spec, trainable_tensors(model, projector))


def adapted_logits(adapter: Path, base: str, batch: dict, quantization: str = "none") -> torch.Tensor:
    """The logits of the adapted model as training runs it, loaded through the public loading path."""
    backbone = Backbone(
        base,
        quantization=quantization,
        gradient_checkpointing=False,
        train_projector=read_spec(adapter).train_projector,
    )
    model = load_backbone(backbone, CPU)
    context = RoutingContext()
    apply_adapter(model, adapter, context)
    return token_logits(model.eval(), batch, context)


def plain_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """A transformers (or PEFT) model's logits at the real tokens, computed with no mmpeft code."""
    inputs = dict(batch["inputs"])
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    return logits[inputs["attention_mask"].bool()].float()  # (tokens, vocab)


def first_batch(base: str, shards: str, task: str | None, samples: int, batch_size: int = 4) -> dict:
    return task_batches(shards, load_processor(base), TASKS, task, samples, batch_size, 1024)[0]


# -- the collapse math ---------------------------------------------------------------------------


def test_mixtures_collapse_exactly_where_the_router_gives_every_input_one_gate():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12)  # (batch, seq, d_in)
    for adapter in (
        AsymLoRA(12, 10, AsymLoRAConfig(r=4, alpha=8, dropout=0.0, heads=3)),
        AsymLoRA(12, 10, AsymLoRAConfig(r=4, alpha=8, dropout=0.0, heads=3, routing="instance")),
        MoELoRA(12, 10, MoELoRAConfig(r=2, alpha=6, dropout=0.0, experts=4)),
    ):
        torch.nn.init.normal_(adapter.B)
        with torch.no_grad():
            adapter.router.weight.zero_()  # every input gets the uniform gate
        a, b, scaling = adapter.as_lora(torch.full((adapter.router.experts,), 1 / adapter.router.experts))
        assert a.shape[0] == b.shape[1] == adapter.A.shape[0]  # AsymLoRA rank r, LoRA-MoE rank N * r
        torch.testing.assert_close(scaling * (x @ a.T @ b.T), adapter(x), rtol=1e-5, atol=1e-6)


def test_top_k_gate_means_collapse_the_moe_into_the_gated_blocks():
    adapter = MoELoRA(12, 10, MoELoRAConfig(r=2, alpha=4, dropout=0.0, experts=3, top_k=1))
    torch.nn.init.normal_(adapter.B)
    a, b, scaling = adapter.as_lora(torch.tensor([0.0, 1.0, 0.0]))
    # Gate (0, 1, 0): exactly expert 1's LoRA.
    torch.testing.assert_close(scaling * b @ a, scaling * adapter.B[:, 2:4] @ adapter.A[2:4])
    with pytest.raises(MergeError, match="mixes 3 experts"):
        adapter.as_lora(None)
    assert expert_gate(None, 1, "x").tolist() == [1.0]


def test_gate_means_average_the_applied_gate_over_real_tokens_and_samples():
    context = RoutingContext()
    context.attention_mask = torch.tensor([[True, True, False], [True, False, False]])
    probs = torch.tensor(
        [[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.0, 0.0, 1.0]], [[0.3, 0.1, 0.6], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]
    )
    selected = torch.ones_like(probs, dtype=torch.bool)
    top2_gate = top_k_gate(probs, 2)[0]  # the gate a top-2 router applies
    dense = RouterRecord("dense", probs.log(), probs, selected, 3, "token", probs)
    top2 = RouterRecord("top2", probs.log(), probs, selected, 2, "token", top2_gate)
    per_sample = RouterRecord("sample", probs[:, :1].log(), probs[:, :1], selected[:, :1], 3, "instance", probs[:, :1])
    context.records = [dense, top2, per_sample]
    meter = GateMeans()
    meter.add(context)
    means = meter.means()
    torch.testing.assert_close(means["dense"], torch.tensor([1.1, 0.9, 1.0]) / 3)  # the padding tokens left out
    # Top-2, renormalised: (7/9, 2/9, 0), (0, 2/3, 1/3), (1/3, 0, 2/3).
    torch.testing.assert_close(means["top2"], torch.tensor([7 / 9 + 1 / 3, 2 / 9 + 2 / 3, 1]) / 3)
    torch.testing.assert_close(means["sample"], torch.tensor([0.5, 0.15, 0.35]))  # one gate per sample


# -- export to PEFT ------------------------------------------------------------------------------

EXPORTS = {
    # family, groups, train_projector, task, samples the gate is measured on
    "llava-lora-two-ranks-projector": (
        "llava",
        [
            AdapterGroup("lora", ["attention"], LORA),
            AdapterGroup("lora", ["mlp"], {"r": 2, "alpha": 6, "dropout": 0.0}),
        ],
        True,
        None,
        4,
    ),
    "qwen2_vl-lora": ("qwen2_vl", [AdapterGroup("lora", ["all-linear"], LORA)], False, None, 4),
    # One sample and per-sequence routing: the mean gate is the gate that sample routes with, so the collapse is exact.
    "llava-asymlora-per-sequence": (
        "llava",
        [
            AdapterGroup("lora", ["attention"], LORA),
            AdapterGroup("asymlora", ["mlp"], {**LORA, "heads": 3, "routing": "instance"}),
        ],
        False,
        "color",
        1,
    ),
    "qwen2_vl-moelora-top2": (
        "qwen2_vl",
        [AdapterGroup("moelora", ["mlp"], {"r": 2, "alpha": 4, "dropout": 0.0, "experts": 3, "top_k": 2})],
        False,
        "shape",
        4,
    ),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_in_peft_with_the_same_logits(tmp_path, tiny_model_dirs, shards, case):
    from peft import PeftModel, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    family, groups, projector, task, samples = EXPORTS[case]
    base = tiny_model_dirs[family]
    adapter = write_adapter(tmp_path / "adapter", base, groups, train_projector=projector)
    out = tmp_path / "peft"
    report = export_peft(
        adapter,
        out,
        task=task,
        data=shards if task else None,
        samples=samples,
        quantization="none",
        progress=lambda _: None,
    )

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_dropout"] == 0 and config["base_model_name_or_path"] == base
    assert config["target_modules"] and all(
        m.startswith("model.language_model.layers.") for m in config["target_modules"]
    )  # no vision layer
    peft_model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), out
    ).eval()
    assert set(load_file(out / "adapter_model.safetensors")) == set(
        get_peft_model_state_dict(peft_model)
    )  # PEFT's own key names
    assert sum(isinstance(m, LoraLayer) for m in peft_model.modules()) == len(config["target_modules"])
    if projector:
        assert config["modules_to_save"] == ["model.multi_modal_projector"]
        assert (config["r"], config["lora_alpha"]) == (4, 8) and len(config["rank_pattern"]) == len(
            config["alpha_pattern"]
        ) == 6  # the MLP's r=2, alpha=6

    batch = first_batch(base, shards, task, samples)
    ours, theirs = adapted_logits(adapter, base, batch), plain_logits(peft_model, batch)
    if report["collapse"] is None or report["collapse"]["exact"]:
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    else:
        # Token top-2 routing: PEFT runs the collapsed LoRA, whose distance to the routed model the report gives.
        assert report["collapse"]["max_logit_diff"] > 1e-3
        assert (theirs - ours).abs().max().item() == pytest.approx(report["collapse"]["max_logit_diff"], abs=1e-4)
    if family == "qwen2_vl" and task:
        assert config["r"] == 6 and config["lora_alpha"] == 12  # 3 experts of rank 2 -> rank 6, alpha / r = 2 kept


# -- adapters in the vision tower and the projector ---------------------------------------------

VISION_GROUPS = {
    # family: groups, the adapted layers outside the language model
    "llava": (
        [
            AdapterGroup("lora", ["attention"], LORA),
            # LLaVA reads the penultimate block's features: [-1] is block 0 of the tiny CLIP's 2.
            AdapterGroup("lora", ["all-linear"], {"r": 2, "alpha": 6, "dropout": 0.0}, part="vision", layers=[-1]),
            AdapterGroup("lora", ["all-linear"], LORA, part="projector"),
        ],
        [
            "model.multi_modal_projector.linear_1",
            "model.multi_modal_projector.linear_2",
            *(
                f"model.vision_tower.encoder.layers.0.{name}"
                for name in ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj")
            ),
            "model.vision_tower.encoder.layers.0.self_attn.v_proj",
        ],
    ),
    "qwen2_vl": (  # the projector (merger) inside the vision tower
        [
            AdapterGroup("lora", ["mlp"], LORA),
            AdapterGroup("lora", ["qkv", "*.attn.proj"], LORA, part="vision", layers=[-1]),
            AdapterGroup("lora", ["all-linear"], LORA, part="projector"),
        ],
        [
            "model.visual.blocks.1.attn.proj",
            "model.visual.blocks.1.attn.qkv",
            "model.visual.merger.mlp.0",
            "model.visual.merger.mlp.2",
        ],
    ),
}


@pytest.mark.parametrize("family", list(VISION_GROUPS))
def test_vision_and_projector_adapters_export_to_peft_and_merge_with_the_adapted_logits(
    tmp_path, tiny_model_dirs, shards, family
):
    from peft import PeftModel

    groups, outside = VISION_GROUPS[family]
    base = tiny_model_dirs[family]
    adapter = write_adapter(tmp_path / "adapter", base, groups)
    export_peft(adapter, tmp_path / "peft", quantization="none", progress=lambda _: None)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert [m for m in config["target_modules"] if ".language_model." not in m] == outside
    if family == "llava":  # the vision group's r=2 / alpha=6 as PEFT patterns of its exact paths
        assert config["rank_pattern"] == {re.escape(m): 2 for m in outside if ".vision_tower." in m}
    peft_model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), tmp_path / "peft"
    ).eval()
    batch = first_batch(base, shards, None, 4)
    ours = adapted_logits(adapter, base, batch)
    assert (ours - adapted_logits(write_adapter(tmp_path / "lm", base, groups[:1]), base, batch)).abs().max() > 1e-3
    torch.testing.assert_close(plain_logits(peft_model, batch), ours, rtol=0, atol=1e-4)

    report = merge(
        adapter, tmp_path / "merged", data=shards, dtype="fp32", quantization="none", progress=lambda _: None
    )
    assert report["adapted_layers"] == len(outside) + len(
        [m for m in config["target_modules"] if ".language_model." in m]
    )
    assert report["max_logit_diff"] < 1e-4
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(plain_logits(merged, batch), ours, rtol=0, atol=1e-4)


def test_a_routed_vision_adapter_collapses_with_its_gate_over_the_towers_patches(tmp_path, tiny_model_dirs, shards):
    base = tiny_model_dirs["qwen2_vl"]
    groups = [
        AdapterGroup("lora", ["attention"], LORA),
        AdapterGroup("asymlora", ["fc1"], {**LORA, "heads": 2}, part="vision"),  # token routing over patches
    ]
    adapter = write_adapter(tmp_path / "adapter", base, groups)
    report = export_peft(
        adapter, tmp_path / "peft", task="shape", data=shards, samples=2, quantization="none", progress=lambda _: None
    )
    gates = report["collapse"]["gates"]
    assert sorted(gates) == ["model.visual.blocks.0.mlp.fc1", "model.visual.blocks.1.mlp.fc1"]
    assert all(abs(sum(g) - 1) < 1e-5 and min(g) > 0 for g in gates.values())
    # Token routing gives patches different gates: the collapse is the mean gate's LoRA, its error reported.
    assert not report["collapse"]["exact"] and report["collapse"]["max_logit_diff"] > 1e-4


# -- merge ---------------------------------------------------------------------------------------


def test_merge_from_the_command_line_writes_a_checkpoint_with_the_adapted_logits(tmp_path, tiny_model_dirs, shards):
    base = tiny_model_dirs["qwen2_vl"]
    adapter = write_adapter(
        tmp_path / "adapter",
        base,
        [
            AdapterGroup("lora", ["attention"], LORA),
            AdapterGroup("asymlora", ["mlp"], {**LORA, "heads": 2, "routing": "instance"}),
        ],
    )
    out = tmp_path / "merged"
    args = ["--adapter", str(adapter), "--out", str(out), "--quantization", "none", "--dtype", "fp32"]
    result = mmpeft("merge", *args, "--task", "shape", "--data", shards, "--samples", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max |logit diff| merged vs adapted" in result.stderr

    report = json.loads((out / REPORT_NAME).read_text())
    assert report["adapted_layers"] == 14 and report["batch"]["samples"] == 1 and report["collapse"]["exact"]
    assert report["max_logit_diff"] < 1e-4
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert merged.dtype == torch.float32 and not any(".adapter." in k or "lora" in k for k in merged.state_dict())
    # Like its base, it loads with AutoProcessor (here through load_processor: without torchvision, images only).
    assert type(load_processor(str(out))).__name__ == "Qwen2VLProcessor"
    batch = first_batch(base, shards, "shape", 1)
    torch.testing.assert_close(plain_logits(merged, batch), adapted_logits(adapter, base, batch), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def nf4_adapter(tmp_path_factory, tiny_model_dirs) -> tuple[Path, str]:
    base = tiny_model_dirs["llava"]
    return write_adapter(
        tmp_path_factory.mktemp("nf4") / "adapter", base, [AdapterGroup("lora", ["all-linear"], LORA)], seed=1
    ), base


def test_merge_of_an_nf4_base_reproduces_the_trained_model_from_its_dequantized_weights(tmp_path, nf4_adapter, shards):
    adapter, base = nf4_adapter
    batch = first_batch(base, shards, None, 4)
    trained = adapted_logits(adapter, base, batch, quantization="nf4")
    reports = {}
    for merge_into in ("dequantized", "original"):
        out = tmp_path / merge_into
        reports[merge_into] = merge(
            adapter, out, data=shards, dtype="fp32", merge_into=merge_into, progress=lambda _: None
        )
        measured = (
            (plain_logits(AutoModelForImageTextToText.from_pretrained(out).eval(), batch) - trained).abs().max().item()
        )
        assert reports[merge_into]["max_logit_diff"] == pytest.approx(measured, abs=1e-5)
    # Into the dequantized NF4 weights: the trained model up to float rounding. Into the original ones: off by
    # NF4's error.
    assert reports["dequantized"]["max_logit_diff"] < 1e-4
    assert reports["original"]["max_logit_diff"] > 1000 * reports["dequantized"]["max_logit_diff"]


def test_merge_to_bf16_and_requantized_nf4_reports_what_the_output_costs(tmp_path, nf4_adapter, shards):
    adapter, base = nf4_adapter
    batch = first_batch(base, shards, None, 4)
    trained = adapted_logits(adapter, base, batch, quantization="nf4")

    bf16 = merge(
        adapter, tmp_path / "bf16", data=shards, progress=lambda _: None
    )  # the defaults: nf4 base, bf16 output
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16").eval()
    assert model.dtype == torch.bfloat16
    batch_bf16 = {
        **batch,
        "inputs": {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch["inputs"].items()},
    }
    assert bf16["max_logit_diff"] == pytest.approx(
        (plain_logits(model, batch_bf16) - trained).abs().max().item(), abs=1e-5
    )

    # Without --data the logits are compared on a built-in batch of two image-text chats.
    nf4 = merge(adapter, tmp_path / "nf4", dtype="fp32", quantize="nf4", progress=lambda _: None)
    assert nf4["batch"]["source"] == "built-in" and nf4["batch"]["samples"] == 2
    batch = builtin_batch(load_processor(base), 1024)
    trained = adapted_logits(adapter, base, batch, quantization="nf4")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "nf4", device_map={"": "cpu"}).eval()
    keep_standard_layout(model)  # bitsandbytes' AVX512-BF16 repacking fails on layers as narrow as the tiny model's
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 28  # every linear layer but the LM head
    measured = (plain_logits(model, batch) - trained).abs().max().item()
    assert nf4["max_logit_diff"] == pytest.approx(measured, abs=1e-5)
    assert 0 < bf16["max_logit_diff"] < 0.5 and 0 < nf4["max_logit_diff"] < 5  # finite, and what re-quantizing costs
    assert AutoProcessor.from_pretrained(tmp_path / "nf4").tokenizer is not None


# -- bad input -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture_adapters(tmp_path_factory, tiny_model_dirs) -> dict[str, Path]:
    base = tiny_model_dirs["llava"]
    root = tmp_path_factory.mktemp("mixtures")
    return {
        "mixlora": write_adapter(root / "mixlora", base, [AdapterGroup("mixlora", ["mlp"], {**LORA, "factors": 8})]),
        "asymlora": write_adapter(root / "asymlora", base, [AdapterGroup("asymlora", ["mlp"], {**LORA, "heads": 2})]),
    }


def test_mixlora_is_refused_by_merge_and_export_from_the_command_line(tmp_path, mixture_adapters, shards):
    for tool, extra in (("merge", []), ("export", ["--format", "peft"])):
        out = tmp_path / tool
        result = mmpeft(
            tool,
            *extra,
            "--adapter",
            str(mixture_adapters["mixlora"]),
            "--out",
            str(out),
            "--task",
            "color",
            "--data",
            shards,
        )
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == (
            "error: adapters[0] (mixlora) cannot be merged or exported: MixLoRA builds a different low-rank update "
            "for every input (instance routing over factor pools); it has no single weight update to merge or export"
        )
        assert not out.exists() and not [
            p for p in tmp_path.iterdir() if p.name.startswith(".")
        ]  # no staging folder left


def broken(tmp_path: Path, adapter: Path, how: str) -> Path:
    """A copy of ``adapter`` damaged in one way."""
    copy = tmp_path / f"adapter-{how}"
    copy.mkdir()
    for f in adapter.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    weights, config = copy / WEIGHTS_NAME, copy / "adapter_config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "missing":
        weights.unlink()
    elif how == "unknown-plugin":
        data = json.loads(config.read_text())
        data["adapters"][0]["name"] = "hydra_lora"
        config.write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    ("how", "kwargs", "error", "message"),
    [
        ("truncated", {}, AdapterError, r"adapter\.safetensors cannot be read \(truncated"),
        ("missing", {}, AdapterError, r"adapter\.safetensors is missing"),
        ("unknown-plugin", {}, ConfigError, r"unknown adapter 'hydra_lora'; registered adapters: asymlora, .*lora"),
        ("intact", {"task": "ocr"}, ConfigError, r"--task 'ocr' is not in the adapter's task vocabulary: color, shape"),
        ("intact", {}, MergeError, r"asymlora on 6 layer\(s\) routes between experts.*--task NAME --data SHARDS"),
        ("intact", {"task": "color"}, ConfigError, r"--task 'color' needs --data"),
    ],
)
@pytest.mark.parametrize("tool", ["merge", "export"])
def test_bad_input_is_a_clear_error_and_leaves_the_output_untouched(
    tmp_path, mixture_adapters, tool, how, kwargs, error, message
):
    adapter = broken(tmp_path, mixture_adapters["asymlora"], how) if how != "intact" else mixture_adapters["asymlora"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier result")
    run = merge if tool == "merge" else export_peft
    with pytest.raises(error, match=message):
        run(adapter, out, quantization="none", progress=lambda _: None, **kwargs)
    assert [p.name for p in out.iterdir()] == ["previous.txt"] and (
        out / "previous.txt"
    ).read_text() == "an earlier result"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging folder left behind


DENSE_PLUGIN = '''
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DenseConfig:
    pass


class Dense(nn.Module):
    """A full-rank update ``W x``: one weight update (``delta_weight``), but no LoRA (no ``as_lora``)."""

    config_class = DenseConfig
    abilities = frozenset({"delta_weight"})

    def __init__(self, in_features, out_features, config):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(out_features, in_features))

    def forward(self, x, base_out=None):
        return F.linear(x.to(self.W.dtype), self.W)

    def delta_weight(self):
        return self.W
'''


@pytest.fixture
def dense_plugin(tmp_path, monkeypatch):
    """A third-party adapter plugin, installed as a distribution with an entry point."""
    fake_distribution(tmp_path, "denseplug", "0.1", "[mmpeft.adapters]\ndense = denseplug_mod:Dense\n")
    (tmp_path / "denseplug_mod.py").write_text(DENSE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("denseplug_mod", None)


def test_a_plugin_with_only_delta_weight_merges_but_does_not_export(tmp_path, tiny_model_dirs, shards, dense_plugin):
    base = tiny_model_dirs["llava"]
    adapter = write_adapter(tmp_path / "adapter", base, [AdapterGroup("dense", ["mlp"])])
    with pytest.raises(
        MergeError,
        match=r"adapters\[0\] \(dense\): the plugin denseplug_mod.Dense defines no as_lora\(\), "
        r"so mmpeft cannot write it as a LoRA",
    ):
        export_peft(adapter, tmp_path / "peft", progress=lambda _: None)
    assert not (tmp_path / "peft").exists()
    report = merge(
        adapter, tmp_path / "merged", data=shards, quantization="none", dtype="fp32", progress=lambda _: None
    )
    assert report["adapted_layers"] == 6 and report["max_logit_diff"] < 1e-4
    batch = first_batch(base, shards, None, 4)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(plain_logits(merged, batch), adapted_logits(adapter, base, batch), rtol=0, atol=1e-4)


# -- DoRA (the plugin in plugins/mmpeft-dora) ------------------------------------------------------


@pytest.fixture
def dora_plugin(tmp_path, monkeypatch):
    """The DoRA plugin from its source folder, registered as ``dora`` here and in subprocesses."""
    site = tmp_path / "dora-site"
    site.mkdir()
    register_dora(site, monkeypatch)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(PLUGIN)]))  # for `mmpeft(...)`
    yield
    forget_dora()


def test_dora_exports_to_peft_and_merges_with_the_adapted_logits(tmp_path, tiny_model_dirs, shards, dora_plugin):
    from peft import PeftModel, get_peft_model_state_dict

    base = tiny_model_dirs["qwen2_vl"]  # q, k and v have biases, which DoRA leaves outside its rescaling
    adapter = write_adapter(tmp_path / "adapter", base, [AdapterGroup("dora", ["all-linear"], LORA)])
    batch = first_batch(base, shards, None, 4)
    ours = adapted_logits(adapter, base, batch)

    out = tmp_path / "peft"
    export_peft(adapter, out, quantization="none", progress=lambda _: None)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (
        config["use_dora"] is True and config["peft_type"] == "LORA" and (config["r"], config["lora_alpha"]) == (4, 8)
    )
    peft_model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), out
    ).eval()
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert keys == set(get_peft_model_state_dict(peft_model))  # PEFT's own key names, the magnitude's included
    assert sum(key.endswith(".lora_magnitude_vector") for key in keys) == len(config["target_modules"]) == 14
    torch.testing.assert_close(plain_logits(peft_model, batch), ours, rtol=0, atol=1e-4)

    merged_dir = tmp_path / "merged"
    args = ["--adapter", str(adapter), "--out", str(merged_dir), "--quantization", "none", "--dtype", "fp32"]
    result = mmpeft("merge", *args, "--data", shards)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((merged_dir / REPORT_NAME).read_text())
    assert report["adapted_layers"] == 14 and report["max_logit_diff"] < 1e-4
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(plain_logits(merged, batch), ours, rtol=0, atol=1e-4)


def test_dora_beside_lora_merges_into_the_nf4_weights_it_trained_on_but_is_not_one_peft_adapter(
    tmp_path, tiny_model_dirs, shards, dora_plugin
):
    base = tiny_model_dirs["llava"]
    groups = [AdapterGroup("lora", ["attention"], LORA), AdapterGroup("dora", ["mlp"], LORA)]
    adapter = write_adapter(tmp_path / "adapter", base, groups, seed=2)
    with pytest.raises(MergeError, match=r"mixes DoRA layers \(dora\) with plain LoRA layers \(lora\); PEFT's"):
        export_peft(adapter, tmp_path / "peft", quantization="none", progress=lambda _: None)
    assert not (tmp_path / "peft").exists()

    batch = first_batch(base, shards, None, 4)
    trained = adapted_logits(adapter, base, batch, quantization="nf4")
    report = merge(adapter, tmp_path / "merged", data=shards, dtype="fp32", progress=lambda _: None)  # nf4 base
    assert report["quantization"] == "nf4" and report["adapted_layers"] == 14
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    measured = (plain_logits(merged, batch) - trained).abs().max().item()
    # DoRA's norm taken of the dequantized NF4 weights, as in training: the trained model up to float rounding.
    assert report["max_logit_diff"] == pytest.approx(measured, abs=1e-5) and measured < 1e-4
