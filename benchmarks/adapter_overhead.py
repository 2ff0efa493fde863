"""Whole-training-step cost of the mixture adapters against LoRA, and against per-expert loops.

    python benchmarks/adapter_overhead.py [--family llava|qwen2_vl] [--steps N] [--repeats K]
                                          [--hidden H] [--layers L] [--rank R] [--out FILE]

One process holds one NF4 model per variant, all loaded from the same local checkpoint (a
LLaVA or Qwen2-VL with a text model widened to ``--hidden``, built here and cached under
``.cache/mmpeft/bench-*``), each with its adapters on every linear layer of the language model
and its own AdamW. A training step is what ``MMPeftModule`` does: forward under the routing
context, LM loss on the answer tokens plus the weighted routing losses, backward (through
non-reentrant gradient checkpointing, as the QLoRA recipe trains), ``optimizer.step()`` and
``zero_grad()``. After one untimed warm-up step each, ``--repeats`` rounds run every variant
``--steps`` timed steps at a time. Reported per variant:

- the median (and the least) step time over all timed steps;
- ``x LoRA``: per round, the variant's step time over the mean of the two LoRA steps around its
  group, then the median over rounds, with a 95% bootstrap interval of that median. Each round runs
  ``lora, asymlora, asymlora-loop, lora, moelora, moelora-loop, lora, mixlora, mixlora-loop, lora``
  with the groups' order rotated and each pair's order swapped from round to round, so every
  ratio compares steps taken seconds apart: side-by-side ratios survive the drift of a shared
  machine;
- ``x LoRA, fastest steps``: the variant's fastest step over LoRA's fastest. Contention on a
  shared machine only ever adds time, so this is the ratio least disturbed by other jobs, and
  where it and the median disagree, the run was noisy;
- ``speed-up over loop``: per round, the loop reference's step time over its vectorised
  mixture's (taken next to each other), median over rounds and its 95% bootstrap interval;
- per target: ``yes`` or ``NO`` when the whole interval lies on one side of it, ``within noise``
  when it straddles it (more ``--repeats`` narrow it);
- memory: on CUDA the peak allocated during the variant's step above what was allocated before
  it; on a CPU, where no allocator statistic exists, the bytes the step keeps (trainable
  parameters, their gradients and AdamW's state) and the activations saved for backward,
  counted with ``torch.autograd.graph.saved_tensors_hooks`` (unique storages, frozen weights
  excluded) in one extra forward with checkpointing switched off. With checkpointing on, only
  one decoder layer's share of those activations is alive at a time during backward.

On a CPU the default is one torch thread: on a shared machine, OpenMP threads that wait for a
preempted sibling make steps several times slower and far noisier (``--threads`` changes it).

The loop references live in this file only. They are written the way the public code of
HydraLoRA / LoRAMoE / MixLoRA computes the update (same routers, same parameters' shapes):

- ``asymlora-loop``: a Python loop over the heads, recomputing ``A dropout(x)`` for every head;
- ``moelora-loop``: a Python loop over all experts, each its own ``B_e A_e`` with its own
  dropout call; unselected experts are computed and multiplied by a zero gate (LoRAMoE);
- ``mixlora-loop``: mmpeft's MixLoRA routing, then the dense per-instance update
  ``delta_W = B_sel A_sel`` ``(batch, d_out, d_in)`` applied with a batched matmul.

One more row, ``dora``, is a third-party plugin: DoRA from ``plugins/mmpeft-dora``, imported from
its source folder and registered by a dist-info folder under ``.cache/mmpeft/plugins`` (what
``pip install`` would write), so it is injected through the entry point like any installed
plugin. It has no loop reference; like every row it stands between two LoRA steps in each round.

``python benchmarks/adapter_overhead.py --check`` only checks that every reference computes
the same update as its vectorised adapter.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.adapters import AdaptedLinear, AdapterGroup, inject_adapters, linear_layer_names
from mmpeft.adapters.asymlora import AsymLoRA, AsymLoRAConfig
from mmpeft.adapters.mixlora import MixLoRA, MixLoRAConfig
from mmpeft.adapters.moelora import MoELoRA, MoELoRAConfig
from mmpeft.adapters.routing import Router, RoutingContext, RoutingLosses, bind_routers, routing_losses, weighted_sum
from mmpeft.models.backbone import Backbone, language_model, load_backbone
from mmpeft.objective import IGNORE_INDEX, lm_loss, routed
from mmpeft.speed import Speed, apply_to_adapters

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "mmpeft"

# Targets of the issue: whole-step time of each mixture relative to LoRA of the same rank r,
# and the least speed-up of each vectorised mixture over its loop reference.
TARGETS = {"asymlora": 1.10, "moelora": 1.15, "mixlora": 1.15}
MIN_SPEEDUP_OVER_LOOP = 1.3


# -- loop references (benchmark only) -------------------------------------------------------


class LoopAsymLoRA(nn.Module):
    """HydraLoRA-style AsymLoRA: one shared ``A``, ``N`` heads ``B_i``, a loop over heads recomputing
    ``A dropout(x)``."""

    config_class = AsymLoRAConfig

    def __init__(self, in_features: int, out_features: int, config: AsymLoRAConfig) -> None:
        super().__init__()
        self.scaling = config.alpha / config.r
        self.lora_A = nn.Linear(in_features, config.r, bias=False)
        self.lora_B = nn.ModuleList(nn.Linear(config.r, out_features, bias=False) for _ in range(config.heads))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        for head in self.lora_B:
            nn.init.zeros_(head.weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        level = config.routing  # "token" or "instance" ("sequence" is normalised to "instance" by the config)
        self.router = Router(in_features, config.heads, level=level, top_k=config.top_k, temperature=config.temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        gate = self.router(x)  # (..., N)
        out = 0
        for i, head in enumerate(self.lora_B):
            out = out + gate[..., i : i + 1] * head(self.lora_A(self.dropout(x))) * self.scaling
        return out

    def load_from(self, other: AsymLoRA) -> None:
        r = self.lora_A.weight.shape[0]
        with torch.no_grad():
            self.lora_A.weight.copy_(other.A)
            for i, head in enumerate(self.lora_B):
                head.weight.copy_(other.B[:, i * r : (i + 1) * r])
            self.router.weight.copy_(other.router.weight)


class LoopMoELoRA(nn.Module):
    """LoRAMoE-style LoRA-MoE: a loop over every expert ``B_e A_e dropout(x)``, scaled by its gate
    (0 if not selected)."""

    config_class = MoELoRAConfig

    def __init__(self, in_features: int, out_features: int, config: MoELoRAConfig) -> None:
        super().__init__()
        self.scaling = config.alpha / config.r
        self.lora_A = nn.ModuleList(nn.Linear(in_features, config.r, bias=False) for _ in range(config.experts))
        self.lora_B = nn.ModuleList(nn.Linear(config.r, out_features, bias=False) for _ in range(config.experts))
        for a, b in zip(self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.router = Router(in_features, config.experts, top_k=config.top_k, temperature=config.temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A[0].weight.dtype)
        gate = self.router(x)  # (..., N)
        out = 0
        for e, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
            out = out + gate[..., e : e + 1] * b(a(self.dropout(x))) * self.scaling
        return out

    def load_from(self, other: MoELoRA) -> None:
        r = self.lora_A[0].weight.shape[0]
        with torch.no_grad():
            for e, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
                a.weight.copy_(other.A[e * r : (e + 1) * r])
                b.weight.copy_(other.B[:, e * r : (e + 1) * r])
            self.router.weight.copy_(other.router.weight)


class DenseMixLoRA(MixLoRA):
    """MixLoRA's released computation: the per-instance update ``delta_W = B_sel A_sel`` materialised, then applied.

    Routing (and so every parameter) is mmpeft's MixLoRA; only the application differs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        index_a, weight_a, index_b, weight_b = self.router_a.context.instance_routing(self, lambda: self.route(x))
        chosen_a = self.A[index_a] * weight_a.unsqueeze(-1)  # (batch, r, d_in)
        chosen_b = self.B.T[index_b] * weight_b.unsqueeze(-1)  # (batch, r, d_out)
        delta_w = chosen_b.transpose(1, 2) @ chosen_a  # (batch, d_out, d_in): one full update per instance
        return torch.bmm(self.dropout(x), delta_w.transpose(1, 2)) * self.scaling  # (batch, seq, d_out)

    def load_from(self, other: MixLoRA) -> None:
        self.load_state_dict(other.state_dict())


