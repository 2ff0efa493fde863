"""Fold a trained adapter into the base weights: ``python -m mmpeft merge``.

Every adapter is first written as one plain LoRA per layer, ``(A, B, scaling)``, by its own
``as_lora(gate)``, in the form its class declares in ``abilities`` (the contract is in
:mod:`mmpeft.adapters.base`):

- LoRA is one already;
- AsymLoRA and LoRA-MoE collapse for one task: ``gate`` is the mean of the gate their router
  applied over that task's samples (``--task``, ``--data``), measured by running the adapted
  model on them (:class:`mmpeft.adapters.routing.GateMeans`). The collapse is exact wherever
  the router gives every input of the task that same gate; its error on a batch of the task
  (the largest logit difference to the routed model) is always reported;
- DoRA (a plugin declaring ``as_dora``) is a LoRA plus a magnitude ``m`` per output row:
  ``W' = m / ||W + s B A||_row * (W + s B A)``;
- a plugin declaring only ``delta_weight`` merges its dense update, but cannot be exported;
- MixLoRA cannot be: each instance gets its own update (it declares ``unmergeable``, with why).

The merged model is built on the base loaded *unquantized* from its checkpoint, whose linear
layers then receive the weights the adapted model actually computed with: for a 4-bit base the
dequantized 4-bit weights (what the adapter was trained against), plus ``scaling * B @ A``
for the adapted layers (DoRA: rescaled as above), in float32. It is written as a standard transformers checkpoint
in bf16/fp16/fp32, or re-quantized to NF4 through transformers' own bitsandbytes path, with the
processor beside it and ``merge_report.json``: the largest logit difference between the written
model and the adapted model on a batch, i.e. what the output dtype or re-quantization cost.

:mod:`mmpeft.export` writes the same LoRA factors in PEFT's adapter format instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig

from mmpeft.adapters.base import Ability, AdaptedLinear, abilities_of
from mmpeft.adapters.inject import load_adapter, tower_contexts
from mmpeft.adapters.lora import LoRA, LoRAConfig
from mmpeft.adapters.quant import dequantized_weight, keep_standard_layout, quantization_of
from mmpeft.adapters.routing import GateMeans, Router, RoutingContext
from mmpeft.errors import ConfigError, DataError, MergeError
from mmpeft.files import refuse_output_over_inputs, staged_dir, write_json
from mmpeft.flags import ArgumentParser, parse
from mmpeft.models.backbone import (
    LANGUAGE_MODEL_PATHS,
    PROJECTOR_PATHS,
    Backbone,
    auto_model_class,
    check_checkpoint,
    get_path,
    inject_model_adapters,
    load_backbone,
    load_processor,
    quantization_config,
)
from mmpeft.objective import routed
from mmpeft.saving import AdapterError, AdapterSpec, apply_adapter, check_recorded_base, read_spec, read_tensors

Factors = tuple[torch.Tensor, torch.Tensor, float]
"""One LoRA: ``A`` ``(r, d_in)``, ``B`` ``(d_out, r)`` and the scaling of ``B @ A``."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXACT_TOLERANCE = 1e-4
"""Largest logit difference (float32) still called exact: what float rounding alone gives on these models."""
REPORT_NAME = "merge_report.json"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Options:
    """What merge and export share: the base as the adapter was trained on it, and the data it is measured on."""

    base: str | None = None
    """The base checkpoint (hub id or folder); default: the one named in ``adapter_config.json``."""
    task: str | None = None
    """Collapse AsymLoRA / LoRA-MoE for this task of the adapter's vocabulary."""
    data: str | None = None
    """Shards whose samples (of ``task``) measure the router gates and the reported logit differences."""
    samples: int = 64
    """Samples of the task the gates are averaged over."""
    batch_size: int = 4
    """Samples per forward pass; logits are compared on the first batch."""
    max_length: int = 1024
    """Longest sample in tokens, as ``data.max_length`` in training."""
    quantization: Literal["nf4", "fp4", "int8", "none"] | None = None
    """How the base was loaded in training, so the adapted model is measured as trained (default: as
    ``adapter_config.json`` records, else nf4)."""
    double_quant: bool | None = None
    """The base's 4-bit double quantization (default: as recorded, else on)."""
    device: str | None = None
    """Where the models run; default: cuda if available, else cpu."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1:
            raise ConfigError(f"--samples and --batch-size must be >= 1, got {self.samples} and {self.batch_size}")
        self.device = self.device or default_device()


# -- what an adapter directory holds, checked before any weight is loaded ----------------------


@dataclass
class Plan:
    """An adapter directory read and checked, with its adapters rebuilt on a weightless copy of the model."""

    adapter: str
    spec: AdapterSpec
    pretrained: str
    tensors: dict[str, torch.Tensor]
    adapted: dict[str, AdaptedLinear]
    """Every adapted layer by its full module path, on the meta-device model, holding the directory's tensors."""
    routed: list[str]
    """The adapted layers whose adapter routes between several experts (they need a task's gate)."""
    projector: str | None
    """Module path of the projector when the adapter trained it (its tensors are in ``tensors``)."""
    options: Options


