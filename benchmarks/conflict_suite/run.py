"""Task-conflict quality suite: the mixture adapters against LoRA, at equal trainable parameters and at equal rank.

    python benchmarks/conflict_suite/run.py [--check | --quick | --full] [--mixture conflict|format]
        [--vocabulary general|format] [--jobs 2] [--out results.json] [--rows a,b,...] [--lrs 0.003] [--seeds N]

1. **Base model** (``base.py``): a small LLaVA (text hidden 128, 2 layers; CLIP hidden 64) trained in
   full on general colour / shape / count / position questions, cached in
   ``.cache/mmpeft/conflict_suite/base-<hash>/`` and loaded like any checkpoint. Its build is
   deterministic; its fingerprint (SHA-256 of the weights) is printed and stored with every result.
   Each mixture has its base (:data:`VOCABULARY`): the second mixture's general data also answer in
   that mixture's words (French, spelled colours, grid rows and columns); ``--vocabulary general``
   trains it on the first base instead.
2. **Data** (``data.py``): two mixtures of five fine-tuning tasks, told apart only by their images'
   domain. ``conflict`` (the default): the same question wanting a digit or a sentence, a colour or a
   shape. ``format``: the same question wanting English or French, a word or its spelling, and a
   position convention the base's own skill contradicts. Train / val / test WebDataset shards
   (``ConflictRecipe``, seeds 1, 2, 3).
3. **Rows** (:data:`ROWS`): adapters on every linear layer of the language model, ``alpha = 2 r``,
   dropout 0.05, routing losses at the project's defaults (load balance 0.01, z-loss 0.001) unless
   the row says otherwise. :data:`TABLES`: *equal trainable parameters* (each within 5% of LoRA
   r=20, counted on the real injected NF4 model and printed) and *equal rank* (MixLoRA against a
   LoRA of the rank each instance uses, as the MixLoRA paper compares; AsymLoRA and the MASA plugin
   against LoRA of their A's rank).
4. **Training** through the product: ``MMPeftModule`` (NF4 base with double quantization,
   non-reentrant gradient checkpointing, AdamW, 3% warmup then cosine) + ``ShardDataModule`` +
   ``lightning.Trainer``, here or in ``--jobs`` worker processes. The same steps and batch for every
   row, and the same learning-rate search: every LR of the grid trained with the first seed and scored
   on the val split; the best (mean exact match over tasks) is then trained with every other seed, and
   all are scored on the test split.
5. **Score**: greedy answers (``model.evaluation`` with generation on, ``trainer.test``), exact
   match after ``mmpeft.metrics.normalize_answer``, per task and the mean over tasks, as
   ``test/<task>/exact_match`` returns them; reported as mean ± std (and min-max of the mean)
   over seeds, and as the **paired difference from the row's LoRA**: the same seed gives both runs
   the same data order, so the per-seed differences are averaged, with a 95% Student-t interval,
   and the seeds on which the row beat its LoRA are counted. The base model itself (NF4, a LoRA
   with zero update) is scored the same way.

Modes: ``--check`` (smoke: a briefly trained base, a few steps, tiny splits; for the test),
``--quick`` (the default: 60 steps, 5 seeds, one LR) and ``--full`` (450 steps, 5 seeds, LR grid
{1e-3, 3e-3}). ``--rows`` trains other rows (the MixLoRA ablation's) in one table against LoRA r=20.
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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
from benchmarks.conflict_suite.data import FAMILIES, MIXTURES, VOCABULARIES, ConflictRecipe  # noqa: E402

CACHE = ROOT / ".cache" / "mmpeft" / "conflict_suite"
VOCABULARY = {"conflict": "general", "format": "format"}
"""Each mixture's base (``BaseSettings.vocabulary``): the second mixture's base has produced its answer words."""


def base_settings(base: BaseSettings, vocabulary: str) -> BaseSettings:
    """``base`` with ``vocabulary``, its steps and its pool of distinct samples larger by as much as its data has
    more question families, so that each of the seven general families gets as many samples, and as many distinct
    ones, as in the first base (``format``: 4,714 steps, a pool of 25,142)."""
    more = FAMILIES[vocabulary] / FAMILIES["general"]
    return replace(base, vocabulary=vocabulary, steps=int(base.steps * more), pool=int(base.pool * more))


PARAM_TOLERANCE = 0.05


@dataclass(frozen=True)
class Row:
    """One adapter setting the suite trains: a row of its tables."""

    name: str
    adapter: str
    """Registered adapter name."""
    config: dict[str, Any]
    describe: str
    routing: dict[str, Any] = field(default_factory=dict)
    """``RoutingLosses`` fields that differ from the project's defaults."""
    plugin: str | None = None
    """A plugin's source folder under ``plugins/``, registered for this run (as ``pip install`` would)."""
    router_lr: float | None = None
    """The routers' learning rate as a multiple of the run's (``AdapterGroup.router_lr = router_lr * lr``);
    ``None``: the routers train at the run's lr."""


