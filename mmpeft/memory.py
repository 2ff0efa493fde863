"""What a training run holds in memory before its first batch: weights, adapters, gradients, optimizer state.

The model is built on the meta device from the checkpoint's ``config.json`` (no weight is read),
quantized the way :func:`mmpeft.models.backbone.load_backbone` loads it (transformers' own
bitsandbytes quantizer decides which linear layers become 4-bit), and the adapters are injected
exactly as training injects them; every byte is then counted from the modules' shapes and dtypes:

- **4-bit weights**: two values per byte, plus their quantization state (one absmax per block of
  64 values: a byte each with double quantization, with a float32 per 256 of those; float32 without;
  and the code tables);
- **frozen modules kept unquantized** (embeddings, the LM head, norms in float32, convolutions of the
  vision tower, biases), in their dtypes;
- **trainable tensors** (adapters, routers, a trained projector) in float32, their **gradients**, and
  the **optimizer state** (AdamW: two float32 moments; bitsandbytes' 8-bit AdamW: two bytes per value
  plus a float32 absmax per block of 256, for tensors of 4096 values or more, float32 below).

``tests/test_memory.py`` checks every line above byte for byte against the model ``load_backbone`` loads,
for every supported family. What a batch adds (activations, the loss, gradients in flight) is counted by
:mod:`mmpeft.activations`; :mod:`mmpeft.planner` puts the two together.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig
from transformers.quantizers import AutoHfQuantizer

from mmpeft.adapters import AdapterGroup
from mmpeft.adapters.routing import RoutingContext
from mmpeft.errors import ConfigError
from mmpeft.models.backbone import (
    VISION_PATHS,
    Backbone,
    auto_model_class,
    get_path,
    inject_model_adapters,
    prepare_for_training,
    quantization_config,
)
from mmpeft.speed import Speed

log = logging.getLogger("mmpeft")

NF4_BLOCK = 64
"""Values per absmax of bitsandbytes' 4-bit quantization (its default blocksize)."""
NESTED_BLOCK = 256
"""Absmax values per float32 of the double quantization."""
ADAM8_BLOCK = 256
"""Values per float32 absmax of bitsandbytes' blockwise 8-bit optimizer state."""
ADAM8_MIN_SIZE = 4096
"""bitsandbytes' 8-bit optimizers keep tensors with fewer values in 32 bit (their ``min_8bit_size``)."""


@dataclass(frozen=True)
class Part:
    """One line of the breakdown."""

    name: str
    bytes: int
    note: str = ""


def quantized_bytes(layer: bnb.nn.Linear4bit, double_quant: bool) -> int:
    """Bytes of a 4-bit linear layer's weight as bitsandbytes stores it: packed values and quantization state."""
    values = layer.in_features * layer.out_features
    blocks = math.ceil(values / NF4_BLOCK)
    packed = math.ceil(values / 2)
    code = 16 * 4  # the 4-bit code table, float32
    if double_quant:
        # uint8 absmax per block, a float32 absmax per 256 of them, its 256-entry float32 code and an offset
        state = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + 4
    else:
        state = 4 * blocks
    return packed + state + code


def meta_model(backbone: Backbone, device_type: str = "cuda", speed: Speed | None = None) -> nn.Module:
    """The backbone built on the meta device, quantized and typed as :func:`load_backbone` would on ``device_type``;
    with ``speed``, checkpointed as training places it (else without checkpointing: it changes no tensor's size)."""
    dtype = backbone.torch_dtype(torch.device(device_type))
    config = AutoConfig.from_pretrained(backbone.pretrained, trust_remote_code=backbone.trust_remote_code)
    with init_empty_weights():
        model = auto_model_class(config).from_config(
            config,
            dtype=dtype,
            trust_remote_code=backbone.trust_remote_code,
            attn_implementation=_planned_attention(backbone.attn_implementation),
        )
    quantization = quantization_config(backbone, dtype)
    if quantization is not None:
        quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
        quantizer.preprocess_model(model, device_map={"": device_type})
    # from_pretrained loads every floating parameter in `dtype` (buffers such as rotary frequencies stay as
    # computed); from_config and the quantizer's new layers leave some in float32.
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and not isinstance(param, bnb.nn.Params4bit):
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad))
    model.tie_weights()  # tied embeddings are one tensor, as after from_pretrained
    for name in getattr(model, "_keep_in_fp32_modules", None) or []:  # as from_pretrained keeps them
        for path, module in model.named_modules():
            if path.endswith(name):
                module.float()
    # What load_backbone does next: base frozen, norms in float32, a trained projector in float32, checkpointing.
    if speed is None:
        backbone = dataclasses.replace(backbone, gradient_checkpointing=False)
    prepare_for_training(model, backbone, speed or Speed())
    return model


