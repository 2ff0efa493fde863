"""The DoRA update as an mmpeft adapter module (the base layer is applied by ``AdaptedLinear``).

DoRA replaces the frozen weight ``W`` by ``W' = m * V / ||V||_row`` with ``V = W + s B A``.
mmpeft adds an adapter's output to the base layer's output ``base_out = W x + bias``, and passes
that output in, so this module returns only the difference

    delta(x) = W' x - W x = (m / n) * (W x + s * B A dropout(x)) - W x,   W x = base_out - bias,   n = ||V||_row,

without computing ``W x`` again: the frozen matmul runs once, in the base layer (4-bit kernels
included). ``n`` is detached from the graph (paper, sec. 4.3, as PEFT does): it follows ``B A`` in
value but passes no gradient. The base bias is left to the base layer and never rescaled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.adapters.base import Ability, lora_parts
from mmpeft.adapters.quant import BaseLayerView
from mmpeft_dora.config import DoRAConfig


class DoRA(nn.Module):
    """Weight-decomposed LoRA: ``A`` kaiming-uniform, ``B`` zero and ``m = ||W||_row``, so training starts
    at the base model.

    The magnitude ``m`` needs the frozen weight, so it is created by :meth:`attach_base`, which
    mmpeft's injection calls right after construction with a view of the base layer (the
    ``reads_base_weight`` ability); ``as_dora`` lets ``python -m mmpeft merge`` and ``export
    --format peft`` write it. The forward rescales the base output it is given, but only inside a
    sum, so autograd keeps nothing of ``base_out`` and mmpeft may still add the update into it in
    place (no ``reads_base_output``; ``(m/n - 1) * base_out + ...`` would keep it, and need it).
    """

    config_class = DoRAConfig
    abilities = frozenset({Ability.READS_BASE_WEIGHT, Ability.AS_DORA})

    def __init__(self, in_features: int, out_features: int, config: DoRAConfig) -> None:
        super().__init__()
        self.config = config
        self.in_features = in_features
        self.out_features = out_features
        # A (r, d_in), B (d_out, r)
        self.A, self.B, self.dropout, self.scaling = lora_parts(in_features, out_features, config)
        # A plain attribute, not a submodule: the base's tensors stay out of this module's state dict.
        self._base: BaseLayerView | None = None

    def attach_base(self, view: BaseLayerView) -> None:
        """Remember the frozen base layer and create the magnitude ``m = ||W + s B A||_row``
        (``= ||W||_row`` at init)."""
        if (view.out_features, view.in_features) != (self.out_features, self.in_features):
            raise ValueError(
                f"base layer is {view.in_features} -> {view.out_features}, "
                f"this DoRA adapter was built for {self.in_features} -> {self.out_features}"
            )
        self._base = view
        weight = view.weight()  # (d_out, d_in), float32 on the base's device
        # ||W|| of each row is a constant of the frozen weight: a buffer, so that it follows the module to
        # another device, not persistent, so that it stays out of checkpoints (it comes from the base).
        self.register_buffer("weight_norm", torch.linalg.vector_norm(weight, dim=1), persistent=False)  # (d_out,)
        # Same computation as in forward, so m / n is exactly 1 at init and the model starts unchanged
        # (with B = 0 it is sqrt(||W||^2), which is ||W|| to the bit: m = ||W||_row as it always was).
        self.m = nn.Parameter(self._row_norm(weight))  # (d_out,)

    def _row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``n = ||W + s B A||`` over ``in_features`` for each output row, without gradient, ``(d_out,)``.

        Expanded as ``||W||^2 + 2 s <W A^T, B> + s^2 <B (A A^T), B>`` per row: one ``(d_out, d_in) x
        (d_in, r)`` matmul and ``r x r`` products, never the ``(d_out, d_in)`` matrix ``W + s B A``;
        ``||W||`` is computed once, in :meth:`attach_base`. The terms are float32 sums of the same
        size as the direct norm's, so the two agree to float rounding.
        """
        with torch.no_grad():
            a, b, s = self.A, self.B, self.scaling
            cross = (F.linear(weight, a) * b).sum(dim=1)  # (d_out,): <W_i, (B A)_i> = (W A^T)_i . B_i
            update = (F.linear(b, a @ a.T) * b).sum(dim=1)  # (d_out,): ||(B A)_i||^2 = B_i (A A^T) B_i^T
            norm_sq = self.weight_norm.square() + 2 * s * cross + s * s * update  # (d_out,)
            return norm_sq.clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self._base is None:
            raise RuntimeError(
                "DoRA needs its base layer's weight: call attach_base(view) first (mmpeft's injection does)"
            )
        x = x.to(self.A.dtype)  # (..., d_in)
        scale = self.m / self._row_norm(self._base.weight())  # (d_out,): the norm is a constant for backward (sec. 4.3)
        bias = self._base.bias
        # W x without the bias, from the base layer's own output: the bias is not rescaled.
        base = base_out.to(scale.dtype) if bias is None else base_out.to(scale.dtype) - bias.to(scale.dtype)
        lora = F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scaling  # (..., d_out)
        # (m/n) (W x + s B A x) - W x: autograd keeps one (..., d_out) tensor for m's gradient, the sum, and
        # nothing of base_out (so the update may be added into it in place); at init (m/n = 1, B = 0) it is
        # W x - W x, exactly 0.
        return scale * (base + lora) - base  # (..., d_out)

    def as_dora(self) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """``(A, B, scaling, m)``: the adapted weight is ``m / ||W + s B A||_row * (W + s B A)``."""
        return self.A.detach().clone(), self.B.detach().clone(), self.scaling, self.m.detach().clone()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"r={self.config.r}, scaling={self.scaling}"
        )