LORA_FORMS = {Ability.AS_LORA, Ability.AS_DORA}
"""What export needs: the update as one LoRA, plain or weight-decomposed (PEFT's ``use_dora``)."""
WEIGHT_FORMS = {*LORA_FORMS, Ability.DELTA_WEIGHT}
"""What merge needs: any of the above, or the update as a dense matrix."""


def check_mergeable(spec: AdapterSpec, need: Literal["lora", "weight"]) -> None:
    """Refuse adapter plugins that cannot become one LoRA (``need="lora"``) or one weight update (``"weight"``).

    Reads what each adapter class declares in ``abilities`` (:class:`~mmpeft.adapters.base.Ability`).
    """
    for i, group in enumerate(spec.groups):
        cls = load_adapter(group.name)
        where = f"adapters[{i}] ({group.name})"
        abilities = abilities_of(cls)
        if Ability.UNMERGEABLE in abilities:
            raise MergeError(f"{where} cannot be merged or exported: {cls.unmergeable}")
        forms = LORA_FORMS if need == "lora" else WEIGHT_FORMS
        if not abilities & forms:
            methods = "as_lora()" if need == "lora" else "as_lora() or delta_weight()"
            declarable = ", ".join(sorted(forms))
            raise MergeError(
                f"{where}: the plugin {cls.__module__}.{cls.__qualname__} defines no {methods}, so mmpeft "
                f"cannot {'write it as a LoRA' if need == 'lora' else 'merge it'} (it declares none of "
                f"{declarable} in its abilities; see docs/plugins.md)"
            )


def data_paths(data: str | None) -> list[str]:
    """The local shards of ``--data`` and the folders holding them (nothing for remote URLs or no match)."""
    if data is None:
        return []
    from mmpeft.data.datamodule import resolve_shards

    try:
        shards = resolve_shards(data, "--data")
    except ConfigError:  # reported where the shards are read
        return [data]
    return [data, *shards, *dict.fromkeys(str(Path(s).parent) for s in shards)]


