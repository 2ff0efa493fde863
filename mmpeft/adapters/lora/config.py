"""Hyperparameters of vanilla LoRA."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRAConfig:
    r: int = 8
    """Rank of the update ``B A``."""

    alpha: float = 16.0
    """The update is scaled by ``alpha / r`` so that changing ``r`` needs no new learning rate (Hu et al.
    2021, sec. 4.1)."""

    dropout: float = 0.05
    """Dropout on the adapter's input only; the base layer always sees the clean input."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