# Equal trainable parameters. With the adapters on all 7 linear layers of each decoder layer
# (sum of d_in = sum of d_out = S = 1024 per layer here) the counts per layer are
#   lora      2 r S                  (r = 20:        40 S)
#   asymlora  (r + N r + N) S        (r = 9,  N = 3: 39 S; the router is N x d_in)
#   moelora   (2 E r + E) S          (r = 6,  E = 3: 39 S)
#   mixlora   5 E S                  (E = 8:         40 S; pools E x d_in, E x d_out, two routers
#                                     E x d_in and the condition projection E x d_in; independent of r)
#   masa      (N r + r + N) S        (r = 9,  N = 3: 39 S; N A's, one B, the router N x d_in)
# MixLoRA's rank r (factors chosen per instance) does not change the count; r = 4 of the 8.
# With router: block, AsymLoRA has one router per block (attention, MLP; 3 x 128 + 3 each) instead of one per
# projection (3 x d_in each), so r = 10 keeps it at equal parameters: (r + N r) S + 2 (3 x 128 + 3) per layer.
ROWS: dict[str, Row] = {
    row.name: row
    for row in (
        Row("lora", "lora", {"r": 20, "alpha": 40.0}, "r=20"),
        Row("asymlora", "asymlora", {"r": 9, "alpha": 18.0, "heads": 3}, "r=9, 3 heads, router per projection"),
        Row(
            "asymlora-block",
            "asymlora",
            {"r": 10, "alpha": 20.0, "heads": 3, "router": "block", "router_bias": True},
            "r=10, 3 heads, router per block (reference)",
        ),
        Row("moelora", "moelora", {"r": 6, "alpha": 12.0, "experts": 3}, "3 experts of r=6, dense"),
        Row("mixlora", "mixlora", {"r": 4, "alpha": 8.0, "factors": 8}, "r=4 of 8 factors"),
        Row(
            "mixlora-r8",
            "mixlora",
            {"r": 8, "alpha": 16.0, "factors": 8},
            "r=8 of 8 factors (every factor, weighted per instance)",
        ),
        Row("masa", "masa", {"r": 9, "alpha": 18.0, "heads": 3}, "3 A's of r=9, one B (plugin)", plugin="mmpeft-masa"),
        # Equal rank (the MixLoRA paper's comparison): LoRA of the rank each instance of MixLoRA / AsymLoRA uses.
        Row("lora-r4", "lora", {"r": 4, "alpha": 8.0}, "r=4"),
        Row("lora-r9", "lora", {"r": 9, "alpha": 18.0}, "r=9"),
        # MixLoRA's ablation (docs/benchmarks.md): one change at a time from its earlier default.
        Row(
            "mixlora-st",
            "mixlora",
            {"r": 4, "alpha": 8.0, "factors": 8, "weighting": "straight_through"},
            "r=4 of 8, straight-through",
        ),
        Row(
            "mixlora-score",
            "mixlora",
            {"r": 4, "alpha": 8.0, "factors": 8, "weighting": "score"},
            "r=4 of 8, score weighting",
        ),
        Row(
            "mixlora-score-noaux",
            "mixlora",
            {"r": 4, "alpha": 8.0, "factors": 8, "weighting": "score"},
            "r=4 of 8, score, no routing losses",
            routing={"load_balance": 0.0, "z_loss": 0.0},
        ),
        Row(
            "mixlora-st-noaux",
            "mixlora",
            {"r": 4, "alpha": 8.0, "factors": 8, "weighting": "straight_through"},
            "r=4 of 8, straight-through, no routing losses",
            routing={"load_balance": 0.0, "z_loss": 0.0},
        ),
        Row(
            "mixlora-score-index",
            "mixlora",
            {"r": 4, "alpha": 8.0, "factors": 8, "weighting": "score", "pairing": "index"},
            "r=4 of 8, score, index pairing",
        ),
        Row(
            "mixlora-st-index",
            "mixlora",
            {"r": 4, "alpha": 8.0, "factors": 8, "weighting": "straight_through", "pairing": "index"},
            "r=4 of 8, straight-through, index pairing",
        ),
        Row(
            "mixlora-score-cond",
            "mixlora",
            {"r": 4, "alpha": 8.0, "factors": 8, "weighting": "score", "condition_in_losses": True},
            "r=4 of 8, score, condition in losses",
        ),
        Row(
            "mixlora-si-noaux",
            "mixlora",
            {"r": 4, "alpha": 8.0, "factors": 8, "weighting": "score", "pairing": "index"},
            "r=4 of 8, score, index pairing, no routing losses",
            routing={"load_balance": 0.0, "z_loss": 0.0},
        ),
        Row(
            "mixlora-si-r6",
            "mixlora",
            {"r": 6, "alpha": 12.0, "factors": 8, "weighting": "score", "pairing": "index"},
            "r=6 of 8, score, index pairing",
        ),
        Row(
            "mixlora-si-r8",
            "mixlora",
            {"r": 8, "alpha": 16.0, "factors": 8, "weighting": "score", "pairing": "index"},
            "r=8 of 8, score, index pairing",
        ),
        Row(
            "mixlora-r4of4",
            "mixlora",
            {"r": 4, "alpha": 8.0, "factors": 4},
            "r=4 of 4 (every factor, half the parameters)",
        ),
        Row(
            "mixlora-score-t2",
            "mixlora",
            {"r": 4, "alpha": 8.0, "factors": 8, "weighting": "score", "temperature": 2.0},
            "r=4 of 8, score, temperature 2",
        ),
        # The routers' learning rate (issue 17), from the defaults (the row mixlora): a multiple of the run's lr.
        *(
            Row(
                f"mixlora-rlr{scale:g}",
                "mixlora",
                {"r": 4, "alpha": 8.0, "factors": 8},
                f"r=4 of 8, router lr {scale:g}x",
                router_lr=scale,
            )
            for scale in (0.1, 10.0, 30.0)
        ),
        *(
            Row(
                f"mixlora-r8-rlr{scale:g}",
                "mixlora",
                {"r": 8, "alpha": 16.0, "factors": 8},
                f"r=8 of 8, router lr {scale:g}x",
                router_lr=scale,
            )
            for scale in (0.1, 10.0, 30.0)
        ),
    )
}

