"""``python -m mmpeft data build|inspect``: make shards with a recipe, and look inside shards before training.

python -m mmpeft data build synthetic --out DIR --samples 2000
python -m mmpeft data build llava --src llava_instruct_150k.json --images coco/train2017 --out DIR
python -m mmpeft data inspect DIR --processor llava-hf/llava-1.5-7b-hf --max_length 2048
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mmpeft import registry
from mmpeft.errors import ConfigError, DataError
from mmpeft.flags import ArgumentParser, json_parser, parse

log = logging.getLogger("mmpeft.data")
EXAMPLES = 3
"""Keys listed per skip reason in the inspect report."""
PERCENTILES = (50, 90, 95, 99)


def cmd_build(argv: list[str]) -> int:
    from jsonargparse import set_parsing_settings

    names = [row.name for row in registry.describe(registry.DATA_RECIPES)]
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: python -m mmpeft data build RECIPE --out DIR [recipe options]\nrecipes: {', '.join(names)}\n"
            "(python -m mmpeft data build RECIPE --help lists a recipe's options)"
        )
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    cls = registry.load(registry.DATA_RECIPES, name)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = json_parser(
        prog=f"python -m mmpeft data build {name}", description=(cls.__doc__ or "").strip().splitlines()[0]
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory (an interrupted build there is resumed; a folder holding another data set is refused)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the data set in --out (its index and its shards named like this build's; other files stay)",
    )
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    parser.add_class_arguments(cls, nested_key=None, as_group=False)
    args = parse(parser, rest).as_dict()  # --samples-per-shard or --samples_per_shard
    out, progress, overwrite = args.pop("out"), args.pop("progress"), args.pop("overwrite")
    args.pop("__path__", None)
    recipe = registry.build_config(cls, args, f"data build {name}")
    index = recipe.build(out, progress=progress, overwrite=overwrite)
    bad = index.get("bad_records", {})
    print(
        f"{out}: {len(index['shards'])} shard(s), {index['samples']} samples, {index.get('bytes', 0) / 2**20:.1f} MiB, "
        f"tasks: {', '.join(f'{t} {n}' for t, n in index['samples_per_task'].items())}"
        + (
            f"; {bad['count']} bad record(s) left out: {bad['by_reason']} (listed in {Path(out) / 'dataset.json'})"
            if bad.get("count")
            else ""
        )
    )
    return 0


class _AnyTask(dict):
    """A task vocabulary that takes every task it is asked about (``inspect`` without an index)."""

    def __contains__(self, task: object) -> bool:
        return True

    def __missing__(self, task: str) -> int:
        self[task] = len(self)
        return self[task]


def inspect_shards(
    spec: str,
    processor: str | None = None,
    max_length: int = 1024,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Read every sample of ``spec`` (a shard directory, pattern or glob) and describe what training would see."""
    import webdataset as wds

    from mmpeft.data.datamodule import resolve_source
    from mmpeft.data.encode import ChatEncoder
    from mmpeft.data.sample import SampleError, parse_sample
    from mmpeft.data.stream import shard_problem

    source, tasks = resolve_source(spec, "data inspect", allow_damaged=True)
    encoder = None
    if processor:
        from mmpeft.models.backbone import load_processor

        encoder = ChatEncoder(load_processor(processor, trust_remote_code), tasks or [], max_length)
        if not tasks:
            encoder.task_ids = _AnyTask()
    per_task: Counter[str] = Counter()
    images: Counter[int] = Counter()
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    lengths: dict[str, list[int]] = defaultdict(list)
    truncated = read = usable = 0
    bad_shards: list[str] = []
    read_from: Counter[str] = Counter()

    def bad_shard(exc: Exception) -> bool:
        bad_shards.append(shard_problem(exc))
        return True

    def skip(reason: str, raw: dict[str, Any]) -> None:
        skipped[reason] += 1
        if len(examples[reason]) < EXAMPLES:
            examples[reason].append(f"{Path(str(raw.get('__url__'))).name}:{raw.get('__key__')}")

    known = [s.samples for s in source.shards]
    total = sum(known) if None not in known else None
    columns = (TextColumn("[bold]inspect[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        bar_task = bar.add_task("samples", total=total)
        for raw in wds.tarfile_samples(({"url": s.url} for s in source.shards), handler=bad_shard):
            bar.advance(bar_task)
            read += 1
            read_from[str(raw.get("__url__"))] += 1
            try:
                sample = parse_sample(raw)
            except SampleError as exc:
                skip(exc.reason, raw)
                continue
            images[len(sample.images)] += 1
            per_task[sample.task] += 1
            try:
                if tasks and sample.task not in tasks:
                    raise SampleError("unknown_task", f"{sample.task!r} is not in the index's task vocabulary")
                if encoder is not None:
                    item = encoder.encode(sample)
                    lengths[sample.task].append(item["length"])
                    truncated += item["length"] > max_length
            except SampleError as exc:
                skip(exc.reason, raw)
                if exc.length is not None:
                    lengths[sample.task].append(exc.length)
                continue
            usable += 1
    for shard in source.shards:  # what a damaged shard lacks would be dropped too (training counts it so)
        lost = (shard.samples or 0) - read_from[shard.url] if shard.damaged is not None else 0
        if lost > 0:
            skipped["damaged_shard"] += lost
            if len(examples["damaged_shard"]) < EXAMPLES:
                examples["damaged_shard"].append(f"{Path(shard.url).name} ({lost} missing)")
    index_counts = Counter()
    for shard in source.shards:
        index_counts.update(dict(shard.tasks))

    def stats(values: list[int]) -> dict[str, float]:
        if not values:
            return {}
        cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
        return {**{f"p{p}": cuts[p - 1] for p in PERCENTILES}, "max": max(values), "mean": statistics.fmean(values)}

    all_lengths = [n for values in lengths.values() for n in values]
    return {
        "source": spec,
        "shards": len(source.shards),
        "samples_read": read,
        "usable": usable,
        "samples_per_task": dict(sorted(per_task.items())),
        "index_samples_per_task": dict(sorted(index_counts.items())) if total is not None else None,
        "images_per_sample": {str(k): v for k, v in sorted(images.items())},
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "unreadable_shards": bad_shards,
        "damaged_shards": [shard.damaged for shard in source.shards if shard.damaged is not None],
        "tokens": None
        if encoder is None
        else {
            "max_length": max_length,
            "truncated": truncated,
            "all": stats(all_lengths),
            "per_task": {t: stats(v) for t, v in sorted(lengths.items())},
        },
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(
        f"[bold]{report['source']}[/bold]: {report['shards']} shard(s), {report['samples_read']} samples read, "
        f"{report['usable']} usable"
    )
    table = Table("task", "samples", "in the index", title="samples per task")
    index = report["index_samples_per_task"] or {}
    for task in sorted(set(report["samples_per_task"]) | set(index)):
        n, listed = report["samples_per_task"].get(task, 0), index.get(task)
        mark = "" if listed is None or listed == n else " [red](differs)[/red]"
        table.add_row(task, str(n), ("-" if listed is None else str(listed)) + mark)
    console.print(table)
    console.print("images per sample: " + ", ".join(f"{k}: {v}" for k, v in report["images_per_sample"].items()))
    tokens = report["tokens"]
    if tokens:
        table = Table(
            "task",
            *(f"p{p}" for p in PERCENTILES),
            "max",
            "mean",
            title=f"tokens per sample (max_length {tokens['max_length']})",
        )
        for task, s in [*tokens["per_task"].items(), ("all", tokens["all"])]:
            if s:
                table.add_row(task, *(f"{s[f'p{p}']:.0f}" for p in PERCENTILES), str(s["max"]), f"{s['mean']:.1f}")
        console.print(table)
        console.print(f"truncated to max_length (cut after the images): {tokens['truncated']}")
    if report["skipped"]:
        table = Table("would be dropped", "samples", "e.g. (shard:key)", title="dropped samples")
        for reason, n in report["skipped"].items():
            table.add_row(reason, str(n), ", ".join(report["skipped_examples"].get(reason, [])))
        console.print(table)
    else:
        console.print(
            "no sample would be dropped" + ("" if tokens else " (without --processor, token lengths are not checked)")
        )
    for problem in report["damaged_shards"]:
        console.print(f"[red]damaged shard[/red]: {problem}", soft_wrap=True, highlight=False)
    for problem in report["unreadable_shards"]:
        console.print(f"[red]unreadable shard[/red]: {problem}", soft_wrap=True, highlight=False)


def cmd_inspect(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="python -m mmpeft data inspect",
        description=(
            "Describe shards: samples per task, images per sample, token lengths, what training would drop and why."
        ),
    )
    parser.add_argument("source", help="shard directory (with dataset.json), brace pattern or glob")
    parser.add_argument(
        "--processor", help="checkpoint (local folder or hub name) whose processor measures token lengths"
    )
    parser.add_argument("--max-length", type=int, default=1024, help="data.max_length to check against (default 1024)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the processor's repository"
    )
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parse(parser, argv)  # --max-length or --max_length
    report = inspect_shards(args.source, args.processor, args.max_length, args.trust_remote_code, args.progress)
    print_report(report, Console())
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    problems = report["damaged_shards"] + report["unreadable_shards"]
    if problems:
        more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
        raise DataError(
            f"data inspect {args.source}: {len(problems)} damaged or unreadable shard(s): {problems[0]}{more}"
        )
    return 0


def cmd_data(argv: list[str]) -> int:
    commands = {"build": cmd_build, "inspect": cmd_inspect}
    if not argv or argv[0] not in commands:
        print(
            "usage: python -m mmpeft data {build,inspect} ...\n"
            "  build RECIPE --out DIR ...   make shards with a data recipe\n"
            "  inspect DIR [--processor P]   what is in shards, and what training would drop"
        )
        if argv and argv[0] not in ("-h", "--help"):
            raise ConfigError(f"unknown data command {argv[0]!r}; use one of: {', '.join(commands)}")
        return 0 if argv else 2
    return commands[argv[0]](argv[1:])
