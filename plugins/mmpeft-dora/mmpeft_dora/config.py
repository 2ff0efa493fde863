"""Hyperparameters of DoRA: those of LoRA (DoRA adds only the magnitude vector, which has none)."""

from __future__ import annotations

from dataclasses import dataclass

from mmpeft.adapters.lora import LoRAConfig


@dataclass
class DoRAConfig(LoRAConfig):
    """``r``, ``alpha`` and ``dropout`` as in LoRA; dropout applies to the low-rank branch only."""
