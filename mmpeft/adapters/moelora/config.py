"""Hyperparameters of LoRA-MoE."""

from __future__ import annotations

from dataclasses import dataclass

from mmpeft.adapters.lora.config import LoRAConfig


@dataclass
class MoELoRAConfig(LoRAConfig):
    experts: int = 4
    """Number of LoRA experts, each of rank ``r`` with its own ``A_e`` and ``B_e``."""

    top_k: int | None = None
    """``None``: every expert, weighted by the dense softmax (LoRAMoE). ``k``: the k best per token,
    renormalised (MoLA, Mixtral)."""

    temperature: float = 1.0
    """Softmax temperature of the router."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.experts < 1:
            raise ValueError(f"experts must be >= 1, got {self.experts}")
        if self.top_k is not None and not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k must be in [1, experts={self.experts}], got {self.top_k}")
