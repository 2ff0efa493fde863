"""Every shipped config parses through the CLI (``--print_config`` builds no model and reads no data).

``--print_config`` does not look inside an adapter group's free-form ``config`` mapping, so the
adapter names and hyperparameter keys are checked separately against the registered plugins.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist() -> None:
    assert CONFIGS, "no configs/*.yaml found"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses(config: Path) -> None:
    pretrained = yaml.safe_load(config.read_text())["model"]["backbone"]["pretrained"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "mmpeft", "fit", "--config", str(config.relative_to(ROOT)), "--print_config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["backbone"]["pretrained"] == pretrained


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_adapters_resolve(config: Path) -> None:
    from mmpeft.adapters import AdapterGroup

    for i, group in enumerate(yaml.safe_load(config.read_text())["model"].get("adapters") or []):
        AdapterGroup(**group).resolve(i)  # raises ConfigError on an unknown adapter or key
