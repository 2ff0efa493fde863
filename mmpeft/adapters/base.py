"""The adapter contract and the wrapper that puts an adapter beside a base layer.

An adapter plugin is a class registered under the entry-point group
``mmpeft.adapters``. It is an ``nn.Module`` that computes only the *update*
``delta(x)``; :class:`AdaptedLinear` adds it to the frozen base layer's output, so
no adapter ever copies or subclasses the model's own layers, and every adapter
works on every quantization through the one seam in :mod:`mmpeft.adapters.quant`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from mmpeft.adapters.quant import base_forward


@runtime_checkable
class AdapterPlugin(Protocol):
    """What an adapter class registered under ``mmpeft.adapters`` provides.

    ``config_class`` is a dataclass whose fields are the adapter's hyperparameters;
    the class is constructed as ``cls(in_features, out_features, config)`` and called
    as ``delta = module(x)`` with ``x`` of shape ``(..., in_features)`` returning
    ``(..., out_features)``. Its parameters are the trainable ones.

    Two optional methods extend it:

    - ``attach_base(view)``: called once after construction with a
      :class:`~mmpeft.adapters.quant.BaseLayerView`, for adapters whose update depends on the
      frozen weight (DoRA). The view reads the weight dequantized, whatever the storage.
    - ``as_lora(gate=None)``: the update as one plain LoRA, ``(A, B, scaling)`` with ``A``
      ``(rank, in_features)`` and ``B`` ``(out_features, rank)``, so that ``python -m mmpeft merge``
      can fold it into the base weight and ``export`` can write it in PEFT's format. A mixture
      collapses with ``gate``, the ``(experts,)`` mean of the gate its :class:`~mmpeft.adapters.routing.Router`
      applied over a task's data (:func:`~mmpeft.adapters.routing.expert_gate` checks it).
    - ``delta_weight()``: the update as a dense ``(out_features, in_features)`` matrix, for
      adapters that can be merged into the base weight but not written as a LoRA.

    An adapter whose update has no single weight at all (one per input, as MixLoRA's) says why in a
    class attribute ``unmergeable``; merge and export then refuse it with that message.

    Mixture adapters route with :mod:`mmpeft.adapters.routing`; their routers are bound to
    the model's routing context at injection, which is how they see task labels and masks and
    report auxiliary losses.
    """

    config_class: ClassVar[type]

    def __call__(self, in_features: int, out_features: int, config: Any) -> nn.Module: ...


class AdaptedLinear(nn.Module):
    """``y = base(x) + adapter(x)``: a frozen base linear layer with an adapter beside it."""

    def __init__(self, base: nn.Linear, adapter: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.adapter_name = adapter_name
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.add_in_place = True
        """Add the update into the base output's memory (``model.speed.inplace_add``): no base layer's backward reads its own output."""

    @property
    def weight(self) -> torch.Tensor:
        # Some model code reads `.weight` of a projection (e.g. for its dtype); point it at the base.
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = base_forward(self.base, x)  # (..., out_features)
        delta = self.adapter(x).to(y.dtype)  # (..., out_features)
        # Autograd forbids changing a custom Function's view output in place (bitsandbytes returns one for some shapes).
        return y.add_(delta) if self.add_in_place and not y._is_view() else y + delta

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}"
