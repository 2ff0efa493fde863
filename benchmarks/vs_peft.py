"""mmpeft's LoRA against PEFT's LoRA on the same 4-bit model, the same batches, side by side.

    python benchmarks/vs_peft.py [--hidden H] [--layers L] [--vocab V] [--max-len T] [--batch B]
                                 [--rank R] [--rounds K] [--quick | --check] [--out FILE]

One process loads the same local checkpoint (LLaVA architecture, the tiny demo's vision tower,
a text model ``--hidden`` wide and ``--layers`` deep with a ``--vocab``-row embedding and LM
head; built here and cached under ``.cache/mmpeft/bench-*``) twice, in NF4 with double
quantization both times:

- ``mmpeft``: ``load_backbone`` (QLoRA preparation, non-reentrant checkpointing), LoRA injected
  on every linear layer of the language model, a step as ``MMPeftModule`` trains (``lm_loss``:
  logits only where a trained token is predicted);
- ``peft``: ``AutoModelForImageTextToText.from_pretrained`` with the same quantization config,
  ``peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)``,
  ``get_peft_model`` with a ``LoraConfig`` of the same r, alpha and dropout targeting exactly the
  same linear layers, and ``model(**inputs, labels=labels).loss`` (full logits, transformers'
  loss), as PEFT's documentation trains.

Both get AdamW with the same learning rate and the same initial adapter weights (mmpeft's ``A``
copied into ``lora_A``; both ``B`` set to the same small random values, so the adapters change
the loss). Before training, the script checks that both compute the same loss on the first
batch (dropout off; relative difference at most 1e-4 in float32 on a CPU, 2e-2 under bf16 on
CUDA). Batches: ``--batch`` samples of mixed lengths up to ``--max-len`` tokens, each an image
prompt then random text, the last eighth of each sample labelled as the answer, padded on the
right to the batch's longest sample; the same batches, in the same order, for both.

Each round runs a step (forward, backward, ``optimizer.step()``, ``zero_grad()``) of each side,
``--steps`` at a time, the order swapped every round. Reported: step time and real tokens per
second per side, and per round the ratio mmpeft / PEFT (median over rounds, 95% bootstrap
interval); memory: on CUDA the peak allocated during a step above what was allocated before
it; on a CPU, which has no allocator peak, a proxy: the activations autograd saves for backward
in one forward with checkpointing off (unique storages, frozen weights excluded) and the
largest single saved tensor (the logits), labelled as such. The targets of issue 7 (step time
<= 0.85x, peak memory <= 0.7x PEFT's) are judged with ``verdict``.

``--check``: a small model and two short rounds, only to check the losses agree and print the
table (well under a minute on a CPU).
"""

from __future__ import annotations

import argparse
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
    saved_storages,
    start_run,
    state_bytes,
    timed_step,
    to_device,
    train_step,
    verdict,
)

import torch  # noqa: E402

from mmpeft.adapters import AdaptedLinear  # noqa: E402
from mmpeft.adapters.quant import keep_standard_layout  # noqa: E402
from mmpeft.adapters.routing import RoutingContext, RoutingLosses  # noqa: E402
from mmpeft.data.encode import IGNORE_INDEX  # noqa: E402
from mmpeft.models.backbone import LANGUAGE_MODEL_PATHS, Backbone, get_path, language_model, quantization_config  # noqa: E402
from mmpeft.module import lm_loss  # noqa: E402

TARGETS = {"step time": 0.85, "peak memory": 0.70}  # mmpeft / PEFT, at most


# -- batches --------------------------------------------------------------------------------


