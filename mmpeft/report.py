"""``python -m mmpeft report RUN_DIR``: one self-contained HTML page of a run, for people who do not run TensorBoard.

The page is built from the run's TensorBoard event files (read with TensorBoard's own
``EventAccumulator``) and the ``config.yaml`` beside them: loss curves, a table of each
task's training loss and validation metrics (last and best), the latest task x expert
routing heatmaps, routing entropy, throughput and memory, and the config. Images are PNGs
inlined as ``data:`` URIs, so the page is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import datetime
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmpeft.errors import ConfigError
from mmpeft.files import atomic_file, refuse_output_over_inputs

EVENTS = "events.out.tfevents.*"
LOWER_IS_BETTER = frozenset({"loss", "error", "err", "perplexity", "ppl", "wer", "cer", "ter", "mae", "mse", "rmse"})
"""Words that make a metric better when lower (``val/loss``, ``val/caption/wer``); any other metric is better higher."""


def lower_is_better(tag: str) -> bool:
    """Whether the metric a tag ends with (``val/vqa/exact_match`` -> ``exact_match``) improves by going down."""
    words = re.split(r"[^a-z0-9]+", tag.rsplit("/", 1)[-1].lower())
    return any(word in LOWER_IS_BETTER for word in words)


def best_point(tag: str, points: Sequence[tuple[int, float]]) -> tuple[int, float]:
    """The ``(step, value)`` of ``points`` that is best for ``tag`` (the first such, on ties)."""
    sign = 1 if lower_is_better(tag) else -1
    return min(points, key=lambda p: sign * p[1])


@dataclass
class Run:
    """What a run's event files hold."""

    path: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """``tag -> [(step, value), ...]`` in step order."""
    images: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    """``tag -> (step, PNG bytes)`` of the latest image."""
    wall: tuple[float, float] | None = None
    """The first and last event's wall-clock time (seconds since the epoch)."""
    config: str | None = None
    """The ``config.yaml`` LightningCLI saved beside the events."""


def read_run(run_dir: str | Path) -> Run:
    """Every scalar and the latest image of each tag in ``run_dir``'s event files; ConfigError naming the folder if it
    has none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"report: run directory {str(path)!r} does not exist")
    if not any(path.glob(EVENTS)):
        runs = sorted(str(p.parent) for p in path.glob(f"*/{EVENTS}"))
        hint = f"; runs below it: {', '.join(dict.fromkeys(runs))}" if runs else ""
        raise ConfigError(
            f"report: {str(path)!r} holds no TensorBoard event file ({EVENTS}); "
            f"give a run's log directory, e.g. runs/demo/version_0{hint}"
        )
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 1, "tensors": 1, "histograms": 1})
    accumulator.Reload()
    tags = accumulator.Tags()
    run = Run(path)
    times = []
    for tag in tags["scalars"]:
        events = accumulator.Scalars(tag)
        run.scalars[tag] = [(e.step, e.value) for e in events]
        times += [events[0].wall_time, events[-1].wall_time]
    for tag in tags["images"]:
        event = accumulator.Images(tag)[-1]
        run.images[tag] = (event.step, event.encoded_image_string)
    run.wall = (min(times), max(times)) if times else None
    config = path / "config.yaml"
    run.config = config.read_text(encoding="utf-8") if config.is_file() else None
    return run


# -- the page ---------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; } \
td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; } small { color: #666; }
img { max-width: 100%; display: block; margin: 1em 0; } pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
.meta { color: #555; }
"""


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _chart(run: Run, tags: Sequence[str], title: str, ylabel: str, strip: str = "") -> str:
    from mmpeft import plots

    series = {tag.removeprefix(strip): tuple(zip(*run.scalars[tag])) for tag in tags if run.scalars.get(tag)}
    if not series:
        return ""
    return _img(plots.png(plots.line_chart(series, title, ylabel)), title)


def _matching(run: Run, pattern: str) -> list[str]:
    return sorted(tag for tag in run.scalars if re.fullmatch(pattern, tag))


ALL = "all tasks"
TASK_LOSS = "train/loss/"
"""The prefix of each task's training loss, ``train/loss/<task>``: the task is the rest of the tag."""
TASK_METRIC = re.compile(r"val/(?P<task>.+)/(?P<metric>[^/]+)", re.DOTALL)
"""``val/<task>/<metric>``: metric names hold no ``/``, so the task is everything between ``val/`` and the last ``/``,
slashes and all."""


def _task_losses(run: Run) -> list[str]:
    return sorted(tag for tag in run.scalars if tag.startswith(TASK_LOSS) and len(tag) > len(TASK_LOSS))


def task_table(run: Run) -> tuple[list[str], list[str], dict[tuple[str, str], list[tuple[int, float]]]]:
    """Rows (tasks, then ``all tasks`` for the ``val/<metric>`` values), columns (``train loss`` and each validation
    metric), and each cell's points.

    A task's name is read from its tags as it was written, whatever it holds (``/`` too, see :data:`TASK_METRIC`).
    """
    cells: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for tag in _task_losses(run):
        cells[(tag.removeprefix(TASK_LOSS), "train loss")] = run.scalars[tag]
    for tag in sorted(run.scalars):
        match = TASK_METRIC.fullmatch(tag)
        if match:
            cells[(match["task"], match["metric"])] = run.scalars[tag]
    for tag in _matching(run, r"val/[^/]+"):
        cells[(ALL, tag.split("/")[1])] = run.scalars[tag]
    tasks = sorted({task for task, _ in cells if task != ALL}) + ([ALL] if any(t == ALL for t, _ in cells) else [])
    metrics = sorted({m for _, m in cells}, key=lambda m: (m != "train loss", m != "loss", m))
    return tasks, metrics, cells


