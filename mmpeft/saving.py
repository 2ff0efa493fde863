"""Adapter directories: what a trained adapter is, and the tensors that make it.

An adapter directory holds everything needed to put a trained adapter back on its base model::

    adapter_config.json    the adapter groups (plugin name, part of the model, targets, every
                           hyperparameter, optimizer settings), the
                           base model's name and a fingerprint of its architecture, the task
                           vocabulary, whether the projector was trained, the mmpeft version
    adapter.safetensors    the trained tensors, keyed by their path in the transformers model

Loading reads only JSON and safetensors: nothing is ever unpickled. The directory is written
as a whole into a temporary sibling and renamed into place (:mod:`mmpeft.files`), so a crash
during a save leaves the previous version or the new one, never a mixture.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import mmpeft
from mmpeft.adapters.base import AdaptedLinear
from mmpeft.adapters.inject import AdapterGroup
from mmpeft.adapters.routing import RoutingContext
from mmpeft.errors import ConfigError
from mmpeft.files import staged_dir, write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "mmpeft-adapter"
FORMAT_VERSION = 1

# The fields of the language model's config that decide whether an adapter's tensors fit it.
_TEXT_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


class AdapterError(ConfigError):
    """An adapter directory is missing, damaged, or does not fit the model it is loaded onto."""


def base_summary(config: Any) -> dict[str, Any]:
    """The architecture facts of a transformers config that an adapter depends on."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    summary: dict[str, Any] = {
        "architecture": (getattr(config, "architectures", None) or [type(config).__name__])[0],
        "model_type": getattr(config, "model_type", None),
    }
    for name in _TEXT_FIELDS:
        value = getattr(text, name, None)
        if value is not None:
            summary[f"text.{name}"] = value
    return summary


def fingerprint(summary: dict[str, Any]) -> str:
    """A short hash of :func:`base_summary`, for a quick look; the summary itself is what gets compared."""
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class AdapterSpec:
    """The contents of ``adapter_config.json``."""

    groups: list[AdapterGroup]
    """Which adapter plugin goes on which layers of which part (language model, vision tower, projector), with every
    hyperparameter spelled out."""

    base_model: str
    """``backbone.pretrained`` of the run that trained the adapter (written absolute when it is a local folder)."""

    base: dict[str, Any]
    """:func:`base_summary` of that model."""

    tasks: list[str] = field(default_factory=list)
    """The task vocabulary: task id = position."""

    train_projector: bool = False
    """Whether the vision-language projector was trained (its tensors are then in the file too)."""

    mmpeft_version: str = mmpeft.__version__

    quantization: str | None = None
    """How the base was stored in training (``nf4``, ``fp4``, ``int8``, ``none``); ``None`` when unknown."""

    double_quant: bool = True
    """Whether the 4-bit base used double quantization in training."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mmpeft_version": self.mmpeft_version,
            "adapters": [dataclasses.asdict(g) for g in self.groups],
            "base_model": {
                "name_or_path": stored_base(self.base_model),
                "fingerprint": fingerprint(self.base),
                **self.base,
            },
            "tasks": list(self.tasks),
            "train_projector": self.train_projector,
            "base_loading": {"quantization": self.quantization, "double_quant": self.double_quant},
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> AdapterSpec:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise AdapterError(f'{where} is not an mmpeft adapter config (no "format": "{FORMAT}")')
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise AdapterError(
                f"{where} has format version {data['format_version']}; "
                f"this mmpeft ({mmpeft.__version__}) reads up to {FORMAT_VERSION}"
            )
        try:
            groups = [
                AdapterGroup(
                    name=g["name"],
                    targets=list(g["targets"]),
                    config=dict(g["config"]),
                    # Written since adapters could go beyond the language model; older directories hold only it.
                    part=g.get("part", "language"),
                    layers=None if g.get("layers") is None else [int(n) for n in g["layers"]],
                    lr=g.get("lr"),
                    weight_decay=g.get("weight_decay"),
                    router_lr=g.get("router_lr"),
                    routing_losses=bool(g.get("routing_losses", False)),
                )
                for g in data["adapters"]
            ]
            base = {k: v for k, v in data["base_model"].items() if k not in ("name_or_path", "fingerprint")}
            loading = data.get("base_loading") or {}
            return cls(
                groups,
                data["base_model"]["name_or_path"],
                base,
                list(data.get("tasks") or []),
                bool(data.get("train_projector", False)),
                data.get("mmpeft_version", "?"),
                loading.get("quantization"),
                bool(loading.get("double_quant", True)),
            )
        except (KeyError, TypeError) as exc:
            raise AdapterError(f"{where}: malformed adapter config ({type(exc).__name__}: {exc})") from exc

    def resolved(self) -> AdapterSpec:
        """A copy whose groups list every hyperparameter (defaults included) of their plugin's config; checks the
        plugins exist."""
        groups = []
        for i, group in enumerate(self.groups):
            _, config = group.resolve(i)
            groups.append(dataclasses.replace(group, targets=list(group.targets), config=dataclasses.asdict(config)))
        return dataclasses.replace(self, groups=groups)

    def check_base(self, config: Any, where: str) -> None:
        """Raise :class:`AdapterError` listing every architecture fact that differs from the model's ``config``."""
        actual = base_summary(config)
        differ = [
            f"{k}: adapter {self.base.get(k)!r}, model {actual.get(k)!r}"
            for k in sorted(set(self.base) | set(actual))
            if self.base.get(k) != actual.get(k)
        ]
        if differ:
            raise AdapterError(
                f"{where} was trained on {self.base_model!r}, a different model than this one: " + "; ".join(differ)
            )


