"""mmpeft's LoRA against PEFT's LoRA on the same 4-bit model, the same batches, side by side; and each speed lever on
its own.

    python benchmarks/vs_peft.py [--hidden H] [--layers L] [--vocab V] [--max-len T] [--batch B]
                                 [--batches K] [--rank R] [--rounds N] [--attn A] [--quick | --check] [--out FILE]

One process loads the same local checkpoint (LLaVA architecture, the tiny demo's vision tower,
a text model ``--hidden`` wide and ``--layers`` deep with a ``--vocab``-row embedding and LM
head; built here and cached under ``.cache/mmpeft/bench-*``) several times, in NF4 with double
quantization every time:

- ``peft``: ``AutoModelForImageTextToText.from_pretrained`` with the same quantization config,
  ``peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)``,
  ``get_peft_model`` with a ``LoraConfig`` of the same r, alpha and dropout targeting exactly the
  same linear layers, and ``model(**inputs, labels=labels).loss`` (full logits, transformers'
  loss), as PEFT's documentation trains;
- mmpeft variants: ``load_backbone`` (QLoRA preparation, non-reentrant checkpointing), LoRA
  injected on every linear layer of the language model, a step as ``MMPeftModule`` trains
  (``lm_losses``: logits only where a trained token is predicted), with the ``model.speed``
  levers (mmpeft/speed.py) set per variant: ``levers off`` (whole logits of the trained
  positions, out-of-place adapter add, input grads as PEFT sets them, every layer recomputed),
  then each lever alone (``+ loss_chunk``, ``+ inplace_add``, ``- input_grads``,
  ``checkpoint_every 2``, ``+ length-grouped batches`` as ``data.group_by_length`` makes
  them, ``+ packed batches`` as ``data.packing`` makes them), ``defaults`` (``model.speed`` as
  shipped, batches as they come), ``all levers`` (batches length-grouped, not packed) and
  ``all levers + packed batches`` (the same, packed to ``ALL_LEVERS_PACK`` times ``--max-len``).

All get AdamW with the same learning rate and the same initial adapter weights (mmpeft's ``A``
copied into ``lora_A``; every ``B`` set to the same small random values, so the adapters change
the loss). Before training, the script checks that every variant computes the same loss as PEFT
on the first batch (dropout off; relative difference at most 1e-4 in float32 on a CPU, 2e-2
under bf16 on CUDA); the packed variants on that batch packed as they pack it, which checks
that packing leaves the loss as it is.

Batches: ``--batches`` batches of ``--batch`` image samples of mixed lengths up to
``--max-len`` tokens, the last ``--answer`` fraction (default an eighth) of each sample
labelled as the answer, padded on the right to the batch's longest sample. Each sample is
LLaVA's chat template around one 32 x 32 image, which the tiny vision tower turns into 16
image tokens, then random text: the image region is the same size in every sample (LLaVA
gives every image the same number of tokens) and the lengths differ by their text, drawn
uniformly between a quarter of ``--max-len`` (at least the prompt and 16 tokens) and
``--max-len``. Every variant trains on the same samples in the same batches, except
``length-grouped``, which regroups the same samples with :func:`mmpeft.data.stream.length_groups`
(the pool is all ``--batches`` batches, as ``data.group_by_length: K`` pools K batches), and
the packed variants, which pack each length-grouped batch as ``data.packing`` collates it
(:func:`pack`: :func:`mmpeft.packing.pack_padded`, no
attention mask, per-sample position ids, each sample's first label ignored) into rows of at
most ``data.pack_length`` tokens: ``+ packed batches`` with ``pack_length`` ``None`` (each
batch's longest sample), then 2 and 4 times ``--max-len`` (``PACK_FACTORS``). Every mmpeft
step passes the batch's :class:`~mmpeft.packing.Layout` (``None`` when padded) to
``lm_losses`` inside ``routed``, as ``MMPeftModule.training_step`` does. A table gives each
layout's rows, positions and padded positions (their share of all positions); it also lists
the as-given batches packed to their longest sample, which no variant trains on. Another
table puts each packed variant against its padded twin (``+ length-grouped batches``, or
``all levers``): padded share, pass time (per-round ratio, median and 95% interval) and peak
memory.

Each round runs a pass over its batches (forward, backward, ``optimizer.step()``,
``zero_grad()`` per batch) of every variant, the order rotated every round. Reported: pass
time and real tokens per second per variant, and per round the ratios to PEFT and to
``levers off`` (median over rounds, 95% bootstrap interval). Memory: the peak allocated during
a pass above what was allocated before it: on CUDA from the allocator's statistics, on a CPU
from torch's profiler memory events (every tensor allocation and free of the pass, summed in
time order), measured in one extra untimed pass. The targets of issue 7 (step time <= 0.85x,
peak memory <= 0.7x PEFT's) are judged with ``verdict``.

``--attn``: every model's attention implementation (``model.backbone.attn_implementation``;
default transformers' choice, sdpa). It decides what packing costs: ``sdpa`` and ``eager``
compute each packed row's whole ``(width x width)`` block-diagonal mask, ``flash_attention_2``
(CUDA, the ``flash-attn`` package) only each sample's own square.

``--check``: a small model and two short rounds, only to check the losses agree and print the
tables (well under a minute on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from adapter_overhead import (  # noqa: E402
    ROOT,
    Runner,
    Variant,
    build_bench_model,
    build_runner,
    loadavg,
    make_batch,
    median_ci,
    mib,
    start_run,
    timed_step,
    to_device,
    verdict,
)
from profiling import cpu_peak_bytes  # noqa: E402

from mmpeft.adapters import AdaptedLinear  # noqa: E402
from mmpeft.adapters.quant import keep_standard_layout  # noqa: E402
from mmpeft.adapters.routing import RoutingContext, RoutingLosses  # noqa: E402
from mmpeft.data.stream import length_groups  # noqa: E402
from mmpeft.models.backbone import LANGUAGE_MODEL_PATHS, Backbone, get_path, language_model, quantization_config  # noqa: E402
from mmpeft.objective import IGNORE_INDEX, lm_losses, routed  # noqa: E402
from mmpeft.packing import PACKING, Layout, pack_padded  # noqa: E402
from mmpeft.speed import Speed  # noqa: E402

TARGETS = {"step time": 0.85, "peak memory": 0.70}  # mmpeft / PEFT, at most


# -- batches --------------------------------------------------------------------------------


def mixed_batches(
    model_dir: Path, count: int, batch: int, max_len: int, image_token: int, seed: int, answer: float = 1 / 8
) -> list[dict[str, Any]]:
    """``count`` batches of ``batch`` samples of mixed lengths (the first batch's first sample ``max_len``),
    right-padded per batch.

    Each sample is make_batch's image prompt and random text cut to its length; its last
    ``answer`` fraction (at least 8 tokens, never the image prompt) is the labelled answer.
    """
    rng = random.Random(seed)
    out = []
    for b in range(count):
        full = make_batch(model_dir, batch, max_len, answer=1, seed=seed + b)
        ids = full["inputs"]["input_ids"]  # (batch, max_len)
        prefix = int((ids[0] == image_token).nonzero().max()) + 16  # image tokens and the prompt's template around them
        low = max(prefix + 16, max_len // 4)
        if low > max_len:
            raise SystemExit(f"--max-len {max_len} is too short for the {prefix}-token image prompt and an answer")
        lengths = [rng.randint(low, max_len) for _ in range(batch)]
        if b == 0:
            lengths[0] = max_len
        longest = max(lengths)
        inputs = {k: v for k, v in full["inputs"].items()}
        inputs["input_ids"] = ids[:, :longest].clone()  # (batch, longest)
        mask = torch.zeros(batch, longest, dtype=torch.long)  # (batch, longest)
        labels = torch.full((batch, longest), IGNORE_INDEX)  # (batch, longest)
        for i, n in enumerate(lengths):
            answered = min(max(8, int(n * answer)), n - prefix)  # never the image prompt
            mask[i, :n] = 1
            labels[i, n - answered : n] = inputs["input_ids"][i, n - answered : n]
            inputs["input_ids"][i, n:] = 0  # padding: masked out and never labelled
        inputs["attention_mask"] = mask
        out.append({"inputs": inputs, "labels": labels, "task_ids": full["task_ids"], "lengths": lengths})
    return out


# -- the two sides --------------------------------------------------------------------------


def build_peft(
    model_dir: Path,
    device: torch.device,
    names: list[str],
    r: int,
    alpha: float,
    dropout: float,
    attn: str | None = None,
) -> Runner:
    """PEFT's usual QLoRA path on the same checkpoint and quantization config; ``names`` are the full paths of the
    adapted linears, ``attn`` the attention implementation (``None``: transformers' choice)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText

    backbone = Backbone(pretrained=str(model_dir), attn_implementation=attn)
    dtype = backbone.torch_dtype(device)
    model = AutoModelForImageTextToText.from_pretrained(
        str(model_dir),
        quantization_config=quantization_config(backbone, dtype),
        dtype=dtype,
        device_map={"": device},
        attn_implementation=backbone.attn_implementation,
    )
    keep_standard_layout(model)  # a CPU-only bitsandbytes repacking quirk, as mmpeft's loader; no effect on the math
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)  # as build_runner
    return Runner(
        Variant("peft", "peft-lora", {"r": r, "alpha": alpha, "dropout": dropout}),
        model,
        RoutingContext(),
        optimizer,
        autocast=device.type == "cuda",
    )


def peft_loss(runner: Runner, batch: dict[str, Any]) -> torch.Tensor:
    """PEFT's usual path: transformers shifts ``labels`` itself (``ForCausalLMLoss``: position t predicts label t+1,
    -100 ignored)."""
    return runner.model(**batch["inputs"], labels=batch["labels"], use_cache=False).loss


def peft_step(runner: Runner, batch: dict[str, Any], coefficients: RoutingLosses) -> None:
    device_type = batch["labels"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=runner.autocast):
        loss = peft_loss(runner, batch)
    loss.backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)


