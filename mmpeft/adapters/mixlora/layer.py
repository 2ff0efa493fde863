"""MixLoRA with batched matmuls over gathered factors (never a d_out x d_in matrix per instance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.adapters.base import Ability, lora_parts
from mmpeft.adapters.mixlora.config import MixLoRAConfig
from mmpeft.adapters.routing import Router


class MixLoRA(nn.Module):
    """``delta(x) = s * (x A_sel^T) B_sel^T``, ``A_sel`` ``(r, d_in)`` and ``B_sel`` ``(d_out, r)`` chosen per instance.

    Routing (once per instance, from the layer input pooled over the prompt tokens):

    - A-factors: ``p_A = softmax(R_A h)``, the top-r factors ``a_1..a_r``.
    - B-factors: ``p_B = softmax(R_B h) + sum_k softmax(C a_k)``: each chosen A-factor is
      projected to ``E`` logits by ``C``; the top-r factors ``b_1..b_r``.
    - ``b_k`` pairs with ``a_k`` in rank order of their scores (``pairing: score``, the paper's code), or both
      chosen sets are taken in factor-index order (``pairing: index``).

    Both routers are :class:`~mmpeft.adapters.routing.Router` objects (:meth:`Router.select`): the softmax,
    the top-r, the weighting of the chosen factors (``config.weighting``) and the records are the
    routing module's; this layer keeps the factor pools, ``C`` and the batched matmuls.
    """

    config_class = MixLoRAConfig
    abilities = frozenset({Ability.UNMERGEABLE})
    unmergeable = (
        "MixLoRA builds a different low-rank update for every input (instance routing over factor pools); "
        "it has no single weight update to merge or export"
    )

    def __init__(self, in_features: int, out_features: int, config: MixLoRAConfig) -> None:
        super().__init__()
        self.config = config
        self.r, self.factors = config.r, config.factors
        # A (E, d_in): A-factor j is A[j]; B (d_out, E): B-factor j is B[:, j]
        e = config.factors
        self.A, self.B, self.dropout, self.scaling = lora_parts(in_features, out_features, config, rows=e, columns=e)
        kwargs = {
            "level": "instance",
            "top_k": config.r,
            "temperature": config.temperature,
            "weighting": config.weighting,
        }
        self.router_a = Router(in_features, config.factors, **kwargs)  # instance router for A-factors
        self.router_b = Router(in_features, config.factors, **kwargs)  # instance part of the B router
        self.condition = nn.Parameter(
            torch.zeros(config.factors, in_features)
        )  # (E, d_in): C, chosen A-factor -> B logits

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices and weights of the chosen A- and B-factors, each ``(batch, r)``; ``b_k`` pairs with ``a_k``."""
        h = self.router_a.pool(x)  # (batch, 1, d_in): pooled over each sample's prompt
        a = self.router_a.select(h)  # (batch, 1, r): top-r of p_A
        # Each chosen A-factor projected to E logits by C: the B router adds their softmaxes to p_B.
        conditional = F.linear(self.A[a.index], self.condition)  # (batch, 1, r, E)
        b = self.router_b.select(
            h, conditional_logits=conditional, record_conditional=self.config.condition_in_losses
        )  # (batch, 1, r)
        chosen_a, chosen_b = (a.index[:, 0], a.weight[:, 0]), (b.index[:, 0], b.weight[:, 0])  # each (batch, r)
        if self.config.pairing == "index":
            chosen_a, chosen_b = in_index_order(*chosen_a), in_index_order(*chosen_b)
        (index_a, weight_a), (index_b, weight_b) = chosen_a, chosen_b
        return index_a, weight_a, index_b, weight_b

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.A.dtype)
        context = self.router_a.context
        index_a, weight_a, index_b, weight_b = context.instance_routing(self, lambda: self.route(x))
        chosen_a = self.A[index_a] * weight_a.unsqueeze(-1)  # (batch, r, d_in)
        chosen_b = self.B.T[index_b] * weight_b.unsqueeze(-1)  # (batch, r, d_out)

        def per_sample(x: torch.Tensor) -> torch.Tensor:  # (batch, seq, d_in): a sample per row
            z = torch.bmm(self.dropout(x), chosen_a.transpose(1, 2))  # (batch, seq, r)
            return torch.bmm(z, chosen_b) * self.scaling  # (batch, seq, d_out)

        return context.by_sample(x, per_sample)  # a packed batch's rows: per sample, then packed back


def in_index_order(index: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen factors ``(batch, r)`` and their weights, reordered by factor index."""
    order = index.argsort(dim=1)  # (batch, r)
    return index.gather(1, order), weight.gather(1, order)
