"""Shared fixtures: tiny models built locally (no hub), cached per test session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """One tiny checkpoint folder per model family, built once per test session."""
    from mmpeft.models.tiny import FAMILIES, build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {family: str(build_tiny_model(family, root / family)) for family in FAMILIES}


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    """A tiny text-only Llama in fp32, for adapter math that needs no images."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def fake_distribution(folder, name: str, version: str, entry_points: str) -> None:
    """An installed distribution's metadata (a dist-info with its entry points) in ``folder``, which goes on ``sys.path``."""
    dist = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text(entry_points)