def _planned_attention(name: str | None) -> str | None:
    """The attention implementation the meta model is built with: flash-attention's packages need a GPU to import,
    so its kernels are planned as SDPA's flash kernel (the same saved tensors: the output and its log-sum-exp)."""
    return "sdpa" if name is not None and name.startswith("flash_attention") else name


def _unique(tensors) -> list[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    out = []
    for name, tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


def static_memory(
    backbone: Backbone, adapters: list[AdapterGroup], optimizer: str = "adamw", device_type: str = "cuda"
) -> list[Part]:
    """The breakdown of what training holds before its first batch (see the module's docstring)."""
    model = meta_model(backbone, device_type)
    with torch.device("meta"):  # the adapters too: sizes only, no initialisation
        inject_model_adapters(model, adapters, RoutingContext())
    vision = get_path(model, VISION_PATHS, "vision tower", required=False)
    vision_ids = {id(t) for t in vision[1].parameters()} if vision is not None else set()
    four_bit = {id(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    quantized = sum(
        quantized_bytes(m, backbone.double_quant) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
    )
    frozen_vision = frozen_other = 0
    trainable: list[torch.Tensor] = []
    for _, tensor in _unique(list(model.named_parameters()) + list(model.named_buffers())):
        if id(tensor) in four_bit:
            continue
        if tensor.requires_grad:
            trainable.append(tensor)
            continue
        size = tensor.numel() * tensor.element_size()
        if id(tensor) in vision_ids:
            frozen_vision += size
        else:
            frozen_other += size
    values = sum(t.numel() for t in trainable)
    train_bytes = sum(t.numel() * t.element_size() for t in trainable)
    if optimizer == "adamw":
        state = 8 * values
    else:  # adamw_8bit, paged_adamw_8bit
        state = sum(
            2 * t.numel() + 8 * math.ceil(t.numel() / ADAM8_BLOCK) if t.numel() >= ADAM8_MIN_SIZE else 8 * t.numel()
            for t in trainable
        )
    bits = backbone.quantization
    return [
        Part("quantized weights", quantized, f"{bits}, quantization state included" if quantized else "none"),
        Part("vision tower (unquantized part)", frozen_vision, "frozen"),
        Part("other frozen tensors", frozen_other, "embeddings, LM head, norms (float32), biases, buffers"),
        Part("trainable tensors", train_bytes, f"{values:,} values: adapters, routers, a trained projector"),
        Part("gradients", train_bytes, "one per trainable value"),
        Part(
            "optimizer state", state, optimizer + (" (paged: may move to CPU memory)" if "paged" in optimizer else "")
        ),
    ]


# -- the preflight: stop before loading any weight when the run cannot fit --------------------------------------

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)


def parse_size(text: str, key: str) -> int:
    """``"12GiB"``, ``"16 GB"``, ``"800MiB"`` in bytes; ConfigError naming ``key`` otherwise."""
    match = _SIZE.match(str(text))
    if match is None:
        raise ConfigError(f"{key}: {text!r} is not a size; write e.g. 12GiB, 16GB or 800MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def gib(count: int) -> str:
    """``count`` bytes in GiB, or MiB / KiB below one of the larger unit."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count / 2**10:.1f} KiB"