def mixed_batches(model_dir: Path, count: int, batch: int, max_len: int, image_token: int, seed: int) -> list[dict[str, Any]]:
    """``count`` batches of ``batch`` samples of mixed lengths (the first batch's first sample ``max_len``), right-padded per batch.

    Each sample is make_batch's image prompt and random text cut to its length; its last eighth
    (at least 8 tokens) is the labelled answer.
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
            answer = max(8, n // 8)
            mask[i, :n] = 1
            labels[i, n - answer : n] = inputs["input_ids"][i, n - answer : n]
            inputs["input_ids"][i, n:] = 0  # padding: masked out and never labelled
        inputs["attention_mask"] = mask
        out.append({"inputs": inputs, "labels": labels, "task_ids": full["task_ids"], "lengths": lengths})
    return out


# -- the two sides --------------------------------------------------------------------------


def build_peft(model_dir: Path, device: torch.device, names: list[str], r: int, alpha: float, dropout: float) -> Runner:
    """PEFT's usual QLoRA path on the same checkpoint and quantization config; ``names`` are the full paths of the adapted linears."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText

    backbone = Backbone(pretrained=str(model_dir))
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
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)  # as build_runner
    return Runner(Variant("peft", "peft-lora", {"r": r, "alpha": alpha, "dropout": dropout}), model, RoutingContext(), optimizer, autocast=device.type == "cuda")


def peft_loss(runner: Runner, batch: dict[str, Any]) -> torch.Tensor:
    """PEFT's usual path: transformers shifts ``labels`` itself (``ForCausalLMLoss``: position t predicts label t+1, -100 ignored)."""
    return runner.model(**batch["inputs"], labels=batch["labels"], use_cache=False).loss


def peft_step(runner: Runner, batch: dict[str, Any], coefficients: RoutingLosses) -> None:
    device_type = batch["labels"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=runner.autocast):
        loss = peft_loss(runner, batch)
    loss.backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)


def mmpeft_loss(runner: Runner, batch: dict[str, Any]) -> torch.Tensor:
    return lm_loss(runner.model, batch["inputs"], batch["labels"])  # LoRA has no routers: no routing context needed


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


def first_losses(ours: Runner, theirs: Runner, batch: dict[str, Any]) -> tuple[float, float]:
    """Both losses on ``batch`` before any step, dropout off (eval mode), under each side's own precision."""
    losses = []
    for runner, loss_fn in ((ours, mmpeft_loss), (theirs, peft_loss)):
        runner.model.eval()
        with torch.autocast(batch["labels"].device.type, dtype=torch.bfloat16, enabled=runner.autocast):
            losses.append(float(loss_fn(runner, batch).detach()))
        runner.model.train()
    return losses[0], losses[1]