def mmpeft_loss(runner: Runner, batch: dict[str, Any]) -> torch.Tensor:
    """The loss as ``MMPeftModule.training_step`` computes it: ``lm_losses`` with the batch's packing
    :class:`~mmpeft.packing.Layout` (``None`` when padded), inside ``routed`` (LoRA has no routers, so no routing
    losses)."""
    with routed(runner.context, batch):
        return lm_losses(runner.model, batch["inputs"], batch["labels"], runner.speed.loss_chunk, Layout.of(batch))[0]


def mmpeft_step(runner: Runner, batch: dict[str, Any], coefficients: RoutingLosses) -> None:
    """One step as ``MMPeftModule.training_step`` (LoRA: no routing losses) plus Lightning's optimizer step."""
    with torch.autocast(batch["labels"].device.type, dtype=torch.bfloat16, enabled=runner.autocast):
        loss = mmpeft_loss(runner, batch)
    loss.backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)


def same_initial_adapters(ours: Runner, theirs: Runner, lm_path: str, seed: int) -> int:
    """mmpeft's ``A`` into PEFT's ``lora_A``; both ``B`` the same small random values. Returns the number of layers."""
    generator = torch.Generator().manual_seed(seed + 1)
    layers = [(name, m) for name, m in language_model(ours.model).named_modules() if isinstance(m, AdaptedLinear)]
    with torch.no_grad():
        for name, layer in layers:
            peft_layer = theirs.model.base_model.model.get_submodule(f"{lm_path}.{name}")
            b = torch.randn(layer.adapter.B.shape, generator=generator) * 0.02  # (d_out, r)
            layer.adapter.B.copy_(b)
            peft_layer.lora_B["default"].weight.copy_(b)
            peft_layer.lora_A["default"].weight.copy_(layer.adapter.A)
    return len(layers)


