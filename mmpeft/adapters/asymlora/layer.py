"""AsymLoRA with every head applied in one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.adapters.asymlora.config import AsymLoRAConfig
from mmpeft.adapters.base import Ability, lora_parts
from mmpeft.adapters.routing import Router, block_gate, expert_gate


class AsymLoRA(nn.Module):
    """``delta(x) = s * [g_1 z, ..., g_N z] @ [B_1 | ... | B_N]^T`` with ``z = A dropout(x)`` computed once.

    HydraLoRA's code recomputes ``A x`` for every head in a Python loop; here ``A x`` is
    computed once and the gated copies of it meet all heads in a single matmul against the
    heads laid side by side, ``B = [B_1 | ... | B_N]`` of shape ``(d_out, N * r)``.
    """

    config_class = AsymLoRAConfig
    abilities = frozenset({Ability.AS_LORA, Ability.BLOCK_ROUTER})

    def __init__(self, in_features: int, out_features: int, config: AsymLoRAConfig) -> None:
        super().__init__()
        self.config = config
        self.r, self.heads = config.r, config.heads
        # A (r, d_in), shared by every head; B (d_out, N * r): head i is B[:, i*r:(i+1)*r]
        columns = config.heads * config.r
        self.A, self.B, self.dropout, self.scaling = lora_parts(in_features, out_features, config, columns=columns)
        self.in_features, self.out_features = in_features, out_features
        self.router = self.block_router(in_features)  # with router: block, replaced at injection by the block's

    def block_router(self, width: int) -> Router:
        """A router over the heads reading ``width`` features: this projection's own, or its block's."""
        c = self.config
        return Router(width, c.heads, level=c.routing, top_k=c.top_k, temperature=c.temperature, bias=c.router_bias)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.A.dtype)
        if self.config.router == "block":
            gate = block_gate(self.shared_router, x)  # the block's gate, from the block's input
        else:
            gate = self.router(x)  # (..., N), or (batch, 1, N) per instance
        z = F.linear(self.dropout(x), self.A)  # (..., r)
        gated = (gate.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)  # (..., N * r): [g_1 z, ..., g_N z]
        return F.linear(gated, self.B) * self.scaling  # (..., d_out)

    def head(self, i: int) -> torch.Tensor:
        """``B_i``, ``(d_out, r)``."""
        return self.B[:, i * self.r : (i + 1) * self.r]

    def as_lora(self, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One LoRA of rank ``r`` for a fixed ``gate`` ``(N,)``: the shared ``A`` and ``B = sum_i g_i B_i``.

        Exact wherever the router would give that gate (e.g. instance routing of samples that
        all route alike); otherwise the LoRA of the mean gate.
        """
        g = expert_gate(gate, self.heads, "AsymLoRA").to(self.B)  # (N,)
        heads = self.B.detach().unflatten(1, (self.heads, self.r))  # (d_out, N, r)
        b = (heads * g[None, :, None]).sum(dim=1)  # (d_out, r)
        return self.A.detach().clone(), b, self.scaling
