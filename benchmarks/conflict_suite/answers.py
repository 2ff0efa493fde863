"""The generated answers of one conflict-suite run, kept: which references a row gets wrong, and what it says instead.

    python benchmarks/conflict_suite/answers.py [--quick | --full] [--mixture conflict|format] [--row lora]
        [--lr 0.003] [--seed 0] [--tasks colour_fr,...]

Trains the row once as ``run.py`` does (the same base, splits, data order and steps for the seed:
``run.run_one``) and scores the test split, keeping every greedy answer the module scores. Prints
each task's exact match and its misses grouped by reference, ``reference -> answer count, ...``
(after ``mmpeft.metrics.normalize_answer``), the evidence a ceiling in the suite's tables needs
(docs/benchmarks.md, the second mixture's ``colour_fr``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.conflict_suite import run  # noqa: E402
from mmpeft.metrics import TaskMetrics, normalize_answer  # noqa: E402


@contextlib.contextmanager
def kept_answers() -> Iterator[list[tuple[str, str, int]]]:
    """Every ``(answer, first reference, task id)`` that :meth:`TaskMetrics.update_answers` scores inside the block."""
    kept: list[tuple[str, str, int]] = []
    scored = TaskMetrics.update_answers

    def update_answers(self, answers, references, task_ids) -> None:
        kept.extend(zip(answers, (r[0] for r in references), task_ids.tolist()))
        scored(self, answers, references, task_ids)

    TaskMetrics.update_answers = update_answers
    try:
        yield kept
    finally:
        TaskMetrics.update_answers = scored


def misses(kept: list[tuple[str, str, int]], tasks: list[str]) -> dict[str, dict[str, collections.Counter]]:
    """task -> reference -> the normalised wrong answers given for it, counted."""
    out: dict[str, dict[str, collections.Counter]] = {}
    for answer, reference, task in kept:
        got, want = normalize_answer(answer), normalize_answer(reference)
        if got != want:
            out.setdefault(tasks[task], {}).setdefault(want, collections.Counter())[got] += 1
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = p.add_mutually_exclusive_group()
    for mode in ("check", "quick", "full"):
        group.add_argument(f"--{mode}", action="store_const", dest="mode", const=mode)
    p.set_defaults(mode="quick")
    p.add_argument("--mixture", choices=sorted(run.MIXTURES), default="conflict")
    p.add_argument("--row", choices=sorted(run.ROWS), default="lora")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", help="comma-separated: only these tasks' misses (default all)")
    args = p.parse_args(argv)
    mode = run.MODES[args.mode]
    mode = replace(mode, base=run.base_settings(mode.base, run.VOCABULARY[args.mixture]))
    base, _ = run.ensure_base(run.CACHE, mode.base)
    tasks = list(run.MIXTURES[args.mixture])
    job = run.Job(base, run.build_splits(mode, args.mode, args.mixture), tasks, run.ROWS[args.row], args.lr,
                  args.seed, mode, ("test",))  # fmt: skip
    with kept_answers() as kept:
        result = run.run_one(job)
    shown = args.tasks.split(",") if args.tasks else tasks
    wrong = misses(kept, tasks)
    for task in shown:
        print(f"{task}: exact match {result['test'][task]:.4f}")
        for reference, answers in sorted(wrong.get(task, {}).items()):
            print(f"  {reference} -> " + ", ".join(f"{a!r} {n}" for a, n in answers.most_common()))


if __name__ == "__main__":
    main()