def first_loss(runner: Runner, loss_fn, batch: dict[str, Any]) -> float:
    """The loss on ``batch`` before any step, dropout off (eval mode), under the runner's own precision."""
    runner.model.eval()
    with torch.no_grad(), torch.autocast(batch["labels"].device.type, dtype=torch.bfloat16, enabled=runner.autocast):
        loss = float(loss_fn(runner, batch))
    runner.model.train()
    return loss


def pass_peak_bytes(
    runner: Runner, step, batches: list[dict[str, Any]], coefficients: RoutingLosses, device: torch.device
) -> int:
    """Peak bytes allocated during one pass over ``batches`` above what was allocated before it.

    CUDA: the allocator's statistics. CPU: torch's profiler records every allocation and free
    (``[memory]`` events with signed sizes); their running sum in time order peaks here.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for batch in batches:
            step(runner, batch, coefficients)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before

    def steps() -> None:
        for batch in batches:
            step(runner, batch, coefficients)

    return cpu_peak_bytes(steps)


# -- the variants ---------------------------------------------------------------------------

OFF = Speed(loss_chunk=0, inplace_add=False, input_grads=True, checkpoint_every=1)

AS_GIVEN, GROUPED = "as given", "length-grouped"
"""The padded layouts: the batches as they come, and the same samples regrouped by length (:func:`regroup`)."""

PACK_FACTORS = (2, 4)
"""The packed variants' capacities besides ``None`` (``pack_length``), as multiples of ``--max-len``."""

