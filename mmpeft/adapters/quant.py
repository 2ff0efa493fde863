"""The one seam between adapters and (possibly quantized) base layers.

Every adapter layer runs its frozen base layer through :func:`base_forward` and
reads its weight through :func:`dequantized_weight`; nothing else in the project
knows how bitsandbytes stores a 4-bit or 8-bit matrix. Adding a quantization
backend means extending these functions, not writing a layer class per adapter.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    """True for plain and bitsandbytes linear layers (both subclass ``nn.Linear``)."""
    return isinstance(module, nn.Linear)


def quantization_of(layer: nn.Module) -> str:
    """``"nf4"``/``"fp4"`` for 4-bit layers, ``"int8"`` for 8-bit, ``"none"`` otherwise."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return layer.weight.quant_type
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "int8"
    return "none"


def keep_standard_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPUs with AVX512-BF16.

    On such CPUs ``Linear4bit.forward`` rewrites its weight into a CPU-specific packed layout
    the first time it runs in eval mode without grad (generation, validation). That path fails
    for layers narrower than a quantization block (tiny models) and leaves a weight that
    :func:`dequantized_weight`, merging and export can no longer read. Keeping the standard
    layout costs some CPU inference speed on those machines and nothing on a GPU. Returns the
    number of 4-bit layers changed.
    """
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def base_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the frozen base layer. bitsandbytes layers dequantize inside their own kernels."""
    return layer(x)


def dequantized_weight(layer: nn.Linear) -> torch.Tensor:
    """The base weight as a float32 ``(out_features, in_features)`` tensor."""
    weight = layer.weight
    if weight.device.type == "meta":  # a model built without weights (mmpeft.memory): shapes only
        return torch.empty(layer.out_features, layer.in_features, device="meta")
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if isinstance(layer, bnb.nn.Linear8bitLt) and getattr(weight, "SCB", None) is not None:
        return weight.CB.float() * weight.SCB.float().unsqueeze(1) / 127.0
    return weight.detach().float()


class BaseLayerView:
    """Read-only access to a frozen base layer for adapters that need its weight (e.g. DoRA).

    Deliberately not an ``nn.Module``: an adapter holding a view does not register the base's
    tensors as its own, so they never enter its state dict, its optimizer or its checkpoint.
    """

    def __init__(self, layer: nn.Linear) -> None:
        self._layer = layer
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.quantization = quantization_of(layer)

    def weight(self) -> torch.Tensor:
        """The base weight as float32 ``(out_features, in_features)``, dequantized if needed (no grad)."""
        with torch.no_grad():
            return dequantized_weight(self._layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._layer.bias
