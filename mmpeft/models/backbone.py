"""Load a multimodal backbone the QLoRA way and find its towers.

Any ``AutoModelForImageTextToText`` checkpoint loads here: LLaVA, Qwen2-VL/2.5-VL,
Idefics3/SmolVLM and others. Towers are found by attribute names that transformers
uses across families (a table, not one class per model), so a new family usually
needs no code, only, at worst, an explicit path in the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import logging
import re
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig, ProcessorMixin
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.utils import is_torchvision_available

from mmpeft.adapters.quant import keep_standard_layout
from mmpeft.errors import ConfigError
from mmpeft.speed import Speed, place_checkpointing

log = logging.getLogger(__name__)

# Where transformers keeps each tower, tried in order (relative to the top-level model).
LANGUAGE_MODEL_PATHS = ("model.language_model", "model.text_model", "language_model", "model.model")
VISION_PATHS = ("model.vision_tower", "model.visual", "model.vision_model", "vision_tower", "visual")
PROJECTOR_PATHS = ("model.multi_modal_projector", "model.visual.merger", "model.connector", "multi_modal_projector")


@dataclass
class Backbone:
    """Which multimodal model to fine-tune and how to load it."""

    pretrained: str
    """A local folder or a hub id of an ``AutoModelForImageTextToText`` checkpoint (its processor is loaded from the same place)."""

    quantization: Literal["nf4", "fp4", "int8", "none"] = "nf4"
    """Storage of the frozen base weights. NF4 is QLoRA's choice (Dettmers et al. 2023, sec. 3)."""

    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (QLoRA's double quantization, ~0.4 bit/param saved)."""

    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of the base layers' matmuls: ``auto`` is bfloat16 on CUDA and float32 on the CPU."""

    gradient_checkpointing: bool = True
    """Recompute activations in backward (non-reentrant, so auxiliary losses survive it)."""

    train_projector: bool = False
    """Train the vision-language projector in full (it is then kept unquantized). The vision tower is always frozen."""

    trust_remote_code: bool = False
    """Allow model code from the checkpoint's repository. Off unless you trust it."""

    attn_implementation: str | None = "sdpa"
    """Attention kernel passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``)."""

    build_tiny: Literal["llava", "qwen2_vl"] | None = None
    """Demo and tests only: if ``pretrained`` is a missing local folder, build a tiny random model of this family there first."""

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype != "auto":
            return getattr(torch, self.compute_dtype)
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def check_exists(self) -> None:
        check_checkpoint(self.pretrained, "model.backbone.pretrained")


def check_checkpoint(pretrained: str, key: str) -> None:
    """Fail early, naming the config key and path, when a local checkpoint folder is missing."""
    path = Path(pretrained).expanduser()
    looks_local = path.is_absolute() or pretrained.startswith((".", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise ConfigError(f"{key}: no checkpoint at {pretrained!r} (missing config.json)")


def get_path(model: nn.Module, candidates: tuple[str, ...], what: str, required: bool = True) -> tuple[str, nn.Module] | None:
    for path in candidates:
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    if required:
        raise ConfigError(f"cannot find the {what} of {type(model).__name__}; tried {', '.join(candidates)}")
    return None


def language_model(model: nn.Module) -> nn.Module:
    return get_path(model, LANGUAGE_MODEL_PATHS, "language model")[1]


def _skip_modules(backbone: Backbone) -> list[str]:
    # Never quantize the LM head (QLoRA keeps it in 16-bit) or a projector that will be trained.
    # transformers matches these as regexes from the start of a module path, or as suffixes.
    skip = ["lm_head"]
    if backbone.train_projector:
        skip += [r"(.*\.)?" + re.escape(path.rsplit("model.", 1)[-1]) for path in PROJECTOR_PATHS]
    return skip


def quantization_config(backbone: Backbone, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if backbone.quantization == "none":
        return None
    if backbone.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=_skip_modules(backbone))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=backbone.quantization,
        bnb_4bit_use_double_quant=backbone.double_quant,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=_skip_modules(backbone),
    )


def load_processor(pretrained: str, trust_remote_code: bool = False, key: str = "data.processor", **kwargs: Any):
    """The checkpoint's processor through ``AutoProcessor``.

    Processors of video-capable families (Qwen2-VL, ...) need torchvision for their video
    processor. mmpeft trains on images, so where torchvision is missing the same processor
    class is loaded without its video part rather than failing.
    """
    check_checkpoint(pretrained, key)
    kwargs["trust_remote_code"] = trust_remote_code
    try:
        try:
            return AutoProcessor.from_pretrained(pretrained, **kwargs)
        except ImportError as exc:
            if "torchvision" not in str(exc).lower() or is_torchvision_available():
                raise
            config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
            return _without_video(PROCESSOR_MAPPING[type(config)]).from_pretrained(pretrained, **kwargs)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot load a processor from {pretrained!r}: {exc}") from exc


def _without_video(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``processor_class`` whose sub-processors are only its image processor and tokenizer.

    ``ProcessorMixin`` reads the sub-processors from ``__init__``'s parameter names, so a
    subclass whose ``__init__`` omits ``video_processor`` neither loads nor requires one; the
    parent's ``__init__`` receives ``None`` for it, and a call with ``videos=`` is refused
    because the attribute is absent.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    log.warning("torchvision is not installed: loading %s without its video processor (images only)", processor_class.__name__)
    return type(processor_class.__name__, (processor_class,), {"__init__": __init__, "__module__": __name__})


def load_backbone(backbone: Backbone, device: torch.device, speed: Speed | None = None) -> nn.Module:
    """Load the model quantized on ``device`` and prepare it for adapter training (QLoRA recipe; ``speed``: where gradients and recomputation go)."""
    backbone.check_exists()
    dtype = backbone.torch_dtype(device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            backbone.pretrained,
            quantization_config=quantization_config(backbone, dtype),
            dtype=dtype,
            device_map={"": device},
            trust_remote_code=backbone.trust_remote_code,
            attn_implementation=backbone.attn_implementation,
        )
    except OSError as exc:
        raise ConfigError(f"cannot load model.backbone.pretrained={backbone.pretrained!r}: {exc}") from exc
    keep_standard_layout(model)
    prepare_for_training(model, backbone, speed or Speed())
    return model


def prepare_for_training(model: nn.Module, backbone: Backbone, speed: Speed) -> None:
    """Freeze the base, keep norms in fp32, checkpoint the language model's layers (non-reentrant) as ``speed`` places it."""
    model.requires_grad_(False)
    for module in model.modules():
        # Norms are tiny and sensitive to precision; QLoRA keeps them in fp32.
        if "norm" in type(module).__name__.lower():
            module.float()
    if backbone.train_projector:
        projector = get_path(model, PROJECTOR_PATHS, "projector")[1]
        projector.float().requires_grad_(True)
    if backbone.gradient_checkpointing:
        # Non-reentrant: the graph stays connected without inputs that require grad, and auxiliary losses survive it.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        place_checkpointing(model, language_model(model), speed.checkpoint_every)
    # transformers' checkpointing (and PEFT) make every embedding's output require grad, the frozen vision
    # tower's too, so that reentrant checkpointing sees a grad-requiring input; backward then runs through the
    # whole vision tower for nothing. Non-reentrant checkpointing needs none of it.
    if speed.input_grads:
        model.enable_input_require_grads()
    else:
        model.disable_input_require_grads()