# -- variants -------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    adapter: str
    """Registered mmpeft adapter (injected through entry points), or the loop reference's class name."""
    config: dict[str, Any]
    reference_of: str | None = None
    """For a loop reference: the vectorised variant it is compared with."""


REFERENCES: dict[str, type[nn.Module]] = {
    "LoopAsymLoRA": LoopAsymLoRA,
    "LoopMoELoRA": LoopMoELoRA,
    "DenseMixLoRA": DenseMixLoRA,
}
VECTORISED: dict[str, tuple[type[nn.Module], type]] = {
    "LoopAsymLoRA": (AsymLoRA, AsymLoRAConfig),
    "LoopMoELoRA": (MoELoRA, MoELoRAConfig),
    "DenseMixLoRA": (MixLoRA, MixLoRAConfig),
}


def variants(r: int, alpha: float, dropout: float, heads: int, experts: int, top_k: int, factors: int) -> list[Variant]:
    common = {"r": r, "alpha": alpha, "dropout": dropout}
    asym = {**common, "heads": heads}
    moe = {**common, "experts": experts, "top_k": top_k}
    mix = {**common, "factors": factors}
    return [
        Variant("lora", "lora", common),
        Variant("asymlora", "asymlora", asym),
        Variant("asymlora-loop", "LoopAsymLoRA", asym, reference_of="asymlora"),
        Variant("moelora", "moelora", moe),
        Variant("moelora-loop", "LoopMoELoRA", moe, reference_of="moelora"),
        Variant("mixlora", "mixlora", mix),
        Variant("mixlora-loop", "DenseMixLoRA", mix, reference_of="mixlora"),
        Variant("dora", "dora", common),  # a third-party plugin: plugins/mmpeft-dora, from its source folder
    ]