def plan(
    adapter: str | os.PathLike, need: Literal["lora", "weight"], o: Options, out: str | os.PathLike | None = None
) -> Plan:
    """Read and check everything that can be checked without loading weights.

    Raises :class:`~mmpeft.saving.AdapterError` for a missing or damaged directory,
    :class:`~mmpeft.errors.ConfigError` for an unknown plugin or task, or for an output ``out``
    that is, contains or lies inside the adapter, the base or the data, and
    :class:`~mmpeft.errors.MergeError` for an adapter that cannot be merged, or a mixture
    given no task to collapse for.
    """
    adapter, task = str(adapter), o.task
    spec = read_spec(adapter)
    if out is not None:  # before anything is loaded: writing there would destroy an input
        refuse_output_over_inputs(
            out, {"--adapter": adapter, "--base": o.base or spec.base_model, "--data": data_paths(o.data)}
        )
    spec = spec.resolved()  # an unknown plugin or hyperparameter fails here
    if o.quantization is None:
        o.quantization = spec.quantization or "nf4"
    if o.double_quant is None:
        o.double_quant = spec.double_quant
    tensors = read_tensors(adapter)  # a missing or truncated adapter.safetensors fails here
    check_mergeable(spec, need)
    if task is not None and spec.tasks and task not in spec.tasks:
        raise ConfigError(f"--task {task!r} is not in the adapter's task vocabulary: {', '.join(spec.tasks)}")
    if task is not None and o.data is None:
        raise ConfigError(
            f"--task {task!r} needs --data: the shards whose samples of that task measure the router gates"
        )
    if o.base is None:
        check_recorded_base(spec, adapter, "--base")  # says which folder was tried, and why
    pretrained = o.base or spec.base_model
    check_checkpoint(pretrained, "--base")
    try:
        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=o.trust_remote_code)
    except OSError as exc:
        detail = " ".join(str(exc).split())
        if o.base is None:
            raise AdapterError(
                f"{Path(adapter) / 'adapter_config.json'} names the base model {pretrained!r}, which is no "
                f"checkpoint folder here (tried {os.path.abspath(Path(pretrained).expanduser())}; an older "
                f"adapter's relative path is relative to the folder training ran in) and does not load as a hub id "
                f"({detail}): give the checkpoint with --base"
            ) from exc
        raise ConfigError(f"--base: cannot load the config of {pretrained!r}: {detail}") from exc
    spec.check_base(config, f"adapter {adapter!r}")

    # The model without weights (meta device): its module paths, the adapters rebuilt on it, their tensors assigned.
    with torch.device("meta"):
        skeleton = auto_model_class(config, "--base").from_config(config, trust_remote_code=o.trust_remote_code)
    adapted = inject_model_adapters(skeleton, spec.groups, RoutingContext())  # by full path: every part's layers
    try:
        result = skeleton.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:  # a shape mismatch
        raise AdapterError(f"adapter {adapter!r} does not fit {pretrained!r}: {exc}") from exc
    missing = [k for k in result.missing_keys if ".adapter." in k]
    if missing or result.unexpected_keys:
        raise AdapterError(
            f"adapter {adapter!r} does not match its adapter config: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )
    routed = [
        name
        for name, layer in adapted.items()
        if any(isinstance(m, Router) and m.experts > 1 for m in layer.adapter.modules())
    ]
    if routed and task is None:
        groups = sorted({layer.adapter_name for name, layer in adapted.items() if name in routed})
        raise MergeError(
            f"{', '.join(groups)} on {len(routed)} layer(s) routes between experts, so it has no single weight update: "
            "collapse it for one task with --task NAME --data SHARDS (the mean router weights over that task's samples)"
        )
    projector = get_path(skeleton, PROJECTOR_PATHS, "projector")[0] if spec.train_projector else None
    return Plan(adapter, spec, pretrained, tensors, adapted, routed, projector, o)


# -- batches -------------------------------------------------------------------------------------


def task_batches(
    data: str, processor: Any, tasks: list[str], task: str | None, samples: int, batch_size: int, max_length: int
) -> list[dict[str, Any]]:
    """Up to ``samples`` samples of ``task`` (any task if ``None``) from the shards ``data``, encoded as training
    does, in batches."""
    import webdataset as wds

    from mmpeft.data.datamodule import resolve_source
    from mmpeft.data.encode import ChatEncoder
    from mmpeft.data.stream import shard_problem

    source, index_tasks = resolve_source(data, "--data")
    vocab = list(tasks or index_tasks or ([task] if task else []))
    if task is not None and task not in vocab:
        raise ConfigError(f"--task {task!r} is not in the task vocabulary of {data!r}: {', '.join(vocab)}")
    encoder = ChatEncoder(processor, vocab, max_length)

    def unreadable(exc: Exception) -> bool:
        raise DataError(f"--data {data!r}: cannot read a shard: {shard_problem(exc)}") from exc

    items = []
    for raw in wds.tarfile_samples(({"url": s.url} for s in source.shards), handler=unreadable):
        sample_task = _task_of(raw)
        if task is not None and sample_task != task:
            continue
        if sample_task is not None and sample_task not in encoder.task_ids:  # shards without a vocabulary
            vocab.append(sample_task)
            encoder.set_tasks(vocab)
        item = encoder(raw)  # None when skipped (too long, bad image, ...), as in training
        if item is not None:
            items.append(item)
        if len(items) >= samples:
            break
    if not items:
        raise DataError(f"--data {data!r} holds no usable sample" + (f" of task {task!r}" if task else ""))
    return [encoder.collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def _task_of(raw: dict[str, Any]) -> str | None:
    try:
        task = json.loads(raw["json"]).get("task")
    except (KeyError, ValueError, AttributeError):
        return None
    return task if isinstance(task, str) else None


def builtin_batch(processor: Any, max_length: int) -> dict[str, Any]:
    """Two small image-text chats, for the logit report when no ``--data`` is given."""
    from mmpeft.data.encode import ChatEncoder
    from mmpeft.data.sample import Sample

    gradient = Image.linear_gradient("L").resize((48, 48)).convert("RGB")
    blocks = Image.new("RGB", (48, 48), (30, 60, 230))
    blocks.paste((230, 25, 25), (8, 8, 30, 30))
    chats = [
        (gradient, "Describe the image.", "A smooth gradient from black at the top to white at the bottom."),
        (blocks, "What colors do you see?", "A red square on a blue background."),
    ]
    encoder = ChatEncoder(processor, ["builtin"], max_length)
    items = []
    for i, (image, question, answer) in enumerate(chats):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        items.append(encoder.encode(Sample(f"builtin-{i}", "builtin", messages, [image])))
    return encoder.collate(items)


# -- running the models --------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def token_logits(
    model: nn.Module, batch: dict[str, Any], context: RoutingContext | None = None, record: bool = False
) -> torch.Tensor:
    """The model's logits at the batch's real tokens, ``(tokens, vocab)`` float32 on the CPU.

    With ``context`` (an adapted model) the routers see the batch's masks and task ids as in
    training; ``record`` keeps their decisions in ``context.records``.
    """
    param = next(model.parameters())
    dtype = getattr(model, "dtype", torch.float32)  # transformers' first floating-point dtype (pixel values follow it)
    inputs = {
        k: v.to(param.device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch["inputs"].items()
    }
    attention = inputs["attention_mask"].bool()  # (batch, seq)
    if context is None:
        logits = model(**inputs, use_cache=False).logits
    else:
        with routed(context, {**batch, "inputs": inputs}, record=record):
            logits = model(**inputs, use_cache=False).logits  # (batch, seq, vocab)
    return logits[attention].float().cpu()  # (tokens, vocab)


def max_logit_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def load_adapted(p: Plan) -> tuple[nn.Module, RoutingContext]:
    """The base loaded as the adapter was trained on it (``options.quantization``), with the adapter applied, in
    eval mode."""
    o = p.options
    backbone = Backbone(
        pretrained=p.pretrained,
        quantization=o.quantization,
        double_quant=o.double_quant,
        gradient_checkpointing=False,
        train_projector=p.spec.train_projector,
        trust_remote_code=o.trust_remote_code,
    )
    model = load_backbone(backbone, torch.device(o.device))
    context = RoutingContext()
    context.num_tasks = len(p.spec.tasks) or None
    apply_adapter(model, p.adapter, context)
    return model.eval(), context


def measure_gates(model: nn.Module, context: RoutingContext, batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Each router's mean applied gate over the batches' real tokens (samples, for instance routing), by full layer
    path; a router in the vision tower or projector over every position (patch) of the tower."""
    meter, towers, tower_meter = GateMeans(), tower_contexts(model), GateMeans()
    for batch in batches:
        token_logits(model, batch, context, record=True)
        meter.add(context)
        for tower in towers:  # their own records, named by full path (mmpeft.adapters.inject.TowerContext)
            tower_meter.add(tower)
    context.records = []
    prefix = get_path(model, LANGUAGE_MODEL_PATHS, "language model")[0]
    return {f"{prefix}.{name}": gate for name, gate in meter.means().items()} | tower_meter.means()


def is_dora(layer: AdaptedLinear) -> bool:
    """Whether the layer's adapter declares the weight-decomposed form (``as_dora``)."""
    return Ability.AS_DORA in abilities_of(type(layer.adapter))


def lora_factors(layer: AdaptedLinear, gate: torch.Tensor | None) -> Factors:
    """The layer's adapter as one LoRA (a mixture collapsed with ``gate``; DoRA's low-rank part), float32 on the CPU."""
    a, b, scaling = layer.adapter.as_dora()[:3] if is_dora(layer) else layer.adapter.as_lora(gate)
    return a.detach().float().cpu(), b.detach().float().cpu(), float(scaling)


def dora_magnitude(layer: AdaptedLinear) -> torch.Tensor:
    """DoRA's magnitude ``m`` ``(d_out,)`` of a layer whose adapter declares ``as_dora``, float32 on the CPU."""
    return layer.adapter.as_dora()[3].detach().float().cpu()


def weight_delta(layer: AdaptedLinear, gate: torch.Tensor | None) -> torch.Tensor:
    """The layer's additive update as a dense ``(d_out, d_in)`` float32 matrix, on the adapter's device (not DoRA's)."""
    if Ability.AS_LORA in abilities_of(type(layer.adapter)):
        a, b, scaling = layer.adapter.as_lora(gate)
        return scaling * (b.float() @ a.float())  # (d_out, d_in)
    return layer.adapter.delta_weight().detach().float()  # (d_out, d_in)


def merged_weight(layer: AdaptedLinear, gate: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """The weight the adapted ``layer`` computes with, from the base weight ``weight`` ``(d_out, d_in)`` float32.

    ``W + delta`` for additive updates; for DoRA ``m / ||V||_row * V`` with ``V = W + s B A``, the norm
    taken of the ``weight`` given (the dequantized base the adapter trained against, by default).
    """
    if not is_dora(layer):
        return weight + weight_delta(layer, gate).to(weight.device)
    a, b, scaling, m = layer.adapter.as_dora()
    a, b, m = (t.float().to(weight.device) for t in (a, b, m))  # (r, d_in), (d_out, r), (d_out,)
    v = weight + scaling * (b @ a)  # (d_out, d_in)
    return (m / torch.linalg.vector_norm(v, dim=1))[:, None] * v  # (d_out, d_in)


@contextmanager
def collapsed(model: nn.Module, factors: dict[str, Factors]) -> Iterator[None]:
    """The adapters of the layers in ``factors`` temporarily replaced by those plain LoRAs."""
    saved = {}
    try:
        for name, (a, b, scaling) in factors.items():
            layer = model.get_submodule(name)
            lora = LoRA(
                layer.in_features, layer.out_features, LoRAConfig(r=a.shape[0], alpha=scaling * a.shape[0], dropout=0.0)
            )
            with torch.no_grad():
                lora.A.data, lora.B.data = a.clone(), b.clone()
            lora.scaling = scaling
            saved[name], layer.adapter = layer.adapter, lora.to(next(layer.adapter.parameters()).device)
        yield
    finally:
        for name, adapter in saved.items():
            model.get_submodule(name).adapter = adapter


@dataclass
class Collapse:
    """The gates a task's data gave each routed layer and what collapsing with them cost on a batch."""

    gates: dict[str, torch.Tensor]
    max_logit_diff: float
    logits: torch.Tensor
    """``(tokens, vocab)``: the collapsed model's logits on the batch."""

    @property
    def exact(self) -> bool:
        return self.max_logit_diff <= EXACT_TOLERANCE

    def to_json(self) -> dict[str, Any]:
        return {
            "max_logit_diff": self.max_logit_diff,
            "exact": self.exact,
            "gates": {name: [round(float(g), 6) for g in gate] for name, gate in self.gates.items()},
        }


def collapse_routed(
    p: Plan, model: nn.Module, context: RoutingContext, batches: list[dict[str, Any]], routed_logits: torch.Tensor
) -> Collapse:
    """Measure the task's gates of the routed layers, and the logit error of collapsing them, on ``batches[0]``."""
    gates = measure_gates(model, context, batches)
    factors = {name: lora_factors(model.get_submodule(name), gates.get(name)) for name in p.routed}
    with collapsed(model, factors):
        collapsed_logits = token_logits(model, batches[0], context)
    return Collapse(
        {name: gates[name] for name in p.routed}, max_logit_diff(collapsed_logits, routed_logits), collapsed_logits
    )


@dataclass
class Measured:
    """The adapted model as trained, the batches it ran on, its logits on the first, and the collapse of its
    mixtures."""

    model: nn.Module
    context: RoutingContext
    processor: Any
    batches: list[dict[str, Any]]
    logits: torch.Tensor
    """``(tokens, vocab)`` at the real tokens of ``batches[0]``."""
    collapse: Collapse | None

    @property
    def gates(self) -> dict[str, torch.Tensor]:
        return self.collapse.gates if self.collapse else {}


def load_and_measure(p: Plan, progress: Callable[[str], None]) -> Measured:
    """Load the adapted model, run it on a batch (of the task from ``data``, else built in), collapse its mixtures
    for the task."""
    o = p.options
    processor = load_processor(p.pretrained, o.trust_remote_code, key="--base")
    if o.data is None:
        batches = [builtin_batch(processor, o.max_length)]
    else:
        batches = task_batches(o.data, processor, p.spec.tasks, o.task, o.samples, o.batch_size, o.max_length)
    progress(f"loading {p.pretrained} ({o.quantization}) with the adapter {p.adapter} on {o.device}")
    model, context = load_adapted(p)
    logits = token_logits(model, batches[0], context)
    collapse = None
    if p.routed:
        progress(f"measuring the router gates on {sum(len(b['keys']) for b in batches)} sample(s) of task {o.task!r}")
        collapse = collapse_routed(p, model, context, batches, logits)
        how = "exact" if collapse.exact else "not exact: the router gives the task's inputs different gates"
        progress(
            f"collapsed {len(collapse.gates)} routed layer(s): max |logit diff| vs routed "
            f"{collapse.max_logit_diff:.3g} ({how})"
        )
    return Measured(model, context, processor, batches, logits, collapse)


def batch_summary(p: Plan, m: Measured) -> dict[str, Any]:
    return {"source": p.options.data or "built-in", "samples": len(m.batches[0]["keys"]), "tokens": m.logits.shape[0]}


# -- merging -------------------------------------------------------------------------------------


def fold_into(
    model: nn.Module, target: nn.Module, gates: dict[str, torch.Tensor], merge_into: Literal["dequantized", "original"]
) -> int:
    """Write into ``target`` (the base loaded unquantized) the weights the adapted ``model`` computes with.

    Adapted layers, in whichever part of the model they are (language model, vision tower,
    projector), get ``W + delta`` (DoRA: ``m / ||W + s B A||_row * (W + s B A)``) in float32, ``W``
    being the dequantized base weight (``merge_into="dequantized"``) or the original one from the
    checkpoint (``"original"``);
    with ``"dequantized"`` every other quantized layer (vision tower included) gets its
    dequantized weight too, so the result computes as the quantized model did. Returns the
    number of adapted layers.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    with torch.no_grad():
        for name, module in model.named_modules():
            parent = name.rsplit(".", 1)[0]
            if parent in layers and name == f"{parent}.base":
                continue  # the base of an adapted layer, written with the layer
            if name in layers:
                base, adapted = module.base, module
            elif merge_into == "dequantized" and quantization_of(module) != "none":
                base, adapted = module, None
            else:
                continue
            out = target.get_submodule(name)
            if (
                not isinstance(out, nn.Linear)
                or quantization_of(out) != "none"
                or tuple(out.weight.shape) != (base.out_features, base.in_features)
            ):
                raise MergeError(
                    f"{name}: the unquantized model has {type(out).__name__} {tuple(out.weight.shape)} there, "
                    "not a Linear of the adapted model's shape"
                )
            if merge_into == "dequantized" or adapted is None:
                weight = dequantized_weight(base)  # (d_out, d_in) float32
            else:
                weight = out.weight.float().to(next(adapted.adapter.parameters()).device)  # (d_out, d_in)
            if adapted is not None:
                weight = merged_weight(adapted, gates.get(name), weight)  # (d_out, d_in)
            out.weight.copy_(weight.to(out.weight.dtype).cpu())
            if base.bias is not None and out.bias is not None:
                out.bias.copy_(base.bias.detach().cpu())
    return len(layers)


def save_processor(processor: Any, out: Path) -> None:
    """``processor.save_pretrained(out)``, plus the image processor's own ``preprocessor_config.json`` as hub
    checkpoints have.

    A processor loaded without torchvision lacks its video part (see ``load_processor``); from that
    file a video-capable processor (Qwen2-VL) rebuilds it where torchvision is installed, so the
    written folder loads wherever the base checkpoint does.
    """
    processor.save_pretrained(str(out))
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and not (out / "preprocessor_config.json").exists():
        image_processor.save_pretrained(str(out))


def load_plain(pretrained: str, dtype: torch.dtype, trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """A checkpoint through its auto class's ``from_pretrained`` (:func:`~mmpeft.models.backbone.auto_model_class`),
    unquantized unless ``kwargs`` say otherwise."""
    try:
        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        model = auto_model_class(config, "--base").from_pretrained(
            pretrained, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as exc:
        raise ConfigError(f"cannot load {pretrained!r}: {exc}") from exc
    keep_standard_layout(model)
    return model.eval()


def merge(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16",
    quantize: Literal["nf4", "fp4"] | None = None,
    merge_into: Literal["dequantized", "original"] = "dequantized",
    progress: Callable[[str], None] = _stderr,
    **options: Any,
) -> dict[str, Any]:
    """Merge the adapter directory ``adapter`` into its base and write a transformers checkpoint to ``out``.

    ``options`` are the fields of :class:`Options` (the base as trained, the task and data).
    ``dtype`` is the output's dtype, or that of its unquantized parts with ``quantize``. Returns
    the report also written to ``out/merge_report.json``. ``out`` appears complete or not at all;
    it must not be, contain or lie inside the adapter, the base or the data (ConfigError).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    p = plan(adapter, "weight", Options(**options), out)
    o = p.options
    m = load_and_measure(p, progress)
    progress(f"merging into the {merge_into} base weights; output {quantize or dtype}")
    merged = load_plain(p.pretrained, DTYPES[dtype], o.trust_remote_code, device_map={"": "cpu"})
    report: dict[str, Any] = {
        "adapter": p.adapter,
        "base_model": p.pretrained,
        "quantization": o.quantization,
        "merged_into": merge_into,
        "dtype": dtype,
        "quantize": quantize,
        "task": o.task,
        "adapted_layers": fold_into(m.model, merged, m.gates, merge_into),
        "batch": batch_summary(p, m),
        "collapse": m.collapse.to_json() if m.collapse else None,
    }
    if p.projector is not None:  # the trained projector replaces the base's
        state = merged.state_dict()
        with torch.no_grad():
            for key, value in p.tensors.items():
                if ".adapter." not in key:
                    state[key].copy_(value)
    processor, batch, adapted_logits, collapsed_logits = (
        m.processor,
        m.batches[0],
        m.logits,
        m.collapse.logits if m.collapse else None,
    )
    del m  # the quantized model goes before the merged one runs
    with staged_dir(out) as staging:
        if quantize is None:
            merged.save_pretrained(staging)
            written = merged.to(o.device)
        else:
            # Re-quantize through transformers' own loader: the full-precision merge goes to a temporary sibling first.
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.full-", dir=out.parent) as full:
                merged.save_pretrained(full)
                del merged
                requant = quantization_config(
                    Backbone(pretrained=full, quantization=quantize, double_quant=o.double_quant), DTYPES[dtype]
                )
                written = load_plain(
                    full, DTYPES[dtype], o.trust_remote_code, device_map={"": o.device}, quantization_config=requant
                )
            written.save_pretrained(staging)
        save_processor(processor, staging)
        progress(f"comparing the merged model with the adapted one on {report['batch']['samples']} sample(s)")
        merged_logits = token_logits(written, batch)
        report["max_logit_diff"] = max_logit_diff(merged_logits, adapted_logits)
        report["max_abs_logit"] = float(adapted_logits.abs().max())  # the scale the difference compares with
        if collapsed_logits is not None:  # what merging cost on top of the collapse
            report["max_logit_diff_vs_collapsed"] = max_logit_diff(merged_logits, collapsed_logits)
        if not math.isfinite(report["max_logit_diff"]):
            raise MergeError(
                f"the merged model's logits are not finite (max |diff| {report['max_logit_diff']}); nothing was written"
            )
        write_json(staging / REPORT_NAME, report)
    progress(f"wrote {out}: max |logit diff| merged vs adapted {report['max_logit_diff']:.3g} ({quantize or dtype})")
    return report


# -- command line --------------------------------------------------------------------------------


def tool_parser(prog: str, description: str) -> ArgumentParser:
    """A parser with the options ``merge`` and ``export`` share (the fields of :class:`Options`), ``--adapter`` and
    ``--out``."""
    parser = ArgumentParser(prog=f"python -m mmpeft {prog}", description=description)
    parser.add_argument(
        "--adapter",
        required=True,
        help="adapter directory (adapter_config.json + adapter.safetensors), e.g. runs/NAME/version_N/adapter",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder, written completely or not at all (an existing one is replaced); it must not be, contain "
        "or lie inside the adapter, the base or the data",
    )
    parser.add_argument(
        "--base", help="the base checkpoint (hub id or folder); default: the one named in adapter_config.json"
    )
    parser.add_argument(
        "--quantization",
        choices=["nf4", "fp4", "int8", "none"],
        default=None,
        help=(
            "how the base was loaded in training, so the adapted model is measured as trained (default: as "
            "adapter_config.json records it, else nf4)"
        ),
    )
    parser.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the base's 4-bit double quantization (default: as recorded, else on)",
    )
    parser.add_argument(
        "--task",
        help=(
            "collapse AsymLoRA / LoRA-MoE for this task (a name of the adapter's task vocabulary) with its mean "
            "router weights"
        ),
    )
    parser.add_argument(
        "--data",
        help=(
            "shards (directory, brace pattern or glob) whose samples of --task measure the router weights and the "
            "reported logit differences"
        ),
    )
    parser.add_argument(
        "--samples", type=int, default=64, help="samples of the task the router weights are averaged over (default: 64)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="samples per forward pass; the first batch is the one logits are compared on (default: 4)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="longest sample in tokens, as data.max_length in training (default: 1024)",
    )
    parser.add_argument("--device", help="where the models run (default: cuda if available, else cpu)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the checkpoint's repository"
    )
    return parser


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`Options` fields from parsed :func:`add_common_arguments`."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Options)}


def cmd_merge(argv: list[str]) -> int:
    parser = tool_parser(
        "merge",
        "Fold an adapter into its base model's weights and write a standard transformers checkpoint "
        "(AutoModelForImageTextToText + AutoProcessor). A 4-bit base is dequantized, merged in float32, then "
        "written in --dtype or re-quantized (--quantize). AsymLoRA and LoRA-MoE are first collapsed for one --task; "
        "MixLoRA cannot be merged. The largest logit difference between the merged and the adapted model on a batch "
        "is printed and written to OUT/merge_report.json.",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="bf16",
        help="dtype of the written weights (of the non-quantized ones with --quantize; default: bf16)",
    )
    parser.add_argument(
        "--quantize",
        choices=["nf4", "fp4"],
        help="re-quantize the merged model to 4 bits (bitsandbytes) before writing it",
    )
    parser.add_argument(
        "--merge-into",
        choices=["dequantized", "original"],
        default="dequantized",
        help="add the update to the dequantized 4-bit weights the adapter was trained against (default; reproduces the "
        "trained model) or to the checkpoint's original weights",
    )
    args = parse(parser, argv)  # --batch-size or --batch_size
    report = merge(
        args.adapter, args.out, dtype=args.dtype, quantize=args.quantize, merge_into=args.merge_into, **options_of(args)
    )
    print(
        json.dumps(
            {k: report[k] for k in ("max_logit_diff", "adapted_layers", "batch")}
            | {"collapse_max_logit_diff": (report["collapse"] or {}).get("max_logit_diff")}
        )
    )
    return 0
