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


def pytest_terminal_summary(terminalreporter) -> None:
    """The per-family tables: conformance (tests/test_families.py), image tokens (tests/test_images.py), memory
    plans (tests/test_estimate_configs.py) and packing (tests/test_packing.py), a row per family, a column per
    check."""
    import sys

    for name, title in (
        ("test_families", "family conformance"),
        ("test_images", "image tokens and resolution"),
        ("test_estimate_configs", "memory plan, LoRA on all-linear, 2 samples, CUDA"),
        ("test_packing", "packed = padded: per-sample losses, routing losses, adapter gradients"),
    ):
        module = sys.modules.get(name)
        if module is not None and module.RESULTS:
            _family_table(terminalreporter, module, f"{title} (tests/{name}.py)")


def _family_table(terminalreporter, module, title: str) -> None:
    checks = module.CHECKS
    width = max(len(f) for f in module.RESULTS)
    terminalreporter.write_sep("=", title)
    widths = [max(len(c), *(len(row.get(c, "-")) for row in module.RESULTS.values())) for c in checks]
    terminalreporter.write_line(f"{'family':<{width}}  " + "  ".join(c.center(w) for c, w in zip(checks, widths)))
    for family, row in module.RESULTS.items():
        # A check a failing test never reached shows "-": the failure is in the first of them.
        cells = [row.get(c, "-").center(w) for c, w in zip(checks, widths)]
        terminalreporter.write_line(f"{family:<{width}}  " + "  ".join(cells))
