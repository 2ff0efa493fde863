"""The DoRA update as an mmpeft adapter module (the base layer is applied by ``AdaptedLinear``).

DoRA replaces the frozen weight ``W`` by ``W' = m * V / ||V||_row`` with ``V = W + s B A``.
mmpeft adds an adapter's output to ``base(x)``, so this module returns only the difference

    delta(x) = W' x - W x = (m / n - 1) * W x + (m / n) * s * B A dropout(x),   n = ||V||_row,

where ``n`` is detached from the graph (paper, sec. 4.3, as PEFT does): it follows ``B A`` in
value but passes no gradient. The base bias is left to the base layer and never rescaled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.adapters.quant import BaseLayerView
from mmpeft_dora.config import DoRAConfig


class DoRA(nn.Module):
    """Weight-decomposed LoRA: ``A`` kaiming-uniform, ``B`` zero and ``m = ||W||_row``, so training starts at the base model.

    The magnitude ``m`` needs the frozen weight, so it is created by :meth:`attach_base`, which
    mmpeft's injection calls right after construction with a view of the base layer.
    """

    config_class = DoRAConfig

    def __init__(self, in_features: int, out_features: int, config: DoRAConfig) -> None:
        super().__init__()
        self.config = config
        self.in_features = in_features
        self.out_features = out_features
        self.scaling = config.alpha / config.r
        self.A = nn.Parameter(torch.empty(config.r, in_features))  # (r, d_in)
        self.B = nn.Parameter(torch.zeros(out_features, config.r))  # (d_out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # A plain attribute, not a submodule: the base's tensors stay out of this module's state dict.
        self._base: BaseLayerView | None = None

    def attach_base(self, view: BaseLayerView) -> None:
        """Remember the frozen base layer and create the magnitude ``m = ||W + s B A||_row`` (``= ||W||_row`` at init)."""
        if (view.out_features, view.in_features) != (self.out_features, self.in_features):
            raise ValueError(
                f"base layer is {view.in_features} -> {view.out_features}, "
                f"this DoRA adapter was built for {self.in_features} -> {self.out_features}"
            )
        self._base = view
        weight = view.weight()  # (d_out, d_in), float32 on the base's device
        # Same computation as in forward, so m / n is exactly 1 at init and the model starts unchanged.
        self.m = nn.Parameter(self._row_norm(weight))  # (d_out,)

    def _row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + s B A||`` over ``in_features`` for each output row, without gradient."""
        with torch.no_grad():
            update = (self.B @ self.A) * self.scaling  # (d_out, d_in)
            return torch.linalg.vector_norm(weight + update, dim=1)  # (d_out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._base is None:
            raise RuntimeError(
                "DoRA needs its base layer's weight: call attach_base(view) first (mmpeft's injection does)"
            )
        x = x.to(self.A.dtype)  # (..., d_in)
        weight = self._base.weight()  # (d_out, d_in), dequantized, no grad
        scale = self.m / self._row_norm(weight)  # (d_out,): the norm is a constant for backward (sec. 4.3)
        base = F.linear(x, weight)  # (..., d_out), W x without the bias: the bias is not rescaled
        lora = F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scaling  # (..., d_out)
        return (scale - 1) * base + scale * lora  # (..., d_out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.config.r}, scaling={self.scaling}"