PLUGIN_SOURCES = {"dora": (ROOT / "plugins" / "mmpeft-dora", "mmpeft-dora", "0.1.0", "mmpeft_dora:DoRA")}
"""Plugins the benchmark runs from their source folders: adapter name -> (folder, distribution, version, target)."""


def register_source_plugins(cases: list[Variant]) -> None:
    """Make the source-folder plugins among ``cases`` importable and registered, as ``pip install`` would.

    The source folder goes first on ``sys.path`` (so the benchmark times this tree's code, not an
    installed copy) and a dist-info folder with the entry point under ``.cache/mmpeft/plugins``
    registers it, so it is injected through the entry point like any installed plugin.
    """
    wanted = sorted({v.adapter for v in cases if v.adapter in PLUGIN_SOURCES})
    if not wanted:
        return
    site = CACHE / "plugins"
    for name in wanted:
        folder, dist, version, target = PLUGIN_SOURCES[name]
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[mmpeft.adapters]\n{name} = {target}\n")
        sys.path.insert(0, str(folder))
    sys.path.insert(0, str(site))


def describe(v: Variant) -> str:
    c = v.config
    if v.adapter == "asymlora":
        return f"N={c['heads']} heads of rank {c['r']}, token router, dense gate"
    if v.adapter == "LoopAsymLoRA":
        return "same, loop over heads recomputing A x"
    if v.adapter == "moelora":
        return f"{c['experts']} experts of rank {c['r']}, top-{c['top_k']}"
    if v.adapter == "LoopMoELoRA":
        return "same, loop over all experts"
    if v.adapter == "mixlora":
        return f"rank {c['r']} from pools of {c['factors']} factors, instance routing"
    if v.adapter == "DenseMixLoRA":
        return "same, dense d_out x d_in update per instance"
    if v.adapter == "dora":
        return f"DoRA plugin, rank {c['r']}"
    return f"rank {c['r']}"


def adapter_macs_per_token(v: Variant, d_in: int, d_out: int) -> int:
    """Multiply-accumulates per token of one adapted linear layer's update in the forward (routers
    included, per-instance work excluded)."""
    c = v.config
    r = c["r"]
    if v.adapter == "lora":
        return r * (d_in + d_out)
    if v.adapter == "asymlora":
        return r * d_in + c["heads"] * r * d_out + c["heads"] * d_in
    if v.adapter == "LoopAsymLoRA":
        return c["heads"] * r * (d_in + d_out) + c["heads"] * d_in
    if v.adapter in ("moelora", "LoopMoELoRA"):
        return c["experts"] * r * (d_in + d_out) + c["experts"] * d_in
    if v.adapter == "mixlora":
        return r * (d_in + d_out)
    if v.adapter == "dora":
        # the LoRA branch; the base output is rescaled, not recomputed (the row norms are per step, not per token)
        return r * (d_in + d_out)
    if v.adapter == "DenseMixLoRA":
        return d_in * d_out  # x @ delta_W^T per token; building delta_W is r * d_in * d_out per instance
    raise ValueError(v.adapter)


# -- model, batch, injection ----------------------------------------------------------------


