"""The LoRA update as an adapter module (the base layer is applied by AdaptedLinear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.adapters.base import Ability, lora_parts
from mmpeft.adapters.lora.config import LoRAConfig


class LoRA(nn.Module):
    """``delta(x) = s * B (A dropout(x))`` with ``A`` kaiming-uniform and ``B`` zero, so training starts at
    the base model."""

    config_class = LoRAConfig
    abilities = frozenset({Ability.AS_LORA, Ability.DELTA_WEIGHT})

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig) -> None:
        super().__init__()
        self.config = config
        # A (r, d_in), B (d_out, r)
        self.A, self.B, self.dropout, self.scaling = lora_parts(in_features, out_features, config)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        z = F.linear(self.dropout(x.to(self.A.dtype)), self.A)  # (..., r)
        return F.linear(z, self.B) * self.scaling  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense ``(d_out, d_in)`` matrix, for merging into the base weight."""
        return (self.B @ self.A) * self.scaling

    def as_lora(self, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, scaling)``: LoRA is already one (it has no router, so ``gate`` is unused)."""
        return self.A.detach().clone(), self.B.detach().clone(), self.scaling