ALL_LEVERS_PACK = 2
"""``all levers + packed batches`` packs ``all levers``' length-grouped batches to this many times ``--max-len``."""


def packed_name(pack_length: int | None, source: str = GROUPED) -> str:
    """The layout of ``source``'s batches packed to ``pack_length`` (``None``: each batch's longest sample)."""
    return f"{source}, packed to " + ("the longest" if pack_length is None else str(pack_length))


def pack_lengths(max_len: int) -> list[int | None]:
    """The ``pack_length`` of every packed variant: ``None`` (each batch's longest sample), then
    :data:`PACK_FACTORS` times ``max_len``."""
    return [None, *(k * max_len for k in PACK_FACTORS)]


def variants(check: bool, max_len: int) -> list[tuple[str, Speed, str]]:
    """(name, model.speed, batch layout) of every mmpeft variant, the baseline first.

    The layout is ``as given``, ``length-grouped`` or the length-grouped batches packed (:func:`packed_name`).
    ``all levers`` keeps its batches padded (the variant of the earlier runs) and ``all levers + packed batches``
    packs them to :data:`ALL_LEVERS_PACK` times ``max_len``.
    """
    chunk = 16 if check else Speed().loss_chunk  # --check: several chunks even for its few answer tokens
    packing = [
        ("+ packed batches" + ("" if n is None else f", pack_length {n}"), OFF, packed_name(n))
        for n in pack_lengths(max_len)
    ]
    levers = dataclasses.replace(Speed(), loss_chunk=chunk, checkpoint_every=2)
    levers_packed = ALL_LEVERS_PACK * max_len
    return [
        ("levers off", OFF, AS_GIVEN),
        (f"+ loss_chunk {chunk}", dataclasses.replace(OFF, loss_chunk=chunk), AS_GIVEN),
        ("+ inplace_add", dataclasses.replace(OFF, inplace_add=True), AS_GIVEN),
        ("- input_grads", dataclasses.replace(OFF, input_grads=False), AS_GIVEN),
        ("checkpoint_every 2", dataclasses.replace(OFF, checkpoint_every=2), AS_GIVEN),
        ("+ length-grouped batches", OFF, GROUPED),
        *packing,
        ("defaults", dataclasses.replace(Speed(), loss_chunk=chunk), AS_GIVEN),
        ("all levers", levers, GROUPED),
        (f"all levers + packed batches, pack_length {levers_packed}", levers, packed_name(levers_packed)),
    ]


def unpacked(name: str) -> str:
    """The variant a packed variant differs from only by packing: its padded, length-grouped twin."""
    return "all levers" if name.startswith("all levers") else "+ length-grouped batches"


