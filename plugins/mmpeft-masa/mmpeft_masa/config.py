"""Hyperparameters of MASA: those of LoRA, and those of its router over the ``A_i``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmpeft.adapters.lora.config import LoRAConfig


@dataclass
class MASAConfig(LoRAConfig):
    """``r``, ``alpha`` and ``dropout`` as in LoRA: every ``A_i`` is ``r x d_in``, the shared ``B`` is ``d_out x r``,
    and the update is scaled by ``alpha / r``; dropout applies to the adapter's input only."""

    heads: int = 3
    """Number ``N`` of down-projections ``A_i`` sharing one ``B`` (3, as AsymLoRA's reference script has B heads, so
    the two mirrored adapters have the same parameter count at the same ``r`` and ``N``)."""

    routing: Literal["token", "instance"] = "token"
    """``token``: a gate per token. ``instance``: one gate per sample, from its prompt tokens pooled, computed once
    per prompt when generating; a sample's update is then one LoRA, which is what ``merge`` collapses exactly."""

    top_k: int | None = None
    """``None`` mixes every ``A_i`` with the dense softmax gate; ``k`` keeps the k best, renormalised."""

    temperature: float = 1.0
    """Softmax temperature of the router; above 1 spreads the gate over more heads."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.routing not in ("token", "instance"):
            raise ValueError(f"routing must be 'token' or 'instance', got {self.routing!r}")
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")
        if self.top_k is not None and not 1 <= self.top_k <= self.heads:
            raise ValueError(f"top_k must be in [1, heads={self.heads}], got {self.top_k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