def build_bench_model(family: str, hidden: int, layers: int, seed: int = 0, vocab: int | None = None) -> Path:
    """A local checkpoint of ``family`` with a ``hidden``-wide, ``layers``-deep text model (tiny vision tower), cached.

    ``vocab`` widens the embeddings and LM head to that many rows (the tiny tokenizer stays, so
    only its ids occur in batches, but the head computes every logit).

    The tiny demo build gives the tokenizer, processor and the config to widen; proportions
    follow the real checkpoints (head_dim 64; LLaVA-1.5 / Llama-2: MLP 11008/4096 of the width,
    as many KV heads as heads; Qwen2-VL-2B: MLP 8960/1536, 6 query heads per KV head).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mmpeft.models.tiny import build_tiny_model

    head_dim = 64
    if hidden % head_dim:
        raise SystemExit(f"--hidden must be a multiple of {head_dim}")
    heads = hidden // head_dim
    out = CACHE / (f"bench-{family}-h{hidden}-l{layers}-s{seed}" + (f"-v{vocab}" if vocab else ""))
    if (out / "config.json").is_file() and (out / "bench.json").is_file():
        return out
    tiny = build_tiny_model(family, CACHE / f"tiny-{family}")
    config = AutoConfig.from_pretrained(tiny)
    text = config.text_config
    text.hidden_size = hidden
    text.num_hidden_layers = layers
    text.num_attention_heads = heads
    text.head_dim = head_dim
    if vocab:
        text.vocab_size = vocab
    if family == "llava":
        text.intermediate_size = round(hidden * 11008 / 4096 / 16) * 16
        text.num_key_value_heads = heads
    else:
        text.intermediate_size = round(hidden * 8960 / 1536 / 16) * 16
        text.num_key_value_heads = next(k for k in range(max(1, heads // 6), 0, -1) if heads % k == 0)
        text.max_window_layers = layers
        unit = (
            head_dim // 16
        )  # mrope sections split head_dim / 2 in Qwen2-VL's 2:3:3 proportions ([16, 24, 24] for 128)
        text.rope_parameters = {**text.rope_parameters, "mrope_section": [2 * unit, 3 * unit, 3 * unit]}
        config.vision_config.hidden_size = hidden  # the merger projects straight into the text model
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in os.listdir(tiny):  # tokenizer and processor files of the tiny build
        if name not in ("config.json", "model.safetensors", "generation_config.json") and not name.startswith("."):
            (out / name).write_bytes((Path(tiny) / name).read_bytes())
    (out / "bench.json").write_text(
        json.dumps({"family": family, "hidden": hidden, "layers": layers, "seed": seed, "vocab": vocab}) + "\n"
    )
    return out


def make_batch(model_dir: Path, batch: int, seq: int, answer: int, seed: int = 0) -> dict[str, Any]:
    """``batch`` samples of ``seq`` tokens: the processor's image prompt, then random text; labels on
    the last ``answer`` tokens."""
    from PIL import Image

    from mmpeft.models.backbone import load_processor

    processor = load_processor(str(model_dir))
    generator = torch.Generator().manual_seed(seed)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    colours = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20)]
    images = [Image.new("RGB", (32, 32), colours[i % len(colours)]) for i in range(batch)]
    encoded = processor(text=[prompt] * batch, images=images, return_tensors="pt")
    prefix = encoded["input_ids"].shape[1]
    if prefix + answer > seq:
        raise SystemExit(f"--seq {seq} is too short for a {prefix}-token image prompt and {answer} answer tokens")
    specials = set(processor.tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in specials])
    text = vocab[torch.randint(len(vocab), (batch, seq - prefix), generator=generator)]
    inputs = {k: v for k, v in encoded.items()}
    inputs["input_ids"] = torch.cat([encoded["input_ids"], text], dim=1)
    inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = F.pad(encoded["mm_token_type_ids"], (0, seq - prefix))
    labels = torch.full((batch, seq), IGNORE_INDEX)
    labels[:, -answer:] = inputs["input_ids"][:, -answer:]
    return {"inputs": inputs, "labels": labels, "task_ids": torch.arange(batch) % 2}


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    inputs = {k: v.to(device, dtype=dtype if k == "pixel_values" else None) for k, v in batch["inputs"].items()}
    return {"inputs": inputs, "labels": batch["labels"].to(device), "task_ids": batch["task_ids"].to(device)}


def inject_reference(lm: nn.Module, cls: type[nn.Module], config: Any, context: RoutingContext, label: str) -> int:
    """What ``inject_adapters`` does for ``all-linear``, with a class that is not a registered plugin."""
    names = linear_layer_names(lm)
    for name in names:
        base = lm.get_submodule(name)
        adapter = cls(base.in_features, base.out_features, config)
        adapter.to(device=next(base.parameters()).device, dtype=torch.float32)
        bind_routers(adapter, context, name)
        lm.set_submodule(name, AdaptedLinear(base, adapter, label))
    return len(names)


@dataclass
class Runner:
    variant: Variant
    model: nn.Module
    context: RoutingContext
    optimizer: torch.optim.Optimizer
    times: list[list[float]] = field(default_factory=list)
    """Per slot (LoRA has several per round), the timed steps' seconds."""
    peak_bytes: list[int] = field(default_factory=list)
    autocast: bool = False
    """bf16 autocast around the forward, as ``trainer.precision: bf16-mixed`` does on a GPU."""
    speed: Speed = field(default_factory=Speed)
    """The ``model.speed`` levers the model was loaded and injected with."""