TABLES: dict[str, list[tuple[str, str]]] = {
    "equal trainable parameters": [
        ("asymlora", "lora"),
        ("asymlora-block", "lora"),
        ("moelora", "lora"),
        ("mixlora", "lora"),
        ("mixlora-r8", "lora"),
        ("masa", "lora"),
    ],
    "equal rank": [("mixlora", "lora-r4"), ("asymlora", "lora-r9"), ("masa", "lora-r9")],
}
"""Each table's rows as (row, the LoRA it is compared with); the comparisons pair runs of the same seed."""
EQUAL_PARAMS = "equal trainable parameters"


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
        seeds=(0, 1),
    ),
    "quick": Mode(BaseSettings(), 400, 20, 20, steps=60, batch=16, lrs=(3e-3,), seeds=(0, 1, 2, 3, 4)),
    "full": Mode(BaseSettings(), 1500, 40, 80, steps=450, batch=16, lrs=(1e-3, 3e-3), seeds=(0, 1, 2, 3, 4)),
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
    hf_logging.disable_progress_bar()


def build_splits(mode: Mode, name: str, mixture: str) -> dict[str, Path]:
    from mmpeft.data.build import is_built

    dirs = {}
    for split, per_task, seed in (
        ("train", mode.train_per_task, 1),
        ("val", mode.val_per_task, 2),
        ("test", mode.test_per_task, 3),
    ):
        recipe = ConflictRecipe(mixture=mixture, samples_per_task=per_task, seed=seed, prefix=split)
        suffix = "" if mixture == "conflict" else f"-{mixture}"
        out = CACHE / f"shards-{name}{suffix}" / split
        if not is_built(out, recipe):
            recipe.build(out, progress=False, replace_own_recipe=True)  # the suite's own cache
        dirs[split] = out
    return dirs


