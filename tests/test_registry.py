"""Adapters are discovered through the `mmpeft.adapters` entry-point group."""

from __future__ import annotations

import sys

import pytest
from conftest import fake_distribution

from mmpeft import registry
from mmpeft.adapters.lora import LoRA, LoRAConfig
from mmpeft.cli import main
from mmpeft.errors import ConfigError


def test_lora_is_registered_by_the_projects_own_distribution():
    rows = {r.name: r for r in registry.describe(registry.ADAPTERS)}
    assert rows["lora"].distribution.startswith("mmpeft ")
    assert rows["lora"].target == "mmpeft.adapters.lora:LoRA"
    assert rows["lora"].error is None
    assert registry.load(registry.ADAPTERS, "lora") is LoRA


def test_unknown_adapter_lists_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown adapter 'lorax'.*registered adapters: .*lora"):
        registry.load(registry.ADAPTERS, "lorax")


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'rank'.*valid keys: alpha, dropout, r"):
        registry.build_config(LoRAConfig, {"rank": 4}, "adapters[0]")
    with pytest.raises(ConfigError, match="r must be >= 1"):
        registry.build_config(LoRAConfig, {"r": 0}, "adapters[0]")


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """A real installed-distribution layout (dist-info with entry_points.txt) whose module raises on import."""
    fake_distribution(tmp_path, "brokenplug", "0.1", "[mmpeft.adapters]\nbroken = brokenplug_mod:Broken\n")
    (tmp_path / "brokenplug_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("brokenplug_mod", None)


def test_broken_plugin_is_reported_by_name_and_does_not_hide_others(broken_plugin, capsys):
    rows = {r.name: r for r in registry.describe(registry.ADAPTERS)}
    assert rows["broken"].distribution == "brokenplug 0.1"
    assert "boom at import" in rows["broken"].error
    assert rows["lora"].error is None
    with pytest.raises(ConfigError, match=r"adapter plugin 'broken' .*brokenplug 0.1.*boom at import"):
        registry.load(registry.ADAPTERS, "broken")
    assert main(["adapters"]) == 0
    out = capsys.readouterr().out
    assert "lora  " in out and "BROKEN: RuntimeError: boom at import" in out
