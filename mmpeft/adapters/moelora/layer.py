"""LoRA-MoE as one LoRA of rank ``N * r`` with a block gate: two matmuls, no loop over experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.adapters.base import Ability, lora_parts
from mmpeft.adapters.moelora.config import MoELoRAConfig
from mmpeft.adapters.routing import Router, expert_gate


class MoELoRA(nn.Module):
    """``delta(x) = s * sum_e g_e(x) B_e A_e dropout(x)``.

    The experts' ``A_e`` are stacked into ``A`` ``(N * r, d_in)`` and their ``B_e`` laid side by
    side in ``B`` ``(d_out, N * r)``; the gate scales each expert's block of ``A x`` before ``B``.
    Unselected experts (top-k) get gate 0, so they add nothing and receive no gradient.
    """

    config_class = MoELoRAConfig
    abilities = frozenset({Ability.AS_LORA})

    def __init__(self, in_features: int, out_features: int, config: MoELoRAConfig) -> None:
        super().__init__()
        self.config = config
        self.r, self.experts = config.r, config.experts
        # A (N * r, d_in): expert e is A[e*r:(e+1)*r]; B (d_out, N * r), expert e is B[:, e*r:(e+1)*r].
        n = config.experts * config.r
        self.A, self.B, self.dropout, self.scaling = lora_parts(in_features, out_features, config, rows=n, columns=n)
        self.router = Router(in_features, config.experts, top_k=config.top_k, temperature=config.temperature)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.A.dtype)
        gate = self.router(x)  # (..., N)
        z = F.linear(self.dropout(x), self.A)  # (..., N * r)
        z = z * gate.repeat_interleave(self.r, dim=-1)  # (..., N * r): block gate
        return F.linear(z, self.B) * self.scaling  # (..., d_out)

    def as_lora(self, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One LoRA of rank ``N * r`` for a fixed ``gate`` ``(N,)``: the stacked ``A`` and
        ``[g_1 B_1 | ... | g_N B_N]``."""
        g = expert_gate(gate, self.experts, "LoRA-MoE").to(self.B)  # (N,)
        b = self.B.detach() * g.repeat_interleave(self.r)[None, :]  # (d_out, N * r): block e scaled by g_e
        return self.A.detach().clone(), b, self.scaling
