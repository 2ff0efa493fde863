"""Hyperparameters of MixLoRA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmpeft.adapters.lora.config import LoRAConfig


@dataclass
class MixLoRAConfig(LoRAConfig):
    factors: int | None = None
    """Size ``E`` of each pool of rank-1 factors (A-factors and B-factors); each instance uses ``r`` of each.
    ``None`` (default): ``r``, so every instance uses every factor, weighted by its routers' scores; at equal
    parameters that trained best on the conflict suite (docs/benchmarks.md, MixLoRA ablation: r=8 of 8 above
    LoRA on 5 of 5 seeds, r=4 of 8 level with it). A larger pool makes each instance choose ``r`` of them."""

    weighting: Literal["straight_through", "score"] = "score"
    """How the chosen factors carry their router scores so the routers learn (the released code
    uses them unweighted, so its routers get no gradient). ``score`` (default): each factor is scaled
    by its score, renormalised over the chosen ones to average 1. ``straight_through``: the forward is
    the unweighted paper formula, the backward passes the gradient to the scores; it trained worse on
    the conflict suite (docs/benchmarks.md, MixLoRA ablation), and collapsed without routing losses."""

    temperature: float = 1.0
    """Softmax temperature of both routers."""

    pairing: Literal["score", "index"] = "index"
    """Which chosen B-factor multiplies which chosen A-factor. ``index`` (default): both chosen sets in factor-index
    order, so the same sets always give the same pairs. ``score`` (the paper's code: both top-r lists in score
    order, ``b_k`` with ``a_k``): the same chosen sets pair differently whenever their score order differs; it
    trained worse on the conflict suite (docs/benchmarks.md, MixLoRA ablation)."""

    condition_in_losses: bool = False
    """Whether the routing losses see the B router's whole score (``softmax(R_B h) + sum_k softmax(C a_k)``,
    divided by ``1 + r`` to sum to 1), so the condition projection ``C`` gets their gradient; off, they see
    ``softmax(R_B h)`` alone."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factors is None:
            self.factors = self.r
        if self.factors < self.r:
            raise ValueError(f"factors (the pool size) must be >= r={self.r}, got {self.factors}")