def regroup(batches: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The same samples in batches of neighbours by length (``data.group_by_length`` with a pool of all of them),
    right-padded per batch."""
    rows = [(b, i) for b, batch in enumerate(batches) for i in range(len(batch["lengths"]))]
    lengths = [batches[b]["lengths"][i] for b, i in rows]
    groups = length_groups(lengths, len(batches[0]["lengths"]), random.Random(seed))
    out = []
    for group in groups:
        members = [rows[j] for j in group]
        longest = max(lengths[j] for j in group)

        def gather(get, members=members) -> torch.Tensor:
            return torch.stack([get(batches[b], i) for b, i in members])

        def cut(t: torch.Tensor, fill: int, longest=longest) -> torch.Tensor:  # (seq,) -> (longest,)
            return F.pad(t, (0, max(0, longest - t.shape[0])), value=fill)[:longest]

        inputs = {
            "input_ids": gather(lambda batch, i: cut(batch["inputs"]["input_ids"][i], 0)),
            "attention_mask": gather(lambda batch, i: cut(batch["inputs"]["attention_mask"][i], 0)),
        }
        for key in batches[0]["inputs"]:
            if key not in inputs:  # per-sample image tensors: pixel_values, image sizes
                inputs[key] = gather(lambda batch, i, key=key: batch["inputs"][key][i])
        labels = gather(lambda batch, i: cut(batch["labels"][i], IGNORE_INDEX))
        task_ids = gather(lambda batch, i: batch["task_ids"][i])
        out.append({"inputs": inputs, "labels": labels, "task_ids": task_ids, "lengths": [lengths[j] for j in group]})
    return out


def pack(batch: dict[str, Any], pack_length: int | None) -> dict[str, Any]:
    """A right-padded ``batch`` as ``data.packing`` collates the same samples (``ChatEncoder._packed``):
    :func:`mmpeft.packing.pack_padded` with the batch's ``lengths`` (rows from
    :func:`mmpeft.packing.packed_order`, capacity ``pack_length`` or the batch's longest sample)."""
    return pack_padded(batch, batch["lengths"], pack_length, ignore_index=IGNORE_INDEX)


def on_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``batch`` on ``device`` with its ``lengths`` and, packed, its layout."""
    out = to_device(batch, device, dtype) | {"lengths": batch["lengths"]}
    if PACKING in batch:
        out[PACKING] = {k: v.to(device) for k, v in batch[PACKING].items()}
    return out


def padded_tokens(batches: list[dict[str, Any]]) -> int:
    """The positions of ``batches``: rows x width, real tokens and padding."""
    return sum(b["labels"].numel() for b in batches)


def padding_table(layouts: dict[str, list[dict[str, Any]]]) -> str:
    """Per layout of the same samples: rows, positions, and the padded positions' share of all positions."""
    lines = [
        "| batches | rows per pass | positions | real tokens | padded positions | padded share |",
        "|---|---|---|---|---|---|",
    ]
    for name, batches in layouts.items():
        positions, real = padded_tokens(batches), sum(sum(b["lengths"]) for b in batches)
        rows = sum(b["labels"].shape[0] for b in batches)
        padded = positions - real
        lines.append(f"| {name} | {rows} | {positions:,} | {real:,} | {padded:,} | {padded / positions:.1%} |")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/vs_peft.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="text model width (multiple of 64)")
    p.add_argument("--layers", type=int, default=4, help="text model depth")
    p.add_argument("--vocab", type=int, default=32000, help="rows of the embedding and the LM head")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=None, help="longest sample (default 1024 on CUDA, 512 on a CPU)")
    p.add_argument("--batches", type=int, default=4, help="batches per pass (the length-grouping pool)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="default 2 x rank")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument(
        "--answer",
        type=float,
        default=1 / 8,
        help="fraction of each sample labelled as its answer (the trained positions)",
    )
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--attn",
        default=None,
        help="attention implementation of every model (sdpa, eager, flash_attention_2; default: transformers' choice, "
        "sdpa), as model.backbone.attn_implementation",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on a CPU, as adapter_overhead.py; 0 keeps torch's)",
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds and shorter samples")
    p.add_argument(
        "--check",
        action="store_true",
        help="a small model, two short rounds: check the first losses agree, print the tables",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.check:
        args.hidden, args.layers, args.batch, args.max_len, args.batches, args.rounds = 128, 2, 2, 128, 2, 2
    elif args.quick:
        args.rounds = min(args.rounds, 3)
        args.max_len = args.max_len or 256
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/vs_peft.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    device, env, started = start_run(args.device, args.threads, command)
    max_len = args.max_len or (1024 if device.type == "cuda" else 512)
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    model_dir = build_bench_model("llava", args.hidden, args.layers, args.seed, vocab=args.vocab)
    lora = {"r": args.rank, "alpha": alpha, "dropout": args.dropout}

    ours: dict[str, Runner] = {}
    for name, speed, _ in variants(args.check, max_len):
        ours[name] = build_runner(Variant(name, "lora", lora), model_dir, device, True, args.seed, speed)
        if args.attn:
            ours[name].model.set_attn_implementation(args.attn)
    base = ours["levers off"]
    lm_path = get_path(base.model, LANGUAGE_MODEL_PATHS, "language model")[0]
    names = [f"{lm_path}.{n}" for n, m in language_model(base.model).named_modules() if isinstance(m, AdaptedLinear)]
    theirs = build_peft(model_dir, device, names, args.rank, alpha, args.dropout, args.attn)
    attention = {language_model(r.model).config._attn_implementation for r in [*ours.values(), theirs]}
    if len(attention) != 1 or (args.attn and attention != {args.attn}):
        raise AssertionError(f"the models' attention implementations differ from --attn {args.attn}: {attention}")
    adapted = 0
    for runner in ours.values():  # the same generator every time: every variant and PEFT get the same B
        adapted = same_initial_adapters(runner, theirs, lm_path, args.seed)
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.model.named_modules() if hasattr(m, "lora_A")}
    if peft_names != set(names):
        raise AssertionError(f"PEFT adapted other layers than mmpeft: {sorted(peft_names ^ set(names))[:5]}")
    trainable = [sum(p.numel() for p in r.model.parameters() if p.requires_grad) for r in (base, theirs)]
    if trainable[0] != trainable[1]:
        raise AssertionError(f"trainable parameters differ: mmpeft {trainable[0]:,}, PEFT {trainable[1]:,}")

    dtype = next(p.dtype for p in base.model.parameters() if p.is_floating_point())
    image_token = base.model.config.image_token_id
    raw = mixed_batches(model_dir, args.batches, args.batch, max_len, image_token, args.seed, args.answer)
    regrouped = regroup(raw, args.seed)
    built = {AS_GIVEN: raw, GROUPED: regrouped, packed_name(None, AS_GIVEN): [pack(b, None) for b in raw]}
    built |= {packed_name(n): [pack(b, n) for b in regrouped] for n in pack_lengths(max_len)}
    layouts = {name: [on_device(b, device, dtype) for b in batches] for name, batches in built.items()}
    as_given = layouts[AS_GIVEN]
    text = language_model(base.model).config
    setup = {
        "family": "llava",
        "hidden": args.hidden,
        "intermediate": text.intermediate_size,
        "layers": args.layers,
        "vocab": args.vocab,
        "adapted_linear_layers": adapted,
        "trainable_params": trainable[0],
        "lora": lora,
        "quantization": "nf4 + double quant (bitsandbytes)",
        "attention": attention.pop(),
        "gradient_checkpointing": (
            "mmpeft non-reentrant; PEFT as prepare_model_for_kbit_training leaves it (torch's default, reentrant)"
        ),
        "batch": args.batch,
        "batches_per_pass": args.batches,
        "max_len": max_len,
        "lengths": [b["lengths"] for b in raw],
        "padded_tokens_per_pass": {name: padded_tokens(batches) for name, batches in built.items()},
        "rounds": args.rounds,
    }
    print("setup: " + ", ".join(f"{k} {v}" for k, v in setup.items()))
    print()
    print(padding_table(built))
    print()

    loss_theirs = first_loss(theirs, peft_loss, as_given[0])
    tolerance = 1e-4 if device.type == "cpu" else 2e-2
    firsts = {}
    for name, _, batches in variants(args.check, max_len):
        runner, first = ours[name], as_given[0]
        if PACKING in layouts[batches][0]:  # packing is exact: the first batch packed as this variant packs
            pack_length = next(n for n in pack_lengths(max_len) if packed_name(n) == batches)
            first = on_device(pack(raw[0], pack_length), device, dtype)
        firsts[name] = first_loss(runner, mmpeft_loss, first)
        rel = abs(firsts[name] - loss_theirs) / abs(loss_theirs)
        if not rel <= tolerance:
            raise AssertionError(
                f"first-step losses differ: mmpeft ({name}) {firsts[name]:.6f}, PEFT {loss_theirs:.6f} "
                f"(relative {rel:.1e} > {tolerance:.0e})"
            )
    worst = max(abs(v - loss_theirs) / abs(loss_theirs) for v in firsts.values())
    print(
        f"first-step losses agree: mmpeft {firsts['levers off']:.6f} (all {len(ours)} variants, "
        "packed ones on the first batch packed), "
        f"PEFT {loss_theirs:.6f} "
        f"(largest relative difference {worst:.1e} <= {tolerance:.0e})"
    )

    coefficients = RoutingLosses()
    sides: dict[str, tuple[Runner, Any, list[dict[str, Any]]]] = {"peft": (theirs, peft_step, as_given)}
    for name, _, batches in variants(args.check, max_len):
        sides[name] = (ours[name], mmpeft_step, layouts[batches])
    before = {
        name: [p.detach().clone() for p in r.optimizer.param_groups[0]["params"]] for name, (r, _, _) in sides.items()
    }
    for runner, step, batches in sides.values():  # warm-up: AdamW's state, first-call costs
        step(runner, batches[0], coefficients)
    for name, (runner, _, _) in sides.items():  # every adapter weight trains (PEFT's checkpointing included)
        frozen = sum(bool(torch.equal(a, p)) for a, p in zip(before[name], runner.optimizer.param_groups[0]["params"]))
        if frozen:
            raise AssertionError(f"{name}: {frozen} adapter tensors did not change in the first step")
    del before
    peaks = {
        name: pass_peak_bytes(runner, step, batches, coefficients, device)
        for name, (runner, step, batches) in sides.items()
    }
    tokens = {name: sum(sum(b["lengths"]) for b in batches) for name, (_, _, batches) in sides.items()}
    order = list(sides)
    rounds: list[dict[str, float]] = []
    for k in range(args.rounds):
        shift = k % len(order)
        seconds: dict[str, float] = {}
        for name in order[shift:] + order[:shift]:
            runner, step, batches = sides[name]
            gc.collect()
            seconds[name] = sum(timed_step(runner, batch, coefficients, device, step=step) for batch in batches)
        rounds.append(seconds)
        print(
            f"round {k + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s, load average {loadavg()})",
            flush=True,
        )

    rows = summarise(rounds, peaks, tokens, device)
    elapsed = time.perf_counter() - started
    shares = {name: 1 - sum(sum(b["lengths"]) for b in bs) / padded_tokens(bs) for name, bs in built.items()}
    print()
    print(variant_table(rows, device))
    print()
    print(packing_table({name: batches for name, _, batches in variants(args.check, max_len)}, rounds, peaks, shares))
    print()
    print(target_table(rows))
    print()
    print(f"total {elapsed:.0f} s; load average at end: {loadavg()}")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": command,
                    "environment": env,
                    "setup": setup,
                    "first_losses": {"peft": loss_theirs, **firsts},
                    "padded_share": shares,
                    "rows": rows,
                    "rounds": rounds,
                    "peak_bytes": peaks,
                    "checkpoint": str(model_dir.relative_to(ROOT))
                    if model_dir.is_relative_to(ROOT)
                    else str(model_dir),
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.out}")