def use_plugins(rows: list[Row]) -> None:
    """Register the rows' plugins from their source folders for this process, as an install would: the package
    folder on ``sys.path`` and a dist-info with the entry points of its ``pyproject.toml``."""
    import tomllib

    for folder in sorted({row.plugin for row in rows if row.plugin}):
        source = ROOT / "plugins" / folder
        project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
        site = CACHE / "plugins" / folder
        dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
        dist.mkdir(parents=True, exist_ok=True)
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
        )
        entry_points = "".join(
            f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
            for group, points in project["entry-points"].items()
        )
        (dist / "entry_points.txt").write_text(entry_points)
        for path in (str(source), str(site)):
            if path not in sys.path:
                sys.path.insert(0, path)


def module_for(base: Path, row: Row, lr: float, mode: Mode):
    from mmpeft.adapters import AdapterGroup
    from mmpeft.adapters.routing import RoutingLosses
    from mmpeft.metrics import Evaluation
    from mmpeft.models.backbone import Backbone
    from mmpeft.module import MMPeftModule, Optim

    return MMPeftModule(
        Backbone(pretrained=str(base), quantization="nf4", double_quant=True),
        adapters=[
            AdapterGroup(
                name=row.adapter,
                targets=["all-linear"],
                config=dict(row.config),
                router_lr=None if row.router_lr is None else row.router_lr * lr,
            )
        ],
        optim=Optim(lr=lr),
        routing=RoutingLosses(**row.routing),  # the project's defaults unless the row says otherwise
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


def evaluate(module, data, root: Path, stage: str, tasks: list[str], log: io.StringIO) -> dict[str, float]:
    """``trainer.validate`` or ``trainer.test``: each task's exact match and the mean over tasks (the table the module
    prints goes to ``log``)."""
    with contextlib.redirect_stdout(log):
        (scores,) = (trainer(root).validate if stage == "val" else trainer(root).test)(
            module, datamodule=data, verbose=False
        )
    out = {task: float(scores[f"{stage}/{task}/exact_match"]) for task in tasks}
    out["mean"] = float(scores[f"{stage}/exact_match"])
    return out


@dataclass(frozen=True)
class Job:
    """One training run of the suite: everything a worker process needs."""

    base: Path
    dirs: dict[str, Path]
    tasks: list[str]
    row: Row
    lr: float
    seed: int
    mode: Mode
    stages: tuple[str, ...]
    train: bool = True


def run_one(job: Job) -> dict[str, Any]:
    """Fit one row (unless ``job.train`` is off: the base alone) and score it on ``job.stages``; the runs' Lightning
    output is returned as ``log``."""
    import lightning as L

    from mmpeft.data.datamodule import ShardDataModule

    quiet()
    use_plugins([job.row])
    log = io.StringIO()
    L.seed_everything(job.seed, verbose=False)
    started = time.perf_counter()
    module = module_for(job.base, job.row, job.lr, job.mode)
    data = ShardDataModule(
        train=str(job.dirs["train"]),
        val=str(job.dirs["val"]),
        test=str(job.dirs["test"]),
        processor=str(job.base),
        batch_size=job.mode.batch,
        max_length=96,
        num_workers=0,
        shuffle_buffer=500,
        seed=job.seed,
    )
    result: dict[str, Any] = {"row": job.row.name, "lr": job.lr, "seed": job.seed}
    with tempfile.TemporaryDirectory() as tmp:
        if job.train:
            fit = trainer(Path(tmp), job.mode.steps)
            with contextlib.redirect_stdout(log):
                fit.fit(module, datamodule=data)
            result["final_train_loss"] = float(fit.callback_metrics["train/loss"])
        result["fit_s"] = round(time.perf_counter() - started, 1)
        for stage in job.stages:
            result[stage] = evaluate(module, data, Path(tmp), stage, job.tasks, log)
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["log"] = log.getvalue()
    return result


def worker_start(threads: int) -> None:
    if sys.platform == "linux":  # a worker dies with the suite, never left training alone (PR_SET_PDEATHSIG)
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    torch.set_num_threads(threads)
    quiet()


def run_jobs(jobs: list[Job], workers: int, threads: int, done: Callable[[dict[str, Any]], None]) -> list[dict]:
    """Every job's result, in the jobs' order; ``done`` sees each as it finishes. With ``workers`` > 1 they run in
    that many processes (each with ``threads`` torch threads), else here."""
    if workers <= 1:
        results = []
        for job in jobs:
            results.append(run_one(job))
            done(results[-1])
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
    with ProcessPoolExecutor(workers, mp_context=context, initializer=worker_start, initargs=(threads,)) as pool:
        futures = {pool.submit(run_one, job): i for i, job in enumerate(jobs)}
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            done(future.result())
    return results  # type: ignore[return-value]


def run_line(r: dict[str, Any], elapsed: float) -> str:
    """One run's progress line: what was trained, its scores, its final training loss, its time and the suite's so
    far."""
    val = f"val mean {r['val']['mean']:.3f}, " if "val" in r else ""
    return (
        f"{r['row']} lr {r['lr']:g} seed {r['seed']}: {val}test mean {r['test']['mean']:.3f}, "
        f"train loss {r['final_train_loss']:.3f} ({r['total_s']} s; {elapsed:.0f} s so far)"
    )


def count_parameters(base: Path, rows: list[Row]) -> dict[str, int]:
    """Trainable parameters of each row's adapter, counted on the real NF4 model with the adapter injected."""
    from mmpeft.adapters import AdapterGroup, inject_adapters
    from mmpeft.adapters.routing import RoutingContext
    from mmpeft.models.backbone import Backbone, language_model, load_backbone

    use_plugins(rows)
    counts = {}
    for row in rows:
        model = load_backbone(Backbone(pretrained=str(base)), torch.device("cpu"))
        inject_adapters(
            language_model(model), [AdapterGroup(name=row.adapter, config=dict(row.config))], RoutingContext()
        )
        counts[row.name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Student's t, 97.5% quantile, by degrees of freedom: the two-sided 95% interval of a mean over a few seeds."""


def paired(values: list[float], baseline: list[float]) -> dict[str, float]:
    """The mean of the per-seed differences ``values - baseline`` with its 95% t-interval, and the seeds won."""
    diffs = [v - b for v, b in zip(values, baseline, strict=True)]
    mean = statistics.mean(diffs)
    half = T_975[len(diffs) - 1] * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "won": sum(d > 0 for d in diffs), "n": len(diffs)}


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def seed_means(entry: dict[str, Any]) -> dict[int, float]:
    return {run["seed"]: run["test"]["mean"] for run in entry["runs"]}


def table(report: dict[str, Any], title: str) -> str:
    """One of :data:`TABLES`: the base, each baseline and each row with its per-task scores (mean ± std over seeds)
    and its difference from its baseline, paired by seed, with a 95% interval."""
    tasks = report["setup"]["tasks"]
    rows = report["rows"]
    head = ["row", "config", "trainable params", "vs its LoRA", "LR chosen (val mean per LR)", *tasks]
    head += ["mean ± std", "mean min-max", "Δ vs its LoRA [95% CI], seeds won"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = report["base_model"]["test"]
    cells = ["base (no adapter)", "-", "0", "-", "-", *(f"{base[t]:.3f}" for t in tasks), f"{base['mean']:.3f}"]
    lines.append("| " + " | ".join(cells + ["-", "-"]) + " |")
    order: list[tuple[str, str | None]] = []
    for name, baseline in report["tables"][title]:
        if baseline in rows and baseline not in [n for n, _ in order]:
            order.append((baseline, None))
        if name in rows:
            order.append((name, baseline if baseline in rows else None))
    for name, baseline in order:
        a = rows[name]
        tests = [run["test"] for run in a["runs"]]
        search = ", ".join(f"{float(lr):g}: {v:.3f}" for lr, v in a["lr_search"].items()) or "one LR, no search"
        params = a["trainable_params"]
        ratio = f"{params / rows[baseline]['trainable_params'] - 1:+.1%}" if baseline else "-"
        means = [t["mean"] for t in tests]
        cells = [name, a["describe"], f"{params:,}", ratio, f"{a['chosen_lr']:g} ({search})"]
        cells += [spread([t[task] for t in tests]) for task in tasks]
        cells += [spread(means), f"{min(means):.3f}-{max(means):.3f}"]
        if baseline:
            mine, theirs = seed_means(a), seed_means(rows[baseline])
            common = sorted(set(mine) & set(theirs))
            d = paired([mine[s] for s in common], [theirs[s] for s in common])
            cells.append(f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], {d['won']}/{d['n']}")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return f"**{title}**\n\n" + "\n".join(lines)


def tables(report: dict[str, Any]) -> str:
    return "\n\n".join(table(report, title) for title in report["tables"])


def rows_of(names: list[str]) -> list[Row]:
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)} (known: {', '.join(ROWS)})")
    return [ROWS[n] for n in names]


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
        help="the default: a few minutes once the base is cached",
    )
    group.add_argument(
        "--full",
        action="store_const",
        dest="mode",
        const="full",
        help="the full benchmark (about an hour per mixture on 2 CPU cores with --jobs 2)",
    )
    group.add_argument(
        "--table",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the tables of a finished run from its --out JSON, and exit",
    )
    p.add_argument("--mixture", choices=sorted(MIXTURES), default="conflict", help="which five tasks (data.py)")
    p.add_argument(
        "--rows",
        help=(
            "comma-separated rows to train instead of the tables' rows (e.g. the MixLoRA ablation's; "
            "the rows: " + ", ".join(ROWS) + ")"
        ),
    )
    p.add_argument(
        "--vocabulary",
        choices=VOCABULARIES,
        help="the base's general answer vocabulary (default: the mixture's, VOCABULARY; general = the first base)",
    )
    p.add_argument("--lrs", help="comma-separated learning rates instead of the mode's grid")
    p.add_argument("--seeds", type=int, help="the first N seeds instead of the mode's")
    p.add_argument(
        "--out",
        type=Path,
        help=(
            "write the results as JSON here (and the runs' Lightning output beside it, with the suffix .lightning.log)"
        ),
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help=(
            "torch CPU threads per run "
            "(default 1: on a shared 2-core machine two OpenMP threads stall whenever one is preempted)"
        ),
    )
    args = p.parse_args(argv)
    args.mode = args.mode or ("table" if args.table else "quick")
    return args


