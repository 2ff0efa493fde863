"""Hyperparameters of MixLoRA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmpeft.adapters.lora.config import LoRAConfig


@dataclass
class MixLoRAConfig(LoRAConfig):
    factors: int = 32
    """Size ``E`` of each pool of rank-1 factors (A-factors and B-factors); each instance uses ``r`` of each."""

    weighting: Literal["straight_through", "score"] = "straight_through"
    """How the chosen factors carry their router scores so the routers learn (the released code
    uses them unweighted, so its routers get no gradient). ``straight_through``: the forward is the
    unweighted paper formula, the backward passes the gradient to the scores. ``score``: each factor
    is scaled by its score, renormalised over the chosen ones to average 1."""

    temperature: float = 1.0
    """Softmax temperature of both routers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factors < self.r:
            raise ValueError(f"factors (the pool size) must be >= r={self.r}, got {self.factors}")