def stored_base(pretrained: str) -> str:
    """How ``adapter_config.json`` names the base ``pretrained``: a local folder by its absolute path, so the
    adapter finds it from any working directory; a hub id as it is."""
    path = Path(pretrained).expanduser()
    return os.path.abspath(path) if path.is_dir() else pretrained


def check_recorded_base(spec: AdapterSpec, adapter: str | os.PathLike, override: str) -> None:
    """Fail, saying which folder was tried, when the base that the adapter directory ``adapter`` names is a missing
    local folder.

    Older adapter directories recorded a relative ``model.backbone.pretrained`` as it was given,
    relative to the folder training ran in. ``override`` is the option that gives the base instead.
    """
    name = spec.base_model
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return
    config = Path(adapter) / CONFIG_NAME
    if path.is_absolute():
        raise AdapterError(
            f"{config} names the base model {name!r}, but there is no checkpoint there (missing config.json); "
            f"if it has moved, give it with {override}"
        )
    if name.startswith((".", "~")) or path.exists() or name.count("/") > 1:  # a folder, not a hub id
        raise AdapterError(
            f"{config} names the base model {name!r}, a path relative to the folder training ran in; from here it is "
            f"{os.path.abspath(path)}, which holds no checkpoint (missing config.json): "
            f"run from the training folder or give {override}"
        )


