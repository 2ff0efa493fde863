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
