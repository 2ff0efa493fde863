"""Hyperparameters of DoRA (those of LoRA: DoRA adds only the magnitude vector, which has none)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DoRAConfig:
    r: int = 8
    """Rank of the direction update ``B A``."""

    alpha: float = 16.0
    """The direction update is scaled by ``alpha / r``, as in LoRA (Hu et al. 2021, sec. 4.1)."""

    dropout: float = 0.05
    """Dropout on the input of the low-rank branch only; the rescaled base term always sees the clean input."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
