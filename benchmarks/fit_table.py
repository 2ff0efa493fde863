"""The "will it fit" table of docs/memory.md: every shipped config planned by ``python -m mmpeft estimate``.

For each ``configs/*.yaml`` the estimate runs on the checkpoint the config names, or, where it is not on this
machine, on its published-shape stand-in (``benchmarks/published.py``: the published ``config.json`` and processor
settings, no weights); ``configs/demo.yaml`` on its own tiny model. Printed as a markdown table: the planned peak
(what the allocator holds, ``max_memory_allocated``) and what the card must have (the peak plus the CUDA allowance),
whether that fits 8, 12, 16 and 24 GB cards, and the largest ``data.batch_size`` and ``data.max_length`` (and image
side, for families whose images take more tokens when larger) that fit a 12 GB and a 24 GB card, each with the other
settings as configured (``mmpeft.planner.suggest``).

These are estimates: no GPU has run them yet (benchmarks/gpu_check.py will measure).

    python benchmarks/fit_table.py                      # all shipped configs (about 10 minutes on 2 CPU cores)
    python benchmarks/fit_table.py configs/demo.yaml    # some of them
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from published import PUBLISHED, standin, standin_name  # noqa: E402

from mmpeft.cli import quiet_known_noise  # noqa: E402
from mmpeft.estimate import Report, estimate  # noqa: E402
from mmpeft.memory import gib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TABLE_SIZES = ("8", "12", "16", "24")
"""The card sizes (GB) the table shows a column for; the estimate checks 48 and 80 too."""
SEARCH_CARDS = ("12GiB", "24GiB")
"""The cards the largest settings are searched for."""


def pretrained_override(config: Path, standins: Path) -> list[str]:
    """The ``--model.backbone.pretrained`` override that plans ``config`` here: its published-shape stand-in when the
    checkpoint it names is a hub id with a published shape; nothing for a local or tiny model (the demo's)."""
    values = yaml.safe_load(config.read_text())
    backbone = values["model"]["backbone"]
    pretrained = backbone["pretrained"]
    if backbone.get("build_tiny") or Path(pretrained).expanduser().exists():
        return []
    if pretrained not in PUBLISHED:
        raise SystemExit(f"{config}: no published shape for {pretrained!r}; add it to benchmarks/published.py")
    return ["--model.backbone.pretrained", str(standin(pretrained, standins / standin_name(pretrained)))]


def plan_config(config: Path, standins: Path) -> dict[str, Report]:
    """The estimate of ``config`` for each of :data:`SEARCH_CARDS`."""
    args = ["--config", str(config), *pretrained_override(config, standins)]
    return {gpu: estimate([*args, "--gpu", gpu]) for gpu in SEARCH_CARDS}


def _setting(report: Report) -> str:
    """``batch_size / max_length [/ image side]`` that fit the report's card."""
    values = report.suggestions
    keys = ["data.batch_size", "data.max_length"] + [k for k in ("data.image_resolution",) if k in values]
    # "-": not searched (data.processor_kwargs fixes the pixel limits); "none": not even the smallest value fits.
    return " / ".join(
        "-" if k in report.not_searched else "none" if values.get(k) is None else str(values[k]) for k in keys
    )


def table(rows: dict[str, dict[str, Report]]) -> list[str]:
    head = [
        "config",
        "batch x tokens (image tokens)",
        "peak",
        "with CUDA allowance",
        *(f"{s} GB" for s in TABLE_SIZES),
        "12 GB: largest batch / length (/ image px)",
        "24 GB: the same",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, reports in rows.items():
        first = reports[SEARCH_CARDS[0]]
        b = first.batch
        cells = [
            f"`{name}`",
            f"{b['samples']} x {b['tokens_per_sample']} ({b['image_tokens_per_sample']})",
            gib(first.peak),
            gib(first.needed),
            *("yes" if first.cards[s] else "no" for s in TABLE_SIZES),
            *(_setting(reports[gpu]) for gpu in SEARCH_CARDS),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="configs to plan (default: configs/*.yaml)")
    parser.add_argument(
        "--standins", default=str(ROOT / ".cache/mmpeft/standins"), help="folder for the published-shape stand-ins"
    )
    args = parser.parse_args(argv)
    quiet_known_noise()
    configs = [Path(c).resolve() for c in args.configs] or sorted((ROOT / "configs").glob("*.yaml"))
    standins = Path(args.standins).resolve()
    os.chdir(ROOT)  # the configs' relative paths (the demo's tiny model) are relative to the repository
    rows: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for config in configs:
        rows[config.name] = plan_config(config, standins)
        print(f"planned {config.name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print(f"Estimated (no GPU run yet), {datetime.date.today().isoformat()}: `python benchmarks/fit_table.py`")
    print()
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