def summarise(
    rounds: list[dict[str, float]], peaks: dict[str, int], tokens: dict[str, int], device: torch.device
) -> list[dict[str, Any]]:
    """Per variant: pass time (median, min), tokens/s, peak memory, and the ratios to PEFT and to ``levers off`` (per
    round: median, 95% interval)."""
    rows = []
    for name in rounds[0]:
        times = [r[name] for r in rounds]
        row: dict[str, Any] = {"variant": name, "pass_s_median": statistics.median(times), "pass_s_min": min(times)}
        row["tokens_per_s"] = tokens[name] / statistics.median(times)
        row["peak_bytes"] = peaks[name]
        for ref in ("peft", "levers off"):
            values = [r[name] / r[ref] for r in rounds]
            row[f"time_x_{ref}"] = {"median": statistics.median(values), "ci95": list(median_ci(values))}
            row[f"memory_x_{ref}"] = peaks[name] / peaks[ref]
        rows.append(row)
    return rows


def variant_table(rows: list[dict[str, Any]], device: torch.device) -> str:
    memory = "peak MiB (CUDA allocator)" if device.type == "cuda" else "peak MiB (CPU, profiler)"
    lines = [
        "| variant | pass s median (min) | real tokens / s | time x PEFT [95% CI] | time x levers off [95% CI] | "
        f"{memory} | memory x PEFT | memory x levers off |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row["variant"], f"{row['pass_s_median']:.3f} ({row['pass_s_min']:.3f})", f"{row['tokens_per_s']:.1f}"]
        for ref in ("peft", "levers off"):
            t = row[f"time_x_{ref}"]
            cells.append(f"{t['median']:.3f}x [{t['ci95'][0]:.3f}-{t['ci95'][1]:.3f}]")
        cells += [mib(row["peak_bytes"]), f"{row['memory_x_peft']:.3f}x", f"{row['memory_x_levers off']:.3f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def packing_table(
    variant_layouts: dict[str, str],
    rounds: list[dict[str, float]],
    peaks: dict[str, int],
    shares: dict[str, float],
) -> str:
    """Issue 18: each packed variant against its padded, length-grouped twin (:func:`unpacked`): padded share,
    pass time (per round: median, 95% interval) and peak memory."""
    lines = [
        "| packed variant | against | padded share | time x against [95% CI] | peak memory x against |",
        "|---|---|---|---|---|",
    ]
    for name, batches in variant_layouts.items():
        if batches not in (AS_GIVEN, GROUPED) and name != "peft":
            ref = unpacked(name)
            values = [r[name] / r[ref] for r in rounds]
            low, high = median_ci(values)
            lines.append(
                f"| {name} | {ref} | {shares[batches]:.1%} (against {shares[variant_layouts[ref]]:.1%}) | "
                f"{statistics.median(values):.3f}x [{low:.3f}-{high:.3f}] | {peaks[name] / peaks[ref]:.3f}x |"
            )
    return "\n".join(lines)


def target_table(rows: list[dict[str, Any]]) -> str:
    """Issue 7's targets for the shipped defaults and for all levers: step time and peak memory as a ratio to PEFT's."""
    lines = [
        "| mmpeft / PEFT | step time [95% CI] | target | met | peak memory | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["variant"] not in ("defaults", "all levers"):
            continue
        t = row["time_x_peft"]
        low, high = t["ci95"]
        memory = row["memory_x_peft"]
        lines.append(
            f"| {row['variant']} | {t['median']:.3f}x [{low:.3f}-{high:.3f}] | <= {TARGETS['step time']:.2f}x | "
            f"{verdict(low, high, TARGETS['step time'], at_most=True)} | "
            f"{memory:.3f}x | <= {TARGETS['peak memory']:.2f}x | "
            f"{verdict(memory, memory, TARGETS['peak memory'], at_most=True)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
