"""MixLoRA with batched matmuls over gathered factors (never a d_out x d_in matrix per instance)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.adapters.mixlora.config import MixLoRAConfig
from mmpeft.adapters.routing import Router, RouterRecord


class MixLoRA(nn.Module):
    """``delta(x) = s * (x A_sel^T) B_sel^T`` with ``A_sel`` ``(r, d_in)`` and ``B_sel`` ``(d_out, r)`` chosen per instance.

    Routing (once per instance, from the layer input pooled over the prompt tokens):

    - A-factors: ``p_A = softmax(R_A h)``, the top-r factors ``a_1..a_r``.
    - B-factors: ``p_B = softmax(R_B h) + sum_k softmax(C a_k)``: each chosen A-factor is
      projected to ``E`` logits by ``C``; the top-r factors ``b_1..b_r``.
    - ``b_k`` pairs with ``a_k`` in rank order of their scores.
    """

    config_class = MixLoRAConfig
    unmergeable = (
        "MixLoRA builds a different low-rank update for every input (instance routing over factor pools); "
        "it has no single weight update to merge or export"
    )

    def __init__(self, in_features: int, out_features: int, config: MixLoRAConfig) -> None:
        super().__init__()
        self.config = config
        self.r, self.factors = config.r, config.factors
        self.scaling = config.alpha / config.r
        self.A = nn.Parameter(torch.empty(config.factors, in_features))  # (E, d_in): A-factor j is A[j]
        self.B = nn.Parameter(torch.zeros(out_features, config.factors))  # (d_out, E): B-factor j is B[:, j]
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        kwargs = {"level": "instance", "top_k": config.r, "temperature": config.temperature}
        self.router_a = Router(in_features, config.factors, **kwargs)  # instance router for A-factors
        self.router_b = Router(in_features, config.factors, **kwargs)  # instance part of the B router
        self.condition = nn.Parameter(
            torch.zeros(config.factors, in_features)
        )  # (E, d_in): C, chosen A-factor -> B logits

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices and weights of the chosen A- and B-factors, each ``(batch, r)``."""
        context = self.router_a.context
        h = context.pool(x)  # (batch, d_in)
        t = self.config.temperature
        logits_a = self.router_a.logits(h)  # (batch, E)
        log_a = torch.log_softmax(logits_a / t, dim=-1)  # (batch, E): log p_A
        log_score_a, index_a = log_a.topk(self.r, dim=-1)  # (batch, r)
        chosen_a = self.A[index_a]  # (batch, r, d_in)
        logits_b = self.router_b.logits(h)  # (batch, E)
        log_b = torch.log_softmax(logits_b / t, dim=-1)  # (batch, E)
        log_conditional = torch.log_softmax(
            F.linear(chosen_a, self.condition) / t, dim=-1
        )  # (batch, r, E): one per chosen A-factor
        # log(p_B + sum_k softmax(C a_k)): in log space, so that a saturated router (probabilities
        # that underflow to 0) still gives finite weights and gradients.
        log_score_b, index_b = torch.logsumexp(torch.cat([log_b[:, None], log_conditional], dim=1), dim=1).topk(
            self.r, dim=-1
        )  # (batch, r)
        for router, logits, log_probs, index in (
            (self.router_a, logits_a, log_a, index_a),
            (self.router_b, logits_b, log_b, index_b),
        ):
            selected = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, index, True)
            context.record(
                RouterRecord(
                    router.name, logits[:, None], log_probs.exp()[:, None], selected[:, None], self.r, "instance"
                )
            )
        return index_a, self._weights(log_score_a), index_b, self._weights(log_score_b)

    def _weights(self, log_score: torch.Tensor) -> torch.Tensor:
        """Each chosen factor's weight ``(batch, r)`` from its log score."""
        if self.config.weighting == "straight_through":
            # 1 in the forward; the score's gradient is the weight's over the score, as score / stop_grad(score)
            # would give, but finite when a score underflows to 0 (0 / 0 there: NaN, and training diverges).
            return torch.exp(log_score - log_score.detach())
        return torch.softmax(log_score, dim=-1) * self.r  # the scores renormalised to mean 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        index_a, weight_a, index_b, weight_b = self.router_a.context.instance_routing(self, lambda: self.route(x))
        chosen_a = self.A[index_a] * weight_a.unsqueeze(-1)  # (batch, r, d_in)
        chosen_b = self.B.T[index_b] * weight_b.unsqueeze(-1)  # (batch, r, d_out)
        z = torch.bmm(self.dropout(x), chosen_a.transpose(1, 2))  # (batch, seq, r)
        return torch.bmm(z, chosen_b) * self.scaling  # (batch, seq, d_out)