def table_rows() -> list[str]:
    names: list[str] = []
    for pairs in TABLES.values():
        for name, baseline in pairs:
            names += [n for n in (baseline, name) if n not in names]
    return names


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.table is not None:
        report = json.loads(args.table.read_text())
        print(f"results of: {report['command']} ({report['seconds']['total']:.0f} s)")
        print(tables(report))
        return report
    command = "python benchmarks/conflict_suite/run.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    device, env, started = start_run("cpu", args.threads, command)
    quiet()
    mode = MODES[args.mode]
    if args.lrs:
        mode = replace(mode, lrs=tuple(float(v) for v in args.lrs.split(",")))
    if args.seeds:
        mode = replace(mode, seeds=tuple(range(args.seeds)))
    mode = replace(mode, base=base_settings(mode.base, args.vocabulary or VOCABULARY[args.mixture]))
    rows = rows_of(args.rows.split(",") if args.rows else table_rows())
    tasks = list(MIXTURES[args.mixture])
    base, base_info = ensure_base(CACHE, mode.base)
    by_skill = ", ".join(f"{k} {v:.2f}" for k, v in base_info.get("held_out_by_skill", {}).items())
    print(
        f"base model: {base.relative_to(ROOT) if base.is_relative_to(ROOT) else base} "
        f"({'cached' if base_info['cached'] else 'built now'}; fingerprint {base_info.get('fingerprint', '-')}; "
        f"{base_info['parameters']:,} parameters, {base_info['settings']['steps']} full-training steps "
        f"in {base_info['build_s']} s at build time, "
        f"held-out general-skill exact match {base_info['held_out_general_exact_match']:.3f}"
        + (f": {by_skill}" if by_skill else "")
        + ")",
        flush=True,
    )
    base_s = time.perf_counter() - started
    dirs = build_splits(mode, args.mode, args.mixture)
    counts = count_parameters(base, rows)
    lora = counts.get("lora")
    for row in rows:
        versus = f" ({counts[row.name] / lora - 1:+.2%} vs LoRA r=20)" if lora else ""
        print(f"trainable parameters: {row.name} ({row.describe}) {counts[row.name]:,}{versus}", flush=True)
    equal = [name for name, _ in TABLES[EQUAL_PARAMS] if name in counts]
    worst = max((abs(counts[n] / lora - 1) for n in equal), default=0.0) if lora else 0.0
    if worst > PARAM_TOLERANCE:
        raise SystemExit(f"trainable parameters differ by {worst:.1%} > {PARAM_TOLERANCE:.0%}: fix ROWS")
    setup = {
        "mode": args.mode,
        "mixture": args.mixture,
        "tasks": tasks,
        "train/val/test per task": (mode.train_per_task, mode.val_per_task, mode.test_per_task),
        "steps": mode.steps,
        "batch": mode.batch,
        "lr grid": list(mode.lrs),
        "seeds": list(mode.seeds),
        "max_length": 96,
        "max_new_tokens": mode.max_new_tokens,
        "quantization": "nf4 + double quant",
        "routing_losses": "defaults (load_balance 0.01, z_loss 0.001) unless the row says otherwise",
        "base vocabulary": mode.base.vocabulary,
        "base fingerprint": base_info.get("fingerprint"),
        "jobs": args.jobs,
    }
    print("setup: " + ", ".join(f"{k} {v}" for k, v in setup.items()), flush=True)
    logs: list[str] = []
    report: dict[str, Any] = {
        "command": command,
        "environment": env,
        "setup": setup,
        "base": base_info,
        "param_counts": counts,
        "rows": {},
    }

    def job(row: Row, lr: float, seed: int, stages: tuple[str, ...], train: bool = True) -> Job:
        return Job(base, dirs, tasks, row, lr, seed, mode, stages, train)

    (report["base_model"],) = run_jobs([job(ROWS["lora"], mode.lrs[0], 0, ("test",), train=False)], 1, 1, logs_of(logs))
    print(
        f"base model (no adapter): test mean {report['base_model']['test']['mean']:.3f} "
        f"({report['base_model']['total_s']} s)",
        flush=True,
    )
    total_runs = len(rows) * (len(mode.lrs) + len(mode.seeds) - 1)
    count = [0]

    def done(result: dict[str, Any]) -> None:
        logs_of(logs)(result)
        count[0] += 1
        print(f"[{count[0]}/{total_runs}] {run_line(result, time.perf_counter() - started)}", flush=True)

    # The learning-rate search (seed 0, scored on val when there is a choice), then the other seeds at the chosen LR.
    stages = ("val", "test") if len(mode.lrs) > 1 else ("test",)
    search_jobs = [job(row, lr, mode.seeds[0], stages) for row in rows for lr in mode.lrs]
    searched = run_jobs(search_jobs, args.jobs, args.threads, done)
    search = {(r["row"], r["lr"]): r for r in searched}
    chosen = {
        row.name: max(mode.lrs, key=lambda lr: search[row.name, lr]["val"]["mean"])
        if len(mode.lrs) > 1
        else mode.lrs[0]
        for row in rows  # the best val mean (the first of equals)
    }
    seeds = run_jobs(
        [job(row, chosen[row.name], seed, ("test",)) for row in rows for seed in mode.seeds[1:]],
        args.jobs,
        args.threads,
        done,
    )
    for row in rows:
        report["rows"][row.name] = {
            "adapter": row.adapter,
            "config": row.config,
            "routing": row.routing,
            "router_lr": row.router_lr,
            "describe": row.describe,
            "trainable_params": counts[row.name],
            "lr_search": {lr: search[row.name, lr]["val"]["mean"] for lr in mode.lrs} if len(mode.lrs) > 1 else {},
            "lr_search_runs": [search[row.name, lr] for lr in mode.lrs],
            "chosen_lr": chosen[row.name],
            "runs": [search[row.name, chosen[row.name]]] + [r for r in seeds if r["row"] == row.name],
        }
    # The tables whose rows ran; an ablation's rows (--rows) in one table against LoRA r=20.
    report["tables"] = {t: p for t, p in TABLES.items() if any(n in counts and b in counts for n, b in p)}
    if args.rows:
        report["tables"] = {"rows": [(n, "lora") for n in report["rows"] if n != "lora"]}
    total = time.perf_counter() - started
    report["seconds"] = {
        "total": round(total, 1),
        "base_model_step": round(base_s, 1),
        "excluding_base_build": round(total - (0 if base_info["cached"] else base_s), 1),
    }
    print()
    print(tables(report))
    print()
    print(
        f"total {total:.0f} s (base {'cached' if base_info['cached'] else f'built in {base_s:.0f} s'}); "
        f"load average at end: {loadavg()}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        args.out.with_suffix(".lightning.log").write_text("".join(logs))
    return report


def logs_of(logs: list[str]) -> Callable[[dict[str, Any]], None]:
    """A ``done`` callback that moves a result's Lightning output into ``logs``."""

    def keep(result: dict[str, Any]) -> None:
        logs.append(result.pop("log", ""))

    return keep


if __name__ == "__main__":
    main()