def memory_proxy(runner: Runner, loss_fn, batch: dict[str, Any]) -> tuple[int, int]:
    """(bytes saved for backward in one forward, checkpointing off; the largest single saved storage)."""

    def forward() -> None:
        loss = loss_fn(runner, batch)
        del loss

    seen = saved_storages(runner.model, forward)
    return sum(seen.values()), max(seen.values())


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/vs_peft.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="text model width (multiple of 64)")
    p.add_argument("--layers", type=int, default=4, help="text model depth")
    p.add_argument("--vocab", type=int, default=32000, help="rows of the embedding and the LM head")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=None, help="longest sample (default 1024 on CUDA, 512 on a CPU)")
    p.add_argument("--batches", type=int, default=2, help="distinct batches, cycled")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="default 2 x rank")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=1, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on a CPU, as adapter_overhead.py; 0 keeps torch's)")
    p.add_argument("--quick", action="store_true", help="fewer rounds and shorter samples")
    p.add_argument("--check", action="store_true", help="a small model, two short rounds: check the first losses agree, print the table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.check:
        args.hidden, args.layers, args.batch, args.max_len, args.batches, args.rounds, args.steps = 128, 2, 2, 128, 1, 2, 1
    elif args.quick:
        args.rounds = min(args.rounds, 3)
        args.max_len = args.max_len or 256
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/vs_peft.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    device, env, started = start_run(args.device, args.threads, command)
    max_len = args.max_len or (1024 if device.type == "cuda" else 512)
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    model_dir = build_bench_model("llava", args.hidden, args.layers, args.seed, vocab=args.vocab)

    lora = {"r": args.rank, "alpha": alpha, "dropout": args.dropout}
    ours = build_runner(Variant("mmpeft", "lora", lora), model_dir, device, True, args.seed)
    lm_path = get_path(ours.model, LANGUAGE_MODEL_PATHS, "language model")[0]
    names = [f"{lm_path}.{n}" for n, m in language_model(ours.model).named_modules() if isinstance(m, AdaptedLinear)]
    theirs = build_peft(model_dir, device, names, args.rank, alpha, args.dropout)
    adapted = same_initial_adapters(ours, theirs, lm_path, args.seed)
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.model.named_modules() if hasattr(m, "lora_A")}
    if peft_names != set(names):
        raise AssertionError(f"PEFT adapted other layers than mmpeft: {sorted(peft_names ^ set(names))[:5]}")
    trainable = [sum(p.numel() for p in r.model.parameters() if p.requires_grad) for r in (ours, theirs)]
    if trainable[0] != trainable[1]:
        raise AssertionError(f"trainable parameters differ: mmpeft {trainable[0]:,}, PEFT {trainable[1]:,}")

    dtype = next(p.dtype for p in ours.model.parameters() if p.is_floating_point())
    image_token = ours.model.config.image_token_id
    batches = [to_device(b, device, dtype) | {"lengths": b["lengths"]} for b in mixed_batches(model_dir, args.batches, args.batch, max_len, image_token, args.seed)]
    text = language_model(ours.model).config
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
        "gradient_checkpointing": "mmpeft non-reentrant; PEFT as prepare_model_for_kbit_training leaves it (torch's default, reentrant)",
        "batch": args.batch,
        "max_len": max_len,
        "lengths": [b["lengths"] for b in batches],
        "steps_per_round": args.steps,
        "rounds": args.rounds,
    }
    print("setup: " + ", ".join(f"{k} {v}" for k, v in setup.items()))

    loss_ours, loss_theirs = first_losses(ours, theirs, batches[0])
    rel = abs(loss_ours - loss_theirs) / abs(loss_theirs)
    tolerance = 1e-4 if device.type == "cpu" else 2e-2
    if not rel <= tolerance:
        raise AssertionError(f"first-step losses differ: mmpeft {loss_ours:.6f}, PEFT {loss_theirs:.6f} (relative {rel:.1e} > {tolerance:.0e})")
    print(f"first-step losses agree: mmpeft {loss_ours:.6f}, PEFT {loss_theirs:.6f} (relative difference {rel:.1e} <= {tolerance:.0e})")

    coefficients = RoutingLosses()
    sides = {"mmpeft": (ours, train_step), "peft": (theirs, peft_step)}
    before = {name: [p.detach().clone() for p in r.optimizer.param_groups[0]["params"]] for name, (r, _) in sides.items()}
    for runner, step in sides.values():  # warm-up: AdamW's state, first-call costs
        step(runner, batches[0], coefficients)
    for name, (runner, _) in sides.items():  # every adapter weight trains (PEFT's checkpointing included)
        frozen = sum(bool(torch.equal(a, p)) for a, p in zip(before[name], runner.optimizer.param_groups[0]["params"]))
        if frozen:
            raise AssertionError(f"{name}: {frozen} adapter tensors did not change in the first step")
    del before
    tokens = {"mmpeft": 0, "peft": 0}
    rounds: list[dict[str, float]] = []
    for k in range(args.rounds):
        order = ["mmpeft", "peft"] if k % 2 == 0 else ["peft", "mmpeft"]
        seconds: dict[str, float] = {}
        peaks: dict[str, float] = {}
        for name in order:
            runner, step = sides[name]
            gc.collect()
            times = []
            for j in range(args.steps):
                batch = batches[(k * args.steps + j) % len(batches)]
                times.append(timed_step(runner, batch, coefficients, device, step=step))
                tokens[name] += int(batch["inputs"]["attention_mask"].sum())
            runner.times.append(times)
            seconds[name] = statistics.fmean(times)
            if runner.peak_bytes:
                peaks[name] = statistics.median(runner.peak_bytes[-args.steps :])
        rounds.append({"seconds": seconds, "peak_bytes": peaks})
        print(f"round {k + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s, load average {loadavg()})", flush=True)

    rows = []
    for name, (runner, _) in sides.items():
        steps = [t for slot in runner.times for t in slot]
        row: dict[str, Any] = {
            "side": name,
            "step_s_median": statistics.median(steps),
            "step_s_min": min(steps),
            "tokens_per_s": tokens[name] / sum(steps),
            "state_bytes": state_bytes(runner),
        }
        if device.type == "cuda":
            row["peak_bytes_median"] = statistics.median(runner.peak_bytes)
        else:
            row["saved_activation_bytes"], row["largest_tensor_bytes"] = memory_proxy(runner, mmpeft_loss if name == "mmpeft" else peft_loss, batches[0])
        rows.append(row)
    ratios = ratio_rows(rounds, rows, device)
    elapsed = time.perf_counter() - started
    print()
    print(side_table(rows, device))
    print()
    print(ratio_table(ratios))
    print()
    print(f"total {elapsed:.0f} s; load average at end: {loadavg()}")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": command,
                    "environment": env,
                    "setup": setup,
                    "first_losses": {"mmpeft": loss_ours, "peft": loss_theirs, "relative_difference": rel},
                    "rows": rows,
                    "ratios": ratios,
                    "rounds": rounds,
                    "checkpoint": str(model_dir.relative_to(ROOT)) if model_dir.is_relative_to(ROOT) else str(model_dir),
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.out}")


