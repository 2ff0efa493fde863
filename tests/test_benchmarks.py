"""The benchmarks' loop references must compute what the adapters compute, or their ratios mean nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_adapter_overhead_references_match_the_adapters():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "benchmarks/adapter_overhead.py", "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loop references compute the same update and input gradient as their adapters" in result.stdout


def test_data_throughput_check_compares_identical_batches_and_reports_rates():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "benchmarks/data_throughput.py", "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
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
