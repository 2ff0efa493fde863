"""The MASA update as an mmpeft adapter module: ``N`` routed down-projections, one shared up-projection.

With ``x`` ``(..., d_in)``, heads ``i = 1..N``, rank ``r`` and ``s = alpha / r``::

    z_i      = A_i dropout(x)              A_i (r, d_in); z_i (..., r); one dropout mask for every head
    g        = router(x)                   (..., N) per token, or (batch, 1, N) per instance; sums to 1
    delta(x) = s * B (sum_i g_i z_i)       B (d_out, r) shared by every head; delta (..., d_out)

computed without a loop over heads: the ``A_i`` are stacked as the rows of one ``A`` ``(N * r, d_in)``
(head ``i`` is ``A[i*r:(i+1)*r]``), so one ``F.linear`` gives ``[z_1, ..., z_N]`` ``(..., N * r)``; the gate
weights and sums them over heads to ``(..., r)``, and a second ``F.linear`` applies ``B``.

For a fixed gate the update is one LoRA of rank ``r``: ``A = sum_i g_i A_i`` and the shared ``B``
(:meth:`MASA.as_lora`), so ``python -m mmpeft merge`` folds it into the base weight and ``export --format
peft`` writes it as a PEFT LoRA; exactly wherever the router gives every input that gate (instance
routing of a task whose samples route alike).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.adapters.base import Ability, lora_parts
from mmpeft.adapters.routing import Router, expert_gate
from mmpeft_masa.config import MASAConfig


class MASA(nn.Module):
    """``delta(x) = s * B sum_i g_i(x) A_i dropout(x)``; ``A_i`` kaiming-uniform, ``B`` zero, so training starts at
    the base model.

    The ``A_i`` are independent draws (one kaiming-uniform draw over the stacked ``(N * r, d_in)`` matrix, whose
    bound is that of a draw per head: the fan-in is ``d_in`` either way), so the heads differ from the start and
    the router has something to choose between once ``B`` has moved. The router is mmpeft's own
    (:class:`~mmpeft.adapters.routing.Router`): bound to the model's routing context at injection, it records its
    logits, from which the routing losses (load balance, z-loss, the task-aware ones) are computed with the
    other mixtures'.
    """

    config_class = MASAConfig
    abilities = frozenset({Ability.AS_LORA})

    def __init__(self, in_features: int, out_features: int, config: MASAConfig) -> None:
        super().__init__()
        self.config = config
        self.r, self.heads = config.r, config.heads
        self.in_features, self.out_features = in_features, out_features
        # A (N * r, d_in): head i is A[i*r:(i+1)*r]; B (d_out, r), shared by every head
        self.A, self.B, self.dropout, self.scaling = lora_parts(
            in_features, out_features, config, rows=config.heads * config.r
        )
        self.router = Router(
            in_features, config.heads, level=config.routing, top_k=config.top_k, temperature=config.temperature
        )  # weight (N, d_in)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.A.dtype)  # (..., d_in)
        gate = self.router(x)  # (..., N), or (batch, 1, N) per instance
        z = F.linear(self.dropout(x), self.A)  # (..., N * r): [z_1, ..., z_N]
        mixed = (gate.unsqueeze(-1) * z.unflatten(-1, (self.heads, self.r))).sum(dim=-2)  # (..., r): sum_i g_i z_i
        return F.linear(mixed, self.B) * self.scaling  # (..., d_out)

    def head(self, i: int) -> torch.Tensor:
        """``A_i``, ``(r, d_in)``."""
        return self.A[i * self.r : (i + 1) * self.r]

    def as_lora(self, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One LoRA of rank ``r`` for a fixed ``gate`` ``(N,)``: ``A = sum_i g_i A_i`` and the shared ``B``.

        Exact wherever the router would give that gate (instance routing of samples that all route
        alike); otherwise the LoRA of the mean gate.
        """
        g = expert_gate(gate, self.heads, "MASA").to(self.A)  # (N,)
        heads = self.A.detach().unflatten(0, (self.heads, self.r))  # (N, r, d_in)
        a = (heads * g[:, None, None]).sum(dim=0)  # (r, d_in)
        return a, self.B.detach().clone(), self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, heads={self.heads}, "
            f"routing={self.config.routing}, top_k={self.config.top_k}, scaling={self.scaling}"
        )