def ratio_rows(rounds: list[dict[str, Any]], rows: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """mmpeft / PEFT per round (median, 95% bootstrap interval), and the memory ratio with its target's verdict."""
    time_ratio = [r["seconds"]["mmpeft"] / r["seconds"]["peft"] for r in rounds]
    by = {row["side"]: row for row in rows}
    out = []

    def add(what: str, values: list[float], target: float | None, note: str = "") -> None:
        low, high = median_ci(values)
        met = verdict(low, high, target, at_most=True) if target is not None else "-"
        out.append({"measure": what, "median": statistics.median(values), "ci95": [low, high], "target": target, "met": met, "note": note})

    add("step time", time_ratio, TARGETS["step time"])
    add("tokens / s", [1 / x for x in time_ratio], None, "same batches, so the inverse of the step-time ratio")
    add("step time, fastest steps", [by["mmpeft"]["step_s_min"] / by["peft"]["step_s_min"]], None, "one value, not a median")
    if device.type == "cuda":
        add("peak memory", [r["peak_bytes"]["mmpeft"] / r["peak_bytes"]["peft"] for r in rounds], TARGETS["peak memory"], "peak allocated during a step")
    else:
        proxy = by["mmpeft"]["saved_activation_bytes"] / by["peft"]["saved_activation_bytes"]
        add("saved activations (CPU memory proxy)", [proxy], TARGETS["peak memory"], "one forward, checkpointing off; not a peak")
        largest = by["mmpeft"]["largest_tensor_bytes"] / by["peft"]["largest_tensor_bytes"]
        add("largest saved tensor (CPU memory proxy)", [largest], None, "the logits")
    return out


def side_table(rows: list[dict[str, Any]], device: torch.device) -> str:
    mem_head = "peak step memory MiB" if device.type == "cuda" else "params+grads+AdamW MiB | saved activations MiB (no ckpt) | largest saved tensor MiB"
    head = f"| side | step s median (min) | real tokens / s | {mem_head} |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        if device.type == "cuda":
            mem = mib(row["peak_bytes_median"])
        else:
            mem = f"{mib(row['state_bytes'])} | {mib(row['saved_activation_bytes'])} | {mib(row['largest_tensor_bytes'])}"
        lines.append(f"| {row['side']} | {row['step_s_median']:.3f} ({row['step_s_min']:.3f}) | {row['tokens_per_s']:.1f} | {mem} |")
    return "\n".join(lines)


def ratio_table(ratios: list[dict[str, Any]]) -> str:
    lines = ["| mmpeft / PEFT | median [95% CI] | target | met | note |", "|---|---|---|---|---|"]
    for r in ratios:
        low, high = r["ci95"]
        target = f"<= {r['target']:.2f}x" if r["target"] is not None else "-"
        lines.append(f"| {r['measure']} | {r['median']:.3f}x [{low:.3f}-{high:.3f}] | {target} | {r['met']} | {r['note']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
