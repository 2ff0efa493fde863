"""Load a multimodal backbone the QLoRA way and find its towers.

Any image-text checkpoint of transformers loads here (``AutoModelForImageTextToText``, or
``AutoModelForMultimodalLM`` for Phi-4-multimodal): LLaVA, Qwen2-VL/2.5-VL/3-VL, Idefics3/SmolVLM,
Gemma 3, Mllama and others (docs/families.md). Towers are found by attribute names that transformers
uses across families (a table, not one class per model), so a new family usually
needs no code, only, at worst, an explicit path in the config.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    MODEL_FOR_MULTIMODAL_LM_MAPPING,
    AutoConfig,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
    BitsAndBytesConfig,
    ProcessorMixin,
)
from transformers.models.auto.configuration_auto import model_type_to_module_name
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from mmpeft.adapters.base import AdaptedLinear
from mmpeft.adapters.inject import PARTS, AdapterGroup, ModelPart, inject_parts
from mmpeft.adapters.quant import keep_standard_layout
from mmpeft.adapters.routing import RoutingContext
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
    """A local folder or a hub id of an ``AutoModelForImageTextToText`` checkpoint (its processor is loaded from the
    same place)."""

    quantization: Literal["nf4", "fp4", "int8", "none"] = "nf4"
    """Storage of the frozen base weights. NF4 is QLoRA's choice (Dettmers et al. 2023, sec. 3)."""

    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (QLoRA's double quantization, ~0.4 bit/param saved)."""

    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of the base layers' matmuls: ``auto`` is bfloat16 on CUDA and float32 on the CPU."""

    gradient_checkpointing: bool = True
    """Recompute activations in backward (non-reentrant, so auxiliary losses survive it)."""

    train_projector: bool = False
    """Train the vision-language projector in full (it is then kept unquantized; its learning rate is
    ``optim.projector_lr``). The vision tower's own weights are always frozen; adapters may go on it
    (``model.adapters[i].part: vision``)."""

    trust_remote_code: bool = False
    """Allow model code from the checkpoint's repository. Off unless you trust it."""

    attn_implementation: str | None = None
    """Attention kernel passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``).
    ``None``: transformers chooses per sub-model, sdpa where the architecture supports it (Gemma 2's soft-capping, in
    PaliGemma 2, does not)."""

    build_tiny: str | None = None
    """Demo and tests only: if ``pretrained`` is a missing local folder, build a tiny random model of this family there
    first (``python -m mmpeft tiny-model --help`` lists the families)."""

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype != "auto":
            return getattr(torch, self.compute_dtype)
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def check_exists(self) -> None:
        if self.build_tiny is not None:
            from mmpeft.models.tiny import FAMILIES

            if self.build_tiny not in FAMILIES:
                raise ConfigError(
                    f"model.backbone.build_tiny: unknown family {self.build_tiny!r}; one of {', '.join(FAMILIES)}"
                )
            return  # built in prepare_data
        check_checkpoint(self.pretrained, "model.backbone.pretrained")


def check_checkpoint(pretrained: str, key: str) -> None:
    """Fail early, naming the config key and path, when a local checkpoint folder is missing."""
    path = Path(pretrained).expanduser()
    looks_local = path.is_absolute() or pretrained.startswith((".", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise ConfigError(f"{key}: no checkpoint at {pretrained!r} (missing config.json)")


def get_path(
    model: nn.Module, candidates: tuple[str, ...], what: str, required: bool = True
) -> tuple[str, nn.Module] | None:
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


def model_parts(model: nn.Module) -> dict[str, ModelPart]:
    """The language model, vision tower and projector of a multimodal ``model`` that it has, by part (the first path
    of each table that exists)."""
    parts = {}
    for part, paths in (("language", LANGUAGE_MODEL_PATHS), ("vision", VISION_PATHS), ("projector", PROJECTOR_PATHS)):
        found = get_path(model, paths, PARTS[part], required=False)
        if found is not None:
            parts[part] = ModelPart(part, found[0], found[1])
    for part in parts.values():
        part.others = [p.path for p in parts.values() if p is not part]
    return parts


def inject_model_adapters(
    model: nn.Module, groups: list[AdapterGroup], context: RoutingContext | None = None
) -> dict[str, AdaptedLinear]:
    """Put the adapter groups into the multimodal ``model``: each into the part its ``part`` names (language model,
    vision tower, projector; see :func:`mmpeft.adapters.inject.inject_parts`). Returns the adapted layers by their
    path in ``model``."""
    return inject_parts(model, model_parts(model), groups, context)


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

    Processors of video-capable families (Qwen2-VL, SmolVLM, InternVL, ...) need torchvision
    for their video processor. mmpeft trains on images, so where torchvision is missing the
    same processor class is loaded without its video part rather than failing, with every
    setting of its ``processor_config.json`` (``image_seq_len``, ...) kept.
    """
    check_checkpoint(pretrained, key)
    kwargs["trust_remote_code"] = trust_remote_code
    try:
        try:
            return AutoProcessor.from_pretrained(pretrained, **kwargs)
        except (ImportError, ValueError) as exc:  # some processors say ValueError("... requires `torchvision` ...")
            if "torchvision" not in str(exc).lower() or is_torchvision_available():
                raise
            config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
            processor_class = PROCESSOR_MAPPING[type(config)]
            if (
                type(processor_class).__name__ == "DummyObject"
            ):  # transformers' stand-in for a class it could not import
                processor_class = _import_with_pil_helpers(processor_class.__name__)
            return _without_video(processor_class, pretrained).from_pretrained(pretrained, **kwargs)
    except (ImportError, ValueError) as exc:
        if isinstance(exc, ValueError) and "torchvision" not in str(exc).lower():
            raise
        raise ConfigError(
            f"{key}: the processor of {pretrained!r} needs a package that is not installed: "
            f"{' '.join(str(exc).split())}"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{key}: cannot load a processor from {pretrained!r}: {exc}") from exc


def _import_with_pil_helpers(class_name: str) -> type[ProcessorMixin]:
    """Import the processor class ``class_name`` whose module takes helper functions from its torchvision image
    processor.

    PixtralProcessor's module imports ``get_resize_output_image_size`` from
    ``image_processing_pixtral``, which needs torchvision; the same function is in its PIL twin,
    ``image_processing_pil_pixtral``. For the import only, the PIL module stands in for the
    torchvision one; the image processor itself is then the PIL class (``AutoImageProcessor``'s
    choice without torchvision).
    """
    tried = []
    for model_type, name in PROCESSOR_MAPPING_NAMES.items():
        if name != class_name:
            continue
        package = f"transformers.models.{model_type_to_module_name(model_type)}"
        module = f"{package}.processing_{model_type_to_module_name(model_type)}"
        twin = f"{package}.image_processing_{model_type_to_module_name(model_type)}"
        tried.append(module)
        if (
            importlib.util.find_spec(module) is None
            or importlib.util.find_spec(twin.replace("image_processing_", "image_processing_pil_")) is None
        ):
            continue
        sys.modules[twin] = importlib.import_module(twin.replace("image_processing_", "image_processing_pil_"))
        try:
            return getattr(importlib.import_module(module), class_name)
        finally:
            del sys.modules[twin]
    raise ImportError(
        f"{class_name} needs torchvision and has no PIL image processor to stand in "
        f"(looked in {', '.join(tried) or 'no module'})"
    )


class NoVideoProcessor:
    """Stands in for a video processor where torchvision is missing.

    Carries the settings of the checkpoint's ``video_preprocessor_config.json`` (``num_frames``,
    ``fps``: some processors read them while rendering a chat) and refuses to process videos.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.__dict__.update(settings)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None  # a setting the checkpoint does not store

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ImportError("processing videos needs torchvision, which is not installed; mmpeft trains on images")


def _without_video(processor_class: type[ProcessorMixin], pretrained: str) -> type[ProcessorMixin]:
    """``processor_class`` whose sub-processors are only its image processor and tokenizer.

    ``ProcessorMixin`` reads the sub-processors from ``__init__``'s parameters and the settings it
    accepts from ``processor_config.json`` from ``__init__``'s code object, so the subclass gets an
    ``__init__`` with the parent's parameters less ``video_processor`` (written out, so that every
    setting such as ``image_seq_len`` or ``num_image_tokens`` still loads). The parent's ``__init__``
    receives ``None`` for the video processor, and ``video_processor`` is then a
    :class:`NoVideoProcessor` with the checkpoint's video settings.
    """
    parameters = [
        p
        for name, p in inspect.signature(processor_class.__init__).parameters.items()
        if name not in ("self", "video_processor") and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    defaults = {p.name: None if p.default is inspect.Parameter.empty else p.default for p in parameters}
    names = [p.name for p in parameters]
    source = (
        f"def __init__(self, {''.join(f'{n}=_defaults[{n!r}], ' for n in names)}**kwargs):\n"
        f"    _parent_init(self, {''.join(f'{n}={n}, ' for n in names)}video_processor=None, **kwargs)\n"
        f"    self.video_processor = _video\n"
    )
    settings = _read_json(Path(pretrained) / "video_preprocessor_config.json")
    scope = {"_defaults": defaults, "_parent_init": processor_class.__init__, "_video": NoVideoProcessor(settings)}
    exec(source, scope)  # noqa: S102 - the parameter names come from the processor class, not from data
    log.warning(
        "torchvision is not installed: loading %s without its video processor (images only)", processor_class.__name__
    )
    return type(processor_class.__name__, (processor_class,), {"__init__": scope["__init__"], "__module__": __name__})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def auto_model_class(config: Any, key: str = "model.backbone.pretrained") -> type:
    """The transformers auto class that builds this image-text checkpoint.

    ``AutoModelForImageTextToText`` for nearly every family; ``AutoModelForMultimodalLM`` for an
    image-text model mapped only there (Phi-4-multimodal), recognised by its vision config. Any
    other checkpoint is refused, naming its model type.
    """
    if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return AutoModelForImageTextToText
    if type(config) in MODEL_FOR_MULTIMODAL_LM_MAPPING and getattr(config, "vision_config", None) is not None:
        return AutoModelForMultimodalLM
    raise ConfigError(
        f"{key}: model type {getattr(config, 'model_type', type(config).__name__)!r} is not an image-text model "
        "transformers can build (its config is in neither AutoModelForImageTextToText nor, with a vision config, "
        "AutoModelForMultimodalLM); "
        "docs/families.md lists the families mmpeft is tested on"
    )


def load_backbone(backbone: Backbone, device: torch.device, speed: Speed | None = None) -> nn.Module:
    """Load the model quantized on ``device`` and prepare it for adapter training (QLoRA recipe; ``speed``: where
    gradients and recomputation go)."""
    backbone.check_exists()
    dtype = backbone.torch_dtype(device)
    try:
        config = AutoConfig.from_pretrained(backbone.pretrained, trust_remote_code=backbone.trust_remote_code)
        model = auto_model_class(config).from_pretrained(
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
    """Freeze the base, keep norms in fp32, checkpoint the language model's layers (non-reentrant) as ``speed``
    places it."""
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
