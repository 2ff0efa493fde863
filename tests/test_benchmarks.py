"""The benchmarks' loop references must compute what the adapters compute, or their ratios mean nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_check(script: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<script>.py --check``, which must succeed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}.py", "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_adapter_overhead_references_match_the_adapters():
    result = run_check("adapter_overhead")
    assert "loop references compute the same update and input gradient as their adapters" in result.stdout


def test_data_throughput_check_compares_identical_batches_and_reports_rates():
    result = run_check("data_throughput")
    out = result.stdout
    assert "the shard and folder pipelines yield the same batches for all 48 samples" in out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0] in ("shards", "folder") and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = cells
    assert set(rows) == {(p, w) for p in ("shards", "folder") for w in (0, 1)}
    for cells in rows.values():
        rate, per_batch, first, cpu = float(cells[2].split()[0]), float(cells[3]), float(cells[4]), float(cells[5])
        assert rate > 0 and per_batch > 0 and first > 0 and cpu > 0
    steps = [line for line in out.splitlines() if line.startswith(("| cached |", "| fed by shards, 1 worker |", "| fed by folder, 1 worker |"))]
    assert len(steps) == 3 and all(float(line.split("|")[2].split()[0]) > 0 for line in steps)
    assert "| shard loading (1 worker) s / batch < training step s |" in out


def test_vs_peft_check_gives_the_same_first_loss_and_a_table_of_both_sides():
    result = run_check("vs_peft")
    out = result.stdout
    agree = [line for line in out.splitlines() if line.startswith("first-step losses agree: mmpeft ")]
    assert len(agree) == 1
    relative = float(agree[0].split("relative difference ")[1].split()[0])
    assert relative <= 1e-4
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("mmpeft", "peft"):
            rows[cells[0]] = cells
    assert set(rows) == {"mmpeft", "peft"}
    for cells in rows.values():
        step, rate = float(cells[1].split()[0]), float(cells[2])
        state, saved, largest = (float(c) for c in cells[3:])
        assert step > 0 and rate > 0 and state > 0 and saved > 0 and largest > 0
    ratios = [line for line in out.splitlines() if line.startswith(("| step time |", "| saved activations (CPU memory proxy) |"))]
    assert len(ratios) == 2 and all(float(line.split("|")[2].split("x")[0]) > 0 for line in ratios)