def trainable_tensors(model: nn.Module, projector_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` (and the projector's, under ``projector_prefix``), keyed by path, on the CPU."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            for key, value in module.adapter.state_dict().items():
                tensors[f"{name}.adapter.{key}"] = value
    if projector_prefix is not None:
        for key, value in model.get_submodule(projector_prefix).state_dict().items():
            tensors[f"{projector_prefix}.{key}"] = value
    # safetensors refuses views that share storage; every tensor gets its own contiguous copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_adapter(out: str | os.PathLike, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter directory (replacing ``out`` atomically); returns its path."""
    out = Path(out)
    with staged_dir(out) as staging:
        save_file(
            tensors, str(staging / WEIGHTS_NAME), metadata={"format": FORMAT, "mmpeft_version": spec.mmpeft_version}
        )
        write_json(staging / CONFIG_NAME, spec.to_json())
    return out


def read_spec(path: str | os.PathLike) -> AdapterSpec:
    """The spec of the adapter directory ``path``, with errors that name the file."""
    path = Path(path)
    config = path / CONFIG_NAME
    if not path.is_dir():
        raise AdapterError(f"adapter directory {str(path)!r} does not exist")
    if not config.is_file():
        raise AdapterError(f"{config} is missing: {str(path)!r} is not an adapter directory")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AdapterError(f"{config} is not valid JSON: {exc}") from exc
    return AdapterSpec.from_json(data, str(config))


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the adapter directory ``path`` (safetensors only; a missing or truncated file is an error naming
    it)."""
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{weights} is missing")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights} cannot be read (truncated or not a safetensors file): {exc}") from exc


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into ``model``, which must have exactly these adapter (and projector) tensors."""
    expected = trainable_tensors(model)  # adapter tensors only; projector tensors are checked below
    state = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(k for k in tensors if k not in state)
    if missing or unexpected:
        detail = (f"missing {missing[:5]}" + (" ..." if len(missing) > 5 else "")) if missing else ""
        detail += ("; " if missing and unexpected else "") + (
            (f"unexpected {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else "")) if unexpected else ""
        )
        raise AdapterError(f"{where} does not match the adapted model: {detail}")
    for key, value in tensors.items():
        if state[key].shape != value.shape:
            raise AdapterError(
                f"{where}: {key} has shape {tuple(value.shape)}, the model's is {tuple(state[key].shape)}"
            )
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(value)


def apply_adapter(
    model: nn.Module, path: str | os.PathLike, context: RoutingContext | None = None, *, trainable: bool = False
) -> AdapterSpec:
    """Put the adapter directory ``path`` onto the loaded transformers ``model``.

    Checks the base model, injects the adapter groups into the parts of the model they name (language
    model, vision tower, projector; routers bound to ``context``), and loads the tensors. With
    ``trainable`` the adapter tensors require grad (further training), else the whole model is frozen
    (inference). Returns the spec.
    """
    from mmpeft.models.backbone import inject_model_adapters

    spec = read_spec(path)
    spec.check_base(model.config, f"adapter {str(path)!r}")
    tensors = read_tensors(path)  # before touching the model: a damaged file changes nothing
    inject_model_adapters(model, spec.groups, context)
    load_tensors(model, tensors, f"adapter {str(path)!r}")
    for name, param in model.named_parameters():
        param.requires_grad_(trainable and (".adapter." in name or name in tensors))
    return spec


@dataclass
class AdaptedModel:
    """What :func:`load_adapted` returns."""

    model: nn.Module
    """The transformers model with the adapter in it (eval mode unless ``trainable``)."""
    processor: Any
    spec: AdapterSpec
    routing: RoutingContext
    """The routers' shared context: ``routing.generate(model, **inputs)`` generates routing instances once per
    prompt."""


def load_adapted(
    path: str | os.PathLike,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    trainable: bool = False,
    **backbone: Any,
) -> AdaptedModel:
    """Load the base model (``pretrained``, by default the one the adapter was trained on) the QLoRA way and put the
    adapter directory ``path`` on it.

    ``backbone`` takes :class:`~mmpeft.models.backbone.Backbone` fields, e.g. ``quantization="none"``.
    """
    from mmpeft.models.backbone import Backbone, load_backbone, load_processor

    spec = read_spec(path)
    if pretrained is None:
        check_recorded_base(spec, path, "load_adapted(path, pretrained)")
    if spec.quantization is not None:  # as in training, unless the caller says otherwise
        backbone.setdefault("quantization", spec.quantization)
        backbone.setdefault("double_quant", spec.double_quant)
    settings = Backbone(pretrained=pretrained or spec.base_model, **backbone)
    if spec.train_projector:
        settings.train_projector = True  # the projector's trained weights are in the directory: keep it unquantized
    model = load_backbone(settings, torch.device(device))
    routing = RoutingContext()
    apply_adapter(model, path, routing, trainable=trainable)
    processor = load_processor(settings.pretrained, settings.trust_remote_code, key="pretrained")
    return AdaptedModel(model.train(trainable), processor, spec, routing)