def _task_table_html(run: Run) -> str:
    tasks, metrics, cells = task_table(run)
    if not tasks:
        return "<p>No per-task values were logged.</p>"
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    rows = []
    for task in tasks:
        tds = []
        for metric in metrics:
            points = cells.get((task, metric))
            if not points:
                tds.append("<td></td>")
                continue
            text = f"{points[-1][1]:.4g}"
            if metric != "train loss":
                step, best = best_point(metric, points)
                text += f"<br><small>best {best:.4g} @ {step}</small>"
            tds.append(f"<td>{text}</td>")
        rows.append(f"<tr><td>{html.escape(task)}</td>{''.join(tds)}</tr>")
    return (
        f'<table class="tasks"><tr><th>task</th>{head}</tr>{"".join(rows)}</table>'
        "<p><small>Validation cells: the last value, and the best with its step "
        "(lower is better for losses and error rates). "
        "Train loss: the last logged mean over the steps since the log before it.</small></p>"
    )


def _routing_html(run: Run) -> str:
    parts = []
    heatmaps = sorted(tag for tag in run.images if tag.startswith("routing/") and tag.endswith("/task_expert"))
    for tag in heatmaps:
        step, data = run.images[tag]
        group = tag.removeprefix("routing/").removesuffix("/task_expert")
        parts.append(
            f"<h3>{html.escape(group)}</h3>"
            f"<p>Mean gate of each task's tokens for each expert, validation at step {step}.</p>"
        )
        parts.append(_img(data, f"{group} task x expert"))
    entropy = _matching(run, r"routing/.+/entropy")
    parts.append(_chart(run, entropy, "router entropy / log(experts)", "entropy", strip="routing/"))
    return "".join(parts) if heatmaps or entropy else "<p>No mixture adapter: nothing was routed.</p>"


def _overview(run: Run) -> str:
    steps = max((s for points in run.scalars.values() for s, _ in points), default=0)
    facts = [f"last logged step {steps}"]
    if run.wall:
        facts.append(f"{datetime.timedelta(seconds=round(run.wall[1] - run.wall[0]))} from first to last value")
    for tag, label, unit in (
        ("train/tokens_per_sec", "tokens/s", ""),
        ("train/samples_per_sec", "samples/s", ""),
        ("train/peak_memory_gib", "peak memory", " GiB"),
    ):
        if run.scalars.get(tag):
            facts.append(f"{label} {run.scalars[tag][-1][1]:,.4g}{unit} (last)")
    return f'<p class="meta">{html.escape(" · ".join(facts))}</p>'


def render(run: Run) -> str:
    """The HTML page of ``run``."""
    name = run.path.resolve().name
    parent = run.path.resolve().parent.name
    written = datetime.datetime.now().isoformat(timespec="seconds")
    aux = _matching(run, r"train/aux/[^/]+")
    body = [
        f"<h1>mmpeft run {html.escape(parent)}/{html.escape(name)}</h1>",
        f'<p class="meta">{html.escape(str(run.path.resolve()))} · report written {written}</p>',
        _overview(run),
        "<h2>Losses</h2>",
        _chart(run, ["train/loss", "val/loss"], "loss", "cross-entropy"),
        _chart(run, _task_losses(run), "training loss per task", "cross-entropy", strip=TASK_LOSS),
        _chart(run, aux, "auxiliary routing losses (unweighted)", "loss", strip="train/aux/"),
        "<h2>Tasks</h2>",
        _task_table_html(run),
        "<h2>Routing</h2>",
        _routing_html(run),
        "<h2>Config</h2>",
        f"<pre>{html.escape(run.config)}</pre>" if run.config else "<p>No config.yaml beside the event files.</p>",
    ]
    head = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>mmpeft report: {html.escape(name)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n"
    )
    return head + "\n".join(b for b in body if b) + "\n</body></html>\n"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the page of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``), atomically; returns its path."""
    run = read_run(run_dir)
    path = Path(out) if out is not None else run.path / "report.html"
    # What the page is read from: the event files and config.yaml (a page beside them is fine).
    refuse_output_over_inputs(
        path, {"event file of RUN_DIR": sorted(run.path.glob(EVENTS)), "config of RUN_DIR": run.path / "config.yaml"}
    )
    if path.is_dir():
        raise ConfigError(
            f"--out {str(path)!r} is a folder; give the HTML file to write, e.g. {str(path / 'report.html')!r}"
        )
    with atomic_file(path, "w", encoding="utf-8") as stream:
        stream.write(render(run))
    return path


def cmd_report(argv: list[str]) -> int:
    from mmpeft.flags import ArgumentParser, parse

    parser = ArgumentParser(
        prog="mmpeft report",
        description=(
            "Write one self-contained HTML page of a run (losses, per-task metrics, routing heatmaps, config) "
            "from its TensorBoard event files."
        ),
    )
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="the run's log directory, e.g. runs/demo/version_0 (where its events.out.tfevents.* and config.yaml are)",
    )
    parser.add_argument(
        "--out", help="the HTML file to write (default: RUN_DIR/report.html); never one of the run's own files"
    )
    args = parse(parser, argv)
    print(write_report(args.run_dir, args.out))
    return 0