def build_runner(
    v: Variant, model_dir: Path, device: torch.device, checkpointing: bool, seed: int, speed: Speed | None = None
) -> Runner:
    """One model with ``v``'s adapter on every linear layer of its language model, loaded as
    ``MMPeftModule`` loads it (``speed``: its levers)."""
    speed = speed or Speed()
    model = load_backbone(Backbone(pretrained=str(model_dir), gradient_checkpointing=checkpointing), device, speed)
    context = RoutingContext()
    lm = language_model(model)
    torch.manual_seed(seed)
    if v.adapter in REFERENCES:
        cls = REFERENCES[v.adapter]
        inject_reference(lm, cls, VECTORISED[v.adapter][1](**v.config), context, v.name)
    else:
        inject_adapters(lm, [AdapterGroup(v.adapter, ["all-linear"], v.config)], context)
    apply_to_adapters(model, speed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)  # MMPeftModule's optimizer ("adamw")
    return Runner(v, model, context, optimizer, autocast=device.type == "cuda", speed=speed)


def train_step(runner: Runner, batch: dict[str, Any], coefficients: RoutingLosses) -> None:
    """One step as ``MMPeftModule.training_step`` plus Lightning's optimizer step."""
    inputs, labels = batch["inputs"], batch["labels"]
    device_type = inputs["input_ids"].device.type
    with routed(runner.context, batch):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=runner.autocast):
            loss = lm_loss(runner.model, inputs, labels)
        extra = weighted_sum(routing_losses(runner.context, coefficients), coefficients)
        if extra is not None:
            loss = loss + extra
    loss.backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(
    runner: Runner, batch: dict[str, Any], coefficients: RoutingLosses, device: torch.device, step=train_step
) -> float:
    """Seconds of one ``step(runner, batch, coefficients)``; on CUDA its peak allocation above the
    start goes to ``runner.peak_bytes``."""
    sync(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step(runner, batch, coefficients)
    sync(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        runner.peak_bytes.append(torch.cuda.max_memory_allocated(device) - before)
    return elapsed


# -- memory accounting (CPU) ----------------------------------------------------------------


def state_bytes(runner: Runner) -> int:
    """Trainable parameters + their gradients + AdamW's state, as held after a step."""
    params = [p for p in runner.model.parameters() if p.requires_grad]
    total = 2 * sum(p.numel() * p.element_size() for p in params)  # weights and gradients
    for state in runner.optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def saved_activation_bytes(runner: Runner, batch: dict[str, Any], coefficients: RoutingLosses) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward, checkpointing off, weights excluded."""

    def forward() -> None:
        inputs, labels = batch["inputs"], batch["labels"]
        with routed(runner.context, batch):
            loss = lm_loss(runner.model, inputs, labels)
            extra = weighted_sum(routing_losses(runner.context, coefficients), coefficients)
            if extra is not None:
                loss = loss + extra
        del loss, extra  # everything is saved by the end of the forward; dropping the graph frees it
        runner.context.records = []  # the records hold router logits, and with them the graph

    return sum(saved_storages(runner.model, forward).values())


def saved_storages(model: nn.Module, forward) -> dict[int, int]:
    """``{storage address: bytes}`` of what autograd saves for backward during ``forward()``
    (checkpointing off, weights excluded)."""
    frozen = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for m in layers:
            m.gradient_checkpointing = True
    return seen


# -- correctness of the references ----------------------------------------------------------


def check_references(cases: list[Variant], d_in: int = 48, d_out: int = 40) -> float:
    """Each loop reference computes its vectorised adapter's update (dropout off); returns the largest difference."""
    worst = 0.0
    for v in cases:
        if v.adapter not in REFERENCES:
            continue
        cls, config_cls = VECTORISED[v.adapter]
        config = config_cls(**{**v.config, "dropout": 0.0})
        torch.manual_seed(0)
        fast, slow = cls(d_in, d_out, config), REFERENCES[v.adapter](d_in, d_out, config)
        with torch.no_grad():
            fast.B.normal_()
            if isinstance(fast, MixLoRA):
                fast.condition.normal_()
        slow.load_from(fast)
        context = RoutingContext()
        bind_routers(fast, context, "fast")
        bind_routers(slow, context, "slow")
        x = torch.randn(3, 7, d_in)
        mask = torch.ones(3, 7, dtype=torch.bool)
        with context.step(mask, mask):
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            a, b = fast(x1), slow(x2)
            weights = torch.randn_like(a)
            (a * weights).sum().backward()
            (b * weights).sum().backward()
        diff = max((a - b).abs().max().item(), (x1.grad - x2.grad).abs().max().item())
        if not diff < 1e-4:
            raise AssertionError(f"{v.name} differs from {v.reference_of} by {diff}")
        worst = max(worst, diff)
    return worst


# -- reporting ------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    import bitsandbytes
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            cpu = platform.processor() or "unknown"
        env["cpu"] = f"{cpu}, {os.cpu_count()} logical cores"
    return env


def start_run(device_arg: str, threads_arg: int | None, command: str) -> tuple[torch.device, dict[str, Any], float]:
    """The device (``auto``: CUDA when present), torch's CPU threads (default 1 on a CPU), the printed
    command and environment; the start time."""
    device = torch.device(
        "cuda" if device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available()) else "cpu"
    )
    threads = threads_arg if threads_arg is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    env = environment(device)
    print(f"command: {command}")
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"load average at start: {loadavg()}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return device, env, time.perf_counter()


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def median_ci(values: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap interval of the median over rounds (fixed seed, so a rerun of the table agrees)."""
    if len(values) < 2:
        return values[0], values[0]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[min(resamples - 1, int((1 - tail) * resamples))]


def schedule(runners: list[Runner], round_index: int) -> list[Runner]:
    """One round: LoRA, then each mixture next to its loop reference, LoRA again between groups.

    ``lora, asymlora, asymlora-loop, lora, moelora, moelora-loop, lora, ...``: the order of the
    groups rotates every round and each pair swaps places every other round, so no variant keeps
    a position; every mixture step lies between two LoRA steps and next to its partner's.
    """
    lora = next(r for r in runners if r.variant.name == "lora")
    groups: dict[str, list[Runner]] = {}
    for r in runners:
        if r is not lora:
            groups.setdefault(r.variant.reference_of or r.variant.name, []).append(r)
    ordered = list(groups.values())
    shift = round_index % len(ordered) if ordered else 0
    sequence = [lora]
    for group in ordered[shift:] + ordered[:shift]:
        sequence += group[::-1] if round_index % 2 else group
        sequence.append(lora)
    return sequence


def summarise(
    rounds: list[list[tuple[str, float]]], runners: list[Runner], macs: dict[str, float]
) -> list[dict[str, Any]]:
    """Per-variant statistics from the rounds' ``(variant, mean step seconds)`` sequences."""
    x_lora: dict[str, list[float]] = {}
    speedups: dict[str, list[float]] = {}
    reference_of = {r.variant.name: r.variant.reference_of for r in runners}
    for sequence in rounds:
        loras = [i for i, (name, _) in enumerate(sequence) if name == "lora"]
        seconds = dict((name, t) for name, t in sequence if name != "lora")
        for i, (name, t) in enumerate(sequence):
            if name == "lora":
                continue
            before = max(j for j in loras if j < i)
            after = min(j for j in loras if j > i)
            x_lora.setdefault(name, []).append(t / statistics.fmean([sequence[before][1], sequence[after][1]]))
            vectorised = reference_of[name]
            if vectorised in seconds:
                speedups.setdefault(vectorised, []).append(t / seconds[vectorised])
    best_lora = min(t for r in runners if r.variant.name == "lora" for slot in r.times for t in slot)
    rows = []
    for r in runners:
        v = r.variant
        steps = [t for slot in r.times for t in slot]
        x = x_lora.get(v.name, [1.0])
        row: dict[str, Any] = {
            "variant": v.name,
            "adapter": v.adapter,
            "config": v.config,
            "description": describe(v),
            "trainable_params": sum(p.numel() for p in r.model.parameters() if p.requires_grad),
            "step_s_median": statistics.median(steps),
            "step_s_min": min(steps),
            "step_s_all": r.times,
            "adapter_macs_share": macs[v.name],
            "x_lora_median": statistics.median(x),
            "x_lora_ci95": median_ci(x),
            "x_lora_best_steps": min(steps) / best_lora,
        }
        if v.name in speedups:
            s = speedups[v.name]
            row.update(speedup_over_loop_median=statistics.median(s), speedup_over_loop_ci95=median_ci(s))
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], device: torch.device) -> str:
    mem_head = (
        "peak step memory MiB" if device.type == "cuda" else "params+grads+AdamW MiB | saved activations MiB (no ckpt)"
    )
    head = (
        "| variant | adapter | trainable params | adapter MACs / base MACs | step s median (min) "
        "| x LoRA median [95% CI] "
        f"| x LoRA, fastest steps | speed-up over loop median [95% CI] | {mem_head} |"
    )
    cols = head.count("|") - 1
    lines = [head, "|" + "---|" * cols]
    for row in rows:
        speed = "-"
        if "speedup_over_loop_median" in row:
            low, high = row["speedup_over_loop_ci95"]
            speed = f"{row['speedup_over_loop_median']:.2f}x [{low:.2f}-{high:.2f}]"
        if device.type == "cuda":
            mem = mib(row["peak_bytes_median"])
        else:
            mem = f"{mib(row['state_bytes'])} | {mib(row['saved_activation_bytes'])}"
        lines.append(
            f"| {row['variant']} | {row['description']} | {row['trainable_params']:,} "
            f"| {100 * row['adapter_macs_share']:.1f}% | {row['step_s_median']:.3f} ({row['step_s_min']:.3f}) "
            f"| {row['x_lora_median']:.3f} [{row['x_lora_ci95'][0]:.3f}-{row['x_lora_ci95'][1]:.3f}] "
            f"| {row['x_lora_best_steps']:.3f} | {speed} | {mem} |"
        )
    return "\n".join(lines)


