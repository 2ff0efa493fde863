"""Task-conflict quality suite: LoRA, AsymLoRA, LoRA-MoE and MixLoRA at the same number of trainable parameters.

    python benchmarks/conflict_suite/run.py [--check | --quick | --full] [--out results.json]

1. **Base model** (``base.py``): a small LLaVA (text hidden 128, 2 layers; CLIP hidden 64) trained in
   full on general colour / shape / count / position questions, cached in
   ``.cache/mmpeft/conflict_suite/base-<hash>/`` and loaded like any checkpoint.
2. **Data** (``data.py``): five fine-tuning tasks with designed conflicts (the same question wanting
   a digit or a sentence, a colour or a shape), told apart only by their images' domain, written as
   train / val / test WebDataset shards (``ConflictRecipe``, seeds 1, 2, 3).
3. **Adapters** on every linear layer of the language model, sized so that each has the same
   number of trainable parameters within 5% (counted on the real injected NF4 model and printed),
   routing losses at the project's defaults (load balance 0.01, z-loss 0.001), ``alpha = 2 r``,
   dropout 0.05.
4. **Training** through the product: ``MMPeftModule`` (NF4 base with double quantization,
   non-reentrant gradient checkpointing, AdamW, 3% warmup then cosine) + ``ShardDataModule`` +
   ``lightning.Trainer``, in this process. The same steps and batch for every adapter, and the same
   learning-rate search: every LR of the grid trained with seed 0 and scored on the val split;
   the best (mean exact match over tasks) is then trained with every seed and scored on the test
   split.
5. **Score**: greedy answers (``model.evaluation`` with generation on, ``trainer.test``), exact
   match after ``mmpeft.metrics.normalize_answer``, per task and the mean over tasks, as
   ``test/<task>/exact_match`` returns them; reported as mean ± std (and min-max of the mean)
   over seeds. The base model itself (NF4, a LoRA with zero update) is scored the same way.

Modes: ``--check`` (smoke: a briefly trained base, a few steps, tiny splits; for the test),
``--quick`` (the default; under 5 minutes on 2 CPU cores once the base is cached) and ``--full``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from adapter_overhead import loadavg, start_run  # noqa: E402

from benchmarks.conflict_suite.base import BaseSettings, ensure_base  # noqa: E402
from benchmarks.conflict_suite.data import TASKS, ConflictRecipe  # noqa: E402

CACHE = ROOT / ".cache" / "mmpeft" / "conflict_suite"
ADAPTERS = ("lora", "asymlora", "moelora", "mixlora")
PARAM_TOLERANCE = 0.05

# Equal trainable parameters. With the adapters on all 7 linear layers of each decoder layer
# (sum of d_in = sum of d_out = S = 1024 per layer here) the counts per layer are
#   lora      2 r S                  (r = 20:        40 S)
#   asymlora  (r + N r + N) S        (r = 9,  N = 3: 39 S; the router is N x d_in)
#   moelora   (2 E r + E) S          (r = 6,  E = 3: 39 S)
#   mixlora   5 E S                  (E = 8:         40 S; pools E x d_in, E x d_out, two routers
#                                     E x d_in and the condition projection E x d_in; independent of r)
# MixLoRA's rank r (factors chosen per instance) does not change the count; r = 4 of the 8.
ADAPTER_CONFIGS: dict[str, dict[str, Any]] = {
    "lora": {"r": 20, "alpha": 40.0},
    "asymlora": {"r": 9, "alpha": 18.0, "heads": 3},
    "moelora": {"r": 6, "alpha": 12.0, "experts": 3},
    "mixlora": {"r": 4, "alpha": 8.0, "factors": 8},
}


@dataclass(frozen=True)
class Mode:
    base: BaseSettings
    train_per_task: int
    val_per_task: int
    test_per_task: int
    steps: int
    batch: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    max_new_tokens: int = 12


MODES: dict[str, Mode] = {
    "check": Mode(
        BaseSettings(steps=150, pool=1500, held_out=50, warmup=15),
        40,
        6,
        6,
        steps=4,
        batch=8,
        lrs=(1e-3, 3e-3),
        seeds=(0, 1, 2),
    ),
    "quick": Mode(BaseSettings(), 400, 20, 20, steps=60, batch=16, lrs=(3e-3,), seeds=(0, 1, 2)),
    "full": Mode(BaseSettings(), 1500, 40, 80, steps=450, batch=16, lrs=(1e-3, 3e-3, 1e-2), seeds=(0, 1, 2)),
}


def quiet() -> None:
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "mmpeft",
        "mmpeft.data",
        "transformers",
        "bitsandbytes",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def build_splits(mode: Mode, name: str) -> dict[str, Path]:
    from mmpeft.data.build import is_built

    dirs = {}
    for split, per_task, seed in (
        ("train", mode.train_per_task, 1),
        ("val", mode.val_per_task, 2),
        ("test", mode.test_per_task, 3),
    ):
        recipe = ConflictRecipe(samples_per_task=per_task, seed=seed, prefix=split)
        out = CACHE / f"shards-{name}" / split
        if not is_built(out, recipe):
            recipe.build(out, progress=False)
        dirs[split] = out
    return dirs


def module_for(base: Path, adapter: str, lr: float, mode: Mode):
    from mmpeft.adapters import AdapterGroup
    from mmpeft.adapters.routing import RoutingLosses
    from mmpeft.metrics import Evaluation
    from mmpeft.models.backbone import Backbone
    from mmpeft.module import MMPeftModule, Optim

    return MMPeftModule(
        Backbone(pretrained=str(base), quantization="nf4", double_quant=True),
        adapters=[AdapterGroup(name=adapter, targets=["all-linear"], config=dict(ADAPTER_CONFIGS[adapter]))],
        optim=Optim(lr=lr),
        routing=RoutingLosses(),  # the project's defaults
        evaluation=Evaluation(generate=True, max_new_tokens=mode.max_new_tokens),
    )


def trainer(root: Path, steps: int | None = None):
    import lightning as L

    kwargs = dict(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0) if steps else {}
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


def evaluate(module, data, root: Path, stage: str, log: io.StringIO) -> dict[str, float]:
    """``trainer.validate`` or ``trainer.test``: each task's exact match and the mean over tasks (the table the module
    prints goes to ``log``)."""
    with contextlib.redirect_stdout(log):
        (scores,) = (trainer(root).validate if stage == "val" else trainer(root).test)(
            module, datamodule=data, verbose=False
        )
    out = {task: float(scores[f"{stage}/{task}/exact_match"]) for task in TASKS}
    out["mean"] = float(scores[f"{stage}/exact_match"])
    return out


def run_one(
    base: Path,
    dirs: dict[str, Path],
    adapter: str,
    lr: float,
    seed: int,
    mode: Mode,
    stages: tuple[str, ...],
    log: io.StringIO,
    train: bool = True,
) -> dict[str, Any]:
    """Fit one adapter (unless ``train`` is off: the base alone) and score it on ``stages``."""
    import lightning as L

    from mmpeft.data.datamodule import ShardDataModule

    L.seed_everything(seed, verbose=False)
    started = time.perf_counter()
    module = module_for(base, adapter, lr, mode)
    data = ShardDataModule(
        train=str(dirs["train"]),
        val=str(dirs["val"]),
        test=str(dirs["test"]),
        processor=str(base),
        batch_size=mode.batch,
        max_length=96,
        num_workers=0,
        shuffle_buffer=500,
        seed=seed,
    )
    result: dict[str, Any] = {"adapter": adapter, "lr": lr, "seed": seed}
    with tempfile.TemporaryDirectory() as tmp:
        if train:
            fit = trainer(Path(tmp), mode.steps)
            with contextlib.redirect_stdout(log):
                fit.fit(module, datamodule=data)
            result["final_train_loss"] = float(fit.callback_metrics["train/loss"])
            result["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
        result["fit_s"] = round(time.perf_counter() - started, 1)
        for stage in stages:
            result[stage] = evaluate(module, data, Path(tmp), stage, log)
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def run_line(r: dict[str, Any], elapsed: float) -> str:
    """One run's progress line: what was trained, its scores, its final training loss, its time and the suite's so
    far."""
    val = f"val mean {r['val']['mean']:.3f}, " if "val" in r else ""
    return (
        f"{r['adapter']} lr {r['lr']:g} seed {r['seed']}: {val}test mean {r['test']['mean']:.3f}, "
        f"train loss {r['final_train_loss']:.3f} ({r['total_s']} s; {elapsed:.0f} s so far)"
    )


def count_parameters(base: Path) -> dict[str, int]:
    """Trainable parameters of each adapter, counted on the real NF4 model with the adapter injected."""
    from mmpeft.adapters import AdapterGroup, inject_adapters
    from mmpeft.adapters.routing import RoutingContext
    from mmpeft.models.backbone import Backbone, language_model, load_backbone

    counts = {}
    for adapter in ADAPTERS:
        model = load_backbone(Backbone(pretrained=str(base)), torch.device("cpu"))
        inject_adapters(
            language_model(model), [AdapterGroup(name=adapter, config=dict(ADAPTER_CONFIGS[adapter]))], RoutingContext()
        )
        counts[adapter] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def describe(adapter: str) -> str:
    c = ADAPTER_CONFIGS[adapter]
    if adapter == "asymlora":
        return f"r={c['r']}, {c['heads']} heads, token router"
    if adapter == "moelora":
        return f"{c['experts']} experts of r={c['r']}, dense"
    if adapter == "mixlora":
        return f"r={c['r']} of {c['factors']} factors"
    return f"r={c['r']}"


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(report: dict[str, Any]) -> str:
    head = (
        ["adapter", "config", "trainable params", "vs LoRA", "LR chosen (val mean per LR)"]
        + list(TASKS)
        + ["mean ± std", "mean min-max"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = report["base_model"]["test"]
    lines.append(
        "| base (no adapter) | - | 0 | - | - | "
        + " | ".join(f"{base[t]:.3f}" for t in TASKS)
        + f" | {base['mean']:.3f} | - |"
    )
    lora = report["adapters"]["lora"]["trainable_params"]
    for adapter in ADAPTERS:
        a = report["adapters"][adapter]
        tests = [run["test"] for run in a["runs"]]
        search = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in a["lr_search"].items()) or "one LR, no search"
        cells = [
            adapter,
            describe(adapter),
            f"{a['trainable_params']:,}",
            f"{a['trainable_params'] / lora - 1:+.1%}",
            f"{a['chosen_lr']:g} ({search})",
        ]
        cells += [spread([t[task] for t in tests]) for task in TASKS]
        means = [t["mean"] for t in tests]
        cells += [spread(means), f"{min(means):.3f}-{max(means):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--check",
        action="store_const",
        dest="mode",
        const="check",
        help="smoke run (seconds, after a small base build)",
    )
    group.add_argument(
        "--quick",
        action="store_const",
        dest="mode",
        const="quick",
        help="the default: under 5 minutes once the base is cached",
    )
    group.add_argument(
        "--full",
        action="store_const",
        dest="mode",
        const="full",
        help="the full benchmark (under an hour on 2 CPU cores)",
    )
    group.add_argument(
        "--table",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the table of a finished run from its --out JSON, and exit",
    )
    p.add_argument(
        "--out",
        type=Path,
        help=(
            "write the results as JSON here (and the runs' Lightning output beside it, with the suffix .lightning.log)"
        ),
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help=(
            "torch CPU threads "
            "(default 1: on a shared 2-core machine two OpenMP threads stall whenever one is preempted)"
        ),
    )
    args = p.parse_args(argv)
    args.mode = args.mode or ("table" if args.table else "quick")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.table is not None:
        report = json.loads(args.table.read_text())
        for entry in report["adapters"].values():  # JSON object keys are strings
            entry["lr_search"] = {float(lr): v for lr, v in entry["lr_search"].items()}
        print(f"results of: {report['command']} ({report['seconds']['total']:.0f} s)")
        print(table(report))
        return report
    command = "python benchmarks/conflict_suite/run.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    device, env, started = start_run("cpu", args.threads, command)
    quiet()
    mode = MODES[args.mode]
    base, base_info = ensure_base(CACHE, mode.base)
    print(
        f"base model: {base.relative_to(ROOT) if base.is_relative_to(ROOT) else base} "
        f"({'cached' if base_info['cached'] else 'built now'}; "
        f"{base_info['parameters']:,} parameters, {base_info['settings']['steps']} full-training steps "
        f"in {base_info['build_s']} s at build time, "
        f"held-out general-skill exact match {base_info['held_out_general_exact_match']:.3f})",
        flush=True,
    )
    base_s = time.perf_counter() - started
    dirs = build_splits(mode, args.mode)
    counts = count_parameters(base)
    lora = counts["lora"]
    for adapter in ADAPTERS:
        print(
            f"trainable parameters: {adapter} ({describe(adapter)}) {counts[adapter]:,} "
            f"({counts[adapter] / lora - 1:+.2%} vs LoRA)",
            flush=True,
        )
    worst = max(abs(c / lora - 1) for c in counts.values())
    if worst > PARAM_TOLERANCE:
        raise SystemExit(f"trainable parameters differ by {worst:.1%} > {PARAM_TOLERANCE:.0%}: fix ADAPTER_CONFIGS")
    setup = {
        "mode": args.mode,
        "tasks": list(TASKS),
        "train/val/test per task": (mode.train_per_task, mode.val_per_task, mode.test_per_task),
        "steps": mode.steps,
        "batch": mode.batch,
        "lr grid": list(mode.lrs),
        "seeds": list(mode.seeds),
        "max_length": 96,
        "max_new_tokens": mode.max_new_tokens,
        "quantization": "nf4 + double quant",
        "routing_losses": "defaults (load_balance 0.01, z_loss 0.001)",
    }
    print("setup: " + ", ".join(f"{k} {v}" for k, v in setup.items()), flush=True)
    log = io.StringIO()
    report: dict[str, Any] = {
        "command": command,
        "environment": env,
        "setup": setup,
        "base": base_info,
        "param_counts": counts,
        "adapters": {},
    }
    report["base_model"] = run_one(base, dirs, "lora", mode.lrs[0], 0, mode, ("test",), log, train=False)
    print(
        f"base model (no adapter): test mean {report['base_model']['test']['mean']:.3f} "
        f"({report['base_model']['total_s']} s)",
        flush=True,
    )

    total_runs = len(ADAPTERS) * (len(mode.lrs) + len(mode.seeds) - 1)
    done = 0
    for adapter in ADAPTERS:
        search: dict[float, dict[str, Any]] = {}
        for lr in mode.lrs:
            stages = ("val", "test") if len(mode.lrs) > 1 else ("test",)
            search[lr] = run_one(base, dirs, adapter, lr, mode.seeds[0], mode, stages, log)
            done += 1
            print(f"[{done}/{total_runs}] {run_line(search[lr], time.perf_counter() - started)}", flush=True)
        # With one LR there is nothing to choose; otherwise the best val mean (the first of equals).
        chosen = max(mode.lrs, key=lambda lr: search[lr]["val"]["mean"]) if len(mode.lrs) > 1 else mode.lrs[0]
        runs = [search[chosen]]
        for seed in mode.seeds[1:]:
            r = run_one(base, dirs, adapter, chosen, seed, mode, ("test",), log)
            runs.append(r)
            done += 1
            print(f"[{done}/{total_runs}] {run_line(r, time.perf_counter() - started)}", flush=True)
        report["adapters"][adapter] = {
            "config": ADAPTER_CONFIGS[adapter],
            "trainable_params": counts[adapter],
            "lr_search": {lr: search[lr]["val"]["mean"] for lr in mode.lrs} if len(mode.lrs) > 1 else {},
            "lr_search_runs": [search[lr] for lr in mode.lrs],
            "chosen_lr": chosen,
            "runs": runs,
        }
    total = time.perf_counter() - started
    report["seconds"] = {
        "total": round(total, 1),
        "base_model_step": round(base_s, 1),
        "excluding_base_build": round(total - (0 if base_info["cached"] else base_s), 1),
    }
    print()
    print(table(report))
    print()
    print(
        f"total {total:.0f} s (base {'cached' if base_info['cached'] else f'built in {base_s:.0f} s'}); "
        f"load average at end: {loadavg()}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        args.out.with_suffix(".lightning.log").write_text(log.getvalue())
    return report


if __name__ == "__main__":
    main()
