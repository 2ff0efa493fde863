"""Shared fixtures: tiny models built locally (no hub), cached per test session."""

from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


class TinyModels(dict):
    """Tiny checkpoint folders by family, each built the first time a test asks for it."""

    def __init__(self, root) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> str:
        from mmpeft.models.tiny import build_tiny_model

        self[family] = str(build_tiny_model(family, self.root / family))
        return self[family]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> TinyModels:
    """One tiny checkpoint folder per model family, built once per test session when first used."""
    return TinyModels(tmp_path_factory.mktemp("tiny"))


def tiny_llama_config(layers: int = 2, positions: int = 64) -> LlamaConfig:
    """A tiny text-only Llama's config (vocabulary 128, hidden 32, MLP 64, 4 heads, 2 key/value heads)."""
    return LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
    )


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    """A tiny text-only Llama in fp32, for adapter math that needs no images."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def fake_distribution(folder, name: str, version: str, entry_points: str) -> None:
    """An installed distribution's metadata (a dist-info with its entry points) in ``folder``, which goes on
    ``sys.path``."""
    dist = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text(entry_points)


def register_plugin(source, site, patch: pytest.MonkeyPatch) -> None:
    """A plugin distribution's source folder (``plugins/<name>``) on ``sys.path``, registered as ``pip install`` would:
    a dist-info in ``site`` with the entry points of its ``pyproject.toml``."""
    import tomllib

    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    entry_points = "".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
        for group, points in project["entry-points"].items()
    )
    fake_distribution(site, project["name"], project["version"], entry_points)
    patch.syspath_prepend(str(source))
    patch.syspath_prepend(str(site))


def forget_package(package: str) -> None:
    """Drop ``package``'s modules, so that another test imports it afresh."""
    for name in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
        sys.modules.pop(name)


TABLES = {
    "test_families": "family conformance",
    "test_images": "image tokens and resolution",
    "test_estimate_configs": "memory plan, LoRA on all-linear, 2 samples, CUDA",
    "test_packing": "packed = padded: per-sample losses, routing losses, adapter gradients",
}
"""The per-family tables: a test module's ``RESULTS`` (family -> check -> outcome) and ``CHECKS`` (the columns)."""

_tables: dict[str, tuple[tuple[str, ...], dict[str, dict[str, str]]]] = {}
"""The tables as reported, merged in the process that prints them (the controller under pytest-xdist)."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """After a test of a table module, its table so far travels with the test's report: under pytest-xdist the tests
    run in worker processes, and only reports reach the process that prints the summary."""
    outcome = yield
    report = outcome.get_result()
    module = getattr(item, "module", None)
    name = getattr(module, "__name__", "")
    if report.when == "teardown" and name in TABLES and module.RESULTS:
        rows = {family: dict(row) for family, row in module.RESULTS.items()}
        report.user_properties.append(("family_table", (name, tuple(module.CHECKS), rows)))


def pytest_runtest_logreport(report) -> None:
    for key, value in report.user_properties:
        if key == "family_table":
            name, checks, rows = value
            merged = _tables.setdefault(name, (tuple(checks), {}))[1]
            for family, row in rows.items():
                merged.setdefault(family, {}).update(row)


def pytest_terminal_summary(terminalreporter) -> None:
    """The per-family tables (:data:`TABLES`): a row per family, a column per check."""
    from mmpeft.models.tiny import FAMILIES

    for name, title in TABLES.items():
        if name in _tables:
            checks, rows = _tables[name]
            order = sorted(rows, key=lambda f: (list(FAMILIES).index(f) if f in FAMILIES else len(FAMILIES), f))
            _family_table(terminalreporter, checks, {f: rows[f] for f in order}, f"{title} (tests/{name}.py)")


def _family_table(terminalreporter, checks: tuple[str, ...], rows: dict[str, dict[str, str]], title: str) -> None:
    width = max(len(f) for f in rows)
    terminalreporter.write_sep("=", title)
    widths = [max(len(c), *(len(row.get(c, "-")) for row in rows.values())) for c in checks]
    terminalreporter.write_line(f"{'family':<{width}}  " + "  ".join(c.center(w) for c, w in zip(checks, widths)))
    for family, row in rows.items():
        # A check a failing test never reached shows "-": the failure is in the first of them.
        cells = [row.get(c, "-").center(w) for c, w in zip(checks, widths)]
        terminalreporter.write_line(f"{family:<{width}}  " + "  ".join(cells))