def verdict(low: float, high: float, limit: float, at_most: bool) -> str:
    """``yes`` / ``NO`` when the whole 95% interval is on one side of the limit, else ``within noise``."""
    inside, outside = (high <= limit, low > limit) if at_most else (low >= limit, high < limit)
    return "yes" if inside else "NO" if outside else "within noise"


def verdicts(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    by_name = {row["variant"]: row for row in rows}
    lines = ["| target | median [95% CI] | met | fastest steps |", "|---|---|---|---|"]
    results = []
    for name, limit in TARGETS.items():
        if name not in by_name:
            continue
        row = by_name[name]
        low, high = row["x_lora_ci95"]
        results.append(
            {
                "target": f"{name} <= {limit:.2f}x LoRA",
                "median": row["x_lora_median"],
                "ci95": [low, high],
                "met": verdict(low, high, limit, at_most=True),
                "fastest_steps": row["x_lora_best_steps"],
            }
        )
        if "speedup_over_loop_median" in row:
            low, high = row["speedup_over_loop_ci95"]
            loop = next(r for r in rows if r["variant"] == f"{name}-loop")
            results.append(
                {
                    "target": f"{name} >= {MIN_SPEEDUP_OVER_LOOP:.1f}x faster than its loop",
                    "median": row["speedup_over_loop_median"],
                    "ci95": [low, high],
                    "met": verdict(low, high, MIN_SPEEDUP_OVER_LOOP, at_most=False),
                    "fastest_steps": loop["step_s_min"] / row["step_s_min"],
                }
            )
    for res in results:
        low, high = res["ci95"]
        lines.append(
            f"| {res['target']} | {res['median']:.3f}x [{low:.3f}-{high:.3f}] | {res['met']} "
            f"| {res['fastest_steps']:.3f}x |"
        )
    return "\n".join(lines), results


def profile_step(runner: Runner, batch: dict[str, Any], coefficients: RoutingLosses, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        train_step(runner, batch, coefficients)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/adapter_overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["llava", "qwen2_vl"], default="llava")
    p.add_argument("--hidden", type=int, default=512, help="text model width (multiple of 64)")
    p.add_argument("--layers", type=int, default=2, help="text model depth")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--answer", type=int, default=64, help="trained (labelled) tokens at the end of each sample")
    p.add_argument(
        "--rank",
        type=int,
        default=8,
        help="r of LoRA, of each AsymLoRA head, of each LoRA-MoE expert, of MixLoRA's update",
    )
    p.add_argument("--heads", type=int, default=4, help="AsymLoRA's N")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--factors", type=int, default=None, help="MixLoRA's pool size (default 4 x rank)")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--repeats", type=int, default=8, help="rounds")
    p.add_argument("--variants", default=None, help="comma-separated subset (lora is always run)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on a CPU: on a shared machine, OpenMP threads waiting for a preempted "
        "sibling make steps several times slower and far noisier; 0 keeps torch's default)",
    )
    p.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    p.add_argument(
        "--profile",
        default=None,
        metavar="VARIANT",
        help="after timing, print a torch.profiler table of one step of VARIANT",
    )
    p.add_argument("--check", action="store_true", help="only check the loop references against the adapters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/adapter_overhead.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    factors = args.factors or 4 * args.rank
    cases = variants(args.rank, 2.0 * args.rank, args.dropout, args.heads, args.experts, args.top_k, factors)
    if args.variants:
        wanted = {"lora", *args.variants.split(",")}
        unknown = wanted - {v.name for v in cases}
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(v.name for v in cases)}")
        cases = [v for v in cases if v.name in wanted]
    register_source_plugins(cases)
    worst = check_references(cases)
    print(f"loop references compute the same update and input gradient as their adapters (max |diff| {worst:.1e})")
    if args.check:
        return

    device, env, started = start_run(args.device, args.threads, command)
    model_dir = build_bench_model(args.family, args.hidden, args.layers, args.seed)
    checkpointing = not args.no_checkpointing
    runners = [build_runner(v, model_dir, device, checkpointing, args.seed) for v in cases]
    lm = language_model(runners[0].model)
    shapes = [(m.in_features, m.out_features) for m in lm.modules() if isinstance(m, AdaptedLinear)]
    base_macs = sum(i * o for i, o in shapes)
    macs = {v.name: sum(adapter_macs_per_token(v, i, o) for i, o in shapes) / base_macs for v in cases}
    text = lm.config if hasattr(lm, "config") else None
    dtype = next(p.dtype for p in runners[0].model.parameters() if p.is_floating_point())
    batch = to_device(make_batch(model_dir, args.batch, args.seq, args.answer, args.seed), device, dtype)
    coefficients = RoutingLosses()  # defaults: load balance 0.01, z-loss 0.001
    setup = {
        "family": args.family,
        "checkpoint": str(model_dir.relative_to(ROOT)) if model_dir.is_relative_to(ROOT) else str(model_dir),
        "hidden": args.hidden,
        "intermediate": getattr(text, "intermediate_size", None),
        "layers": args.layers,
        "heads": getattr(text, "num_attention_heads", None),
        "kv_heads": getattr(text, "num_key_value_heads", None),
        "adapted_linear_layers": len(shapes),
        "quantization": "nf4 + double quant (bitsandbytes)",
        "gradient_checkpointing": checkpointing,
        "batch": args.batch,
        "seq": args.seq,
        "answer_tokens": args.answer,
        "routing_losses": asdict(coefficients),
        "steps_per_round": args.steps,
        "rounds": args.repeats,
    }
    print("setup: " + ", ".join(f"{k} {v}" for k, v in setup.items()))

    for runner in runners:  # warm-up: allocates AdamW's state, first-call costs
        train_step(runner, batch, coefficients)
    rounds: list[list[tuple[str, float]]] = []
    for round_index in range(args.repeats):
        sequence = []
        for runner in schedule(runners, round_index):
            gc.collect()
            runner.times.append([timed_step(runner, batch, coefficients, device) for _ in range(args.steps)])
            sequence.append((runner.variant.name, statistics.fmean(runner.times[-1])))
        rounds.append(sequence)
        print(
            f"round {round_index + 1}/{args.repeats} done "
            f"({time.perf_counter() - started:.0f} s, load average {loadavg()})",
            flush=True,
        )

    rows = summarise(rounds, runners, macs)
    for row, runner in zip(rows, runners):
        row["state_bytes"] = state_bytes(runner)
        if device.type == "cuda":
            row["peak_bytes_median"] = statistics.median(runner.peak_bytes)
        else:
            row["saved_activation_bytes"] = saved_activation_bytes(runner, batch, coefficients)
    elapsed = time.perf_counter() - started
    print()
    print(table(rows, device))
    print()
    verdict_table, results = verdicts(rows)
    print(verdict_table)
    print()
    print(f"total {elapsed:.0f} s; load average at end: {loadavg()}")
    if args.profile:
        runner = next((r for r in runners if r.variant.name == args.profile), None)
        if runner is None:
            raise SystemExit(f"--profile: no variant {args.profile!r}")
        print(f"\nprofile of one {args.profile} step:\n{profile_step(runner, batch, coefficients)}")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": command,
                    "environment": env,
                    "setup": setup,
                    "rows": rows,
                    "targets": results,
                    "rounds": rounds,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
