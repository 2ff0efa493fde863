"""Put adapters into a model's linear layers, chosen by name.

Target patterns are matched against module paths relative to the language model
(e.g. ``layers.0.self_attn.q_proj``): a bare name such as ``q_proj`` matches the last
path component (peft's convention), anything else is a shell-style glob over the
whole path (``layers.*.mlp.*``). Groups let different adapters go on different
layers, e.g. LoRA on attention and AsymLoRA on the MLP (HydraLoRA's own recipe).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmpeft import registry
from mmpeft.adapters.base import Ability, AdaptedLinear, abilities_of, check_adapter_class
from mmpeft.adapters.quant import BaseLayerView, is_linear
from mmpeft.adapters.routing import RoutingContext, bind_routers, share_block_routers
from mmpeft.errors import ConfigError

# Every supported family names its language model's layers the Llama way, except Phi's fused ones
# (qkv_proj, gate_up_proj). Mllama's cross-attention layers (cross_attn.q_proj, ...) are attention too.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"]
MLP = ["gate_proj", "up_proj", "down_proj", "gate_up_proj"]
# Group aliases a config may use in `targets`: an alias must match some layer, not every name in it.
ALIASES: dict[str, list[str]] = {"attention": ATTENTION, "mlp": MLP, "all-linear": ["*"]}


@dataclass
class AdapterGroup:
    """One adapter type applied to a set of linear layers of the language model."""

    name: str = "lora"
    """Registered adapter name (``python -m mmpeft adapters`` lists them)."""

    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Which linear layers: bare names (``q_proj``), globs over the path (``layers.*.mlp.*``), or the
    aliases ``attention``, ``mlp``, ``all-linear``."""

    config: dict[str, Any] = field(default_factory=dict)
    """The adapter's hyperparameters (its config class's fields, e.g. ``r``, ``alpha``, ``dropout`` for LoRA)."""

    def resolve(self, index: int) -> tuple[type, Any]:
        """The adapter class and its validated config; raises ConfigError naming the bad name or key."""
        cls = load_adapter(self.name)
        config = registry.build_config(cls.config_class, self.config, f"adapters[{index}] ({self.name}).config")
        return cls, config


def load_adapter(name: str) -> type:
    """The adapter class registered as ``name`` under ``mmpeft.adapters``, checked against the contract.

    Raises ConfigError for an unknown name (listing the registered ones), a plugin that fails to
    import, or one that fails :func:`~mmpeft.adapters.base.check_adapter_class` (naming what is missing).
    """
    return registry.load(registry.ADAPTERS, name, check=check_adapter_class)


def describe_adapters() -> list[registry.PluginInfo]:
    """Every registered adapter plugin, as ``python -m mmpeft adapters`` lists them, with why any is unusable."""
    return registry.describe(registry.ADAPTERS, check=check_adapter_class)


def group_labels(groups: list[AdapterGroup]) -> list[str]:
    """How statistics and logs name each group: its adapter's name, or ``<name>.<index>`` when several
    groups share it."""
    names = [g.name for g in groups]
    return [name if names.count(name) == 1 else f"{name}.{i}" for i, name in enumerate(names)]


def _collapse(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def linear_layer_names(module: nn.Module) -> list[str]:
    """Paths of every linear layer (plain or bitsandbytes) under ``module``."""
    return [name for name, sub in module.named_modules() if name and is_linear(sub)]


def _matches(name: str, pattern: str) -> bool:
    if "." not in pattern and not any(c in pattern for c in "*?["):
        return name.rsplit(".", 1)[-1] == pattern
    return fnmatch.fnmatchcase(name, pattern)


def inject_adapters(
    language_model: nn.Module, groups: list[AdapterGroup], context: RoutingContext | None = None
) -> dict[str, AdaptedLinear]:
    """Wrap each targeted linear layer in an :class:`AdaptedLinear`; returns them by path.

    The routers of mixture adapters are bound to ``context`` (one per model, see
    :mod:`mmpeft.adapters.routing`), labelled by :func:`group_labels`; adapters that declare
    ``reads_base_weight`` get a read-only view of their base layer. Raises ConfigError when a
    pattern matches no layer (listing the layers that exist) or when two groups claim the
    same layer.
    """
    candidates = linear_layer_names(language_model)
    existing = ", ".join(sorted(set(map(_collapse, candidates))))
    owner: dict[str, int] = {}
    for i, group in enumerate(groups):
        for target in group.targets:
            hits = [
                name for name in candidates if any(_matches(name, pattern) for pattern in ALIASES.get(target, [target]))
            ]
            if not hits:
                raise ConfigError(
                    f"adapters[{i}] ({group.name}): target {target!r} matches no linear layer of the "
                    f"language model; its linear layers are: {existing}"
                )
            for name in hits:
                if owner.setdefault(name, i) != i:
                    raise ConfigError(
                        f"layer {name!r} is targeted by adapters[{owner[name]}] and adapters[{i}]; "
                        "each layer takes one adapter"
                    )
    resolved = [g.resolve(i) for i, g in enumerate(groups)]
    labels = group_labels(groups)
    wrapped: dict[str, AdaptedLinear] = {}
    for name in candidates:
        if name not in owner:
            continue
        base = language_model.get_submodule(name)
        cls, config = resolved[owner[name]]
        adapter = cls(base.in_features, base.out_features, config)
        # Adapters train in full precision on the base layer's device, whatever the base's storage dtype.
        adapter.to(device=_device_of(base), dtype=torch.float32)
        if Ability.READS_BASE_WEIGHT in abilities_of(cls):
            adapter.attach_base(BaseLayerView(base))
        if context is not None:
            bind_routers(adapter, context, name, labels[owner[name]])
        layer = AdaptedLinear(base, adapter, groups[owner[name]].name)
        layer.train(base.training)  # new modules start in train mode; follow the model's (dropout off in eval)
        language_model.set_submodule(name, layer)
        wrapped[name] = layer
    blocks: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, layer in wrapped.items():
        if Ability.BLOCK_ROUTER in abilities_of(type(layer.adapter)) and layer.adapter.config.router == "block":
            blocks.setdefault(name.rpartition(".")[0], []).append((name, layer.adapter))
    if blocks:  # one router per block, shared by its adapted projections (routing.share_block_routers)
        share_block_routers(language_model, blocks, context if context is not None else RoutingContext())
    return wrapped


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of ``model``, keyed by their full path."""
    return {
        f"{name}.adapter.{key}": value
        for name, sub in model.named_modules()
        if isinstance(sub, AdaptedLinear)
        for key, value in sub.adapter.state_dict().items()
    }
