"""Hyperparameters of AsymLoRA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmpeft.adapters.lora.config import LoRAConfig


@dataclass
class AsymLoRAConfig(LoRAConfig):
    heads: int = 3
    """Number ``N`` of up-projections ``B_i`` sharing one ``A`` (the AsymLoRA reference script uses 3)."""

    routing: Literal["token", "instance"] = "token"
    """``token``: a gate per token (the reference setting). ``instance``: one gate per sample, from its
    prompt tokens pooled, computed once per prompt when generating (the router level MixLoRA uses too).
    ``sequence``, this setting's earlier name, still held by older adapter directories and configs,
    is read as ``instance`` (and saved as ``instance``)."""

    top_k: int | None = None
    """``None`` mixes every head with the dense softmax gate; ``k`` keeps the k best heads, renormalised."""

    temperature: float = 1.0
    """Softmax temperature of the router; above 1 spreads the gate over more heads."""

    router: Literal["projection", "block"] = "projection"
    """``projection``: every adapted projection has its own router, reading the projection's input. ``block``: one
    router per block (``layers.3.mlp``) reads the block's input and gates all of the block's adapted projections
    alike, as the AsymLoRA/HydraLoRA reference code routes its MLPs (so head ``i`` of ``gate_proj``, ``up_proj`` and
    ``down_proj`` is one coherent triple). Blocks whose projections read another sequence (Mllama's cross-attention
    ``k_proj``/``v_proj``) need ``projection``."""

    router_bias: bool = False
    """Give the router a bias, as the reference code's ``nn.Linear`` router has."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.routing == "sequence":
            self.routing = "instance"  # one name for one thing; adapters saved before the rename load unchanged
        if self.routing not in ("token", "instance"):
            raise ValueError(f"routing must be 'token' or 'instance', got {self.routing!r}")
        if self.router not in ("projection", "block"):
            raise ValueError(f"router must be 'projection' or 'block', got {self.router!r}")
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")
        if self.top_k is not None and not 1 <= self.top_k <= self.heads:
            raise ValueError(f"top_k must be in [1, heads={self.heads}], got {self.top_k}")
