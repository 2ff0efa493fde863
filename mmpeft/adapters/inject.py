"""Put adapters into a model's linear layers, chosen by name, in the language model, the vision tower or the
projector.

Each :class:`AdapterGroup` names the part of the model it goes into (``part``, default ``language``); its
target patterns are matched against module paths relative to that part (e.g. ``layers.0.self_attn.q_proj``
in the language model, ``encoder.layers.1.mlp.fc1`` in a CLIP vision tower): a bare name such as
``q_proj`` matches the last path component (peft's convention), anything else is a shell-style glob over
the whole path (``layers.*.mlp.*``). ``layers`` keeps only the layers of some blocks (``[-2, -1]``: the
last two). Groups let different adapters go on different layers, e.g. LoRA on attention and AsymLoRA on
the MLP (HydraLoRA's own recipe), or LoRA on the vision tower's last blocks beside them.

The parts are found by :func:`mmpeft.models.backbone.model_parts` (``VISION_PATHS``,
``PROJECTOR_PATHS``, ``LANGUAGE_MODEL_PATHS``), which :func:`~mmpeft.models.backbone.inject_model_adapters`
hands to :func:`inject_parts`; a projector that lives inside the vision tower
(Qwen2-VL's ``visual.merger``) is the projector's, never the vision tower's. Only linear layers
(``nn.Linear`` and bitsandbytes' 4-/8-bit ones, through :mod:`mmpeft.adapters.quant`) take adapters.

Routers outside the language model route the tower's own positions (patches), never the prompt: they
are bound to a :class:`TowerContext`, which keeps their records apart from the language model's
(so the language model's masks and task ids never meet a patch sequence), and only a group with
``routing_losses: true`` adds them to the routing losses (:func:`tower_routing_losses`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from mmpeft import registry
from mmpeft.adapters.base import Ability, AdaptedLinear, abilities_of, check_adapter_class
from mmpeft.adapters.quant import BaseLayerView, is_linear
from mmpeft.adapters.routing import (
    Router,
    RouterRecord,
    RoutingContext,
    RoutingLosses,
    bind_routers,
    routing_losses,
    share_block_routers,
)
from mmpeft.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable

# Every supported family names its language model's layers the Llama way, except Phi's fused ones
# (qkv_proj, gate_up_proj). Mllama's cross-attention layers (cross_attn.q_proj, ...) are attention too.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"]
MLP = ["gate_proj", "up_proj", "down_proj", "gate_up_proj"]
# Group aliases a config may use in `targets`: an alias must match some layer, not every name in it.
ALIASES: dict[str, list[str]] = {"attention": ATTENTION, "mlp": MLP, "all-linear": ["*"]}

Part = Literal["language", "vision", "projector"]
PARTS: dict[str, str] = {"language": "language model", "vision": "vision tower", "projector": "projector"}
"""Each part a group can go into, and how messages name it."""
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class AdapterGroup:
    """One adapter type applied to a set of linear layers of one part of the model."""

    name: str = "lora"
    """Registered adapter name (``python -m mmpeft adapters`` lists them)."""

    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Which linear layers of the part: bare names (``q_proj``), globs over the path relative to the part
    (``layers.*.mlp.*``, ``encoder.layers.1.*``), or the aliases ``attention``, ``mlp``, ``all-linear``. A name or
    glob that names a conv layer (a patch embedding) is an error: conv layers take no adapter."""

    config: dict[str, Any] = field(default_factory=dict)
    """The adapter's hyperparameters (its config class's fields, e.g. ``r``, ``alpha``, ``dropout`` for LoRA)."""

    part: Part = "language"
    """Which part of the model the targets are in: ``language`` (the language model), ``vision`` (the vision
    tower, without a projector inside it such as Qwen2-VL's merger) or ``projector`` (the vision-language
    projector; not together with ``backbone.train_projector``, which trains it in full)."""

    layers: list[int] | None = None
    """Only the layers of these blocks, by index in the part's numbered block list (the first number in a
    layer's path: ``encoder.layers.22.mlp.fc1`` is in block 22); negative indices count from the end, so
    ``[-2, -1]`` is the last two blocks. A part with several numbered lists (Mllama's ``transformer`` and
    ``global_transformer``) takes the indices in each. ``None``: every targeted layer. A vision tower whose
    model reads image features from an earlier block (LLaVA-1.5's ``vision_feature_layer: -2``) ends at that
    block: the blocks after it never reach the loss, take no adapter, and ``-1`` is the block read."""

    lr: float | None = None
    """Peak learning rate of this group's adapters (its own AdamW parameter group, scaled by the same
    schedule); ``None``: ``optim.lr``."""

    weight_decay: float | None = None
    """AdamW weight decay of this group's adapters; ``None``: ``optim.weight_decay``."""

    router_lr: float | None = None
    """Peak learning rate of this group's router tensors (the weights and biases of its adapters'
    :class:`~mmpeft.adapters.routing.Router` modules, a block router shared by the group's layers included; not
    MixLoRA's ``condition`` projection), in an AdamW parameter group of their own (``adapters[i] routers``) with
    the group's weight decay and the same schedule; ``None``: the group's lr. A group without routers (LoRA)
    ignores it."""

    routing_losses: bool = False
    """Whether the routers of a vision or projector group join the routing losses (load balance and z-loss;
    the task-aware ones need one row per sample, which a tower's rows, images, are not). Language groups
    always count."""

    def resolve(self, index: int) -> tuple[type, Any]:
        """The adapter class and its validated config; raises ConfigError naming the bad name or key."""
        where = f"adapters[{index}] ({self.name})"
        if self.part not in PARTS:
            raise ConfigError(f"{where}.part: {self.part!r} is not one of {', '.join(PARTS)}")
        for key in ("lr", "weight_decay", "router_lr"):
            value = getattr(self, key)
            if value is not None and not (value >= 0 if key == "weight_decay" else value > 0):
                raise ConfigError(f"{where}.{key} must be {'>= 0' if key == 'weight_decay' else '> 0'}, got {value}")
        cls = load_adapter(self.name)
        config = registry.build_config(cls.config_class, self.config, f"{where}.config")
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


# -- the parts of a model -------------------------------------------------------------------------


@dataclass
class ModelPart:
    """One part of a model that adapter groups can go into."""

    part: str
    path: str
    """Its path in the model (``""``: the module injection was given is the part)."""
    module: nn.Module
    others: list[str] = field(default_factory=list)
    """Paths of the other parts found in the model; those nested inside this one are not this one's."""

    def layers(self, kinds: tuple[type, ...] | None = None) -> dict[str, str]:
        """``{full path: path relative to the part}`` of its linear layers (or of modules of ``kinds``).

        The part's own module, when it is a layer itself (Mllama's projector is one ``Linear``), is named by
        its last path component."""
        found = {}
        nested = [p for p in self.others if p.startswith(f"{self.path}.") or (not self.path and p)]
        for rel, sub in self.module.named_modules():
            if not (isinstance(sub, kinds) if kinds else is_linear(sub)):
                continue
            full = f"{self.path}.{rel}" if self.path and rel else (rel or self.path)
            if not full or any(full == p or full.startswith(f"{p}.") for p in nested):
                continue
            found[full] = rel or self.path.rsplit(".", 1)[-1]
        return found

    @property
    def where(self) -> str:
        return PARTS[self.part] + (f" ({self.path})" if self.path else "")


def block_index(rel: str) -> tuple[str, int] | None:
    """``(numbered list, index)`` of a layer path relative to its part: its first number (``encoder.layers.3.mlp.fc1``
    -> ``("encoder.layers", 3)``), or ``None`` for a layer outside any numbered list."""
    pieces = rel.split(".")
    for i, piece in enumerate(pieces):
        if piece.isdigit():
            return ".".join(pieces[:i]), int(piece)
    return None


def _in_layers(part: ModelPart, rels: list[str], wanted: list[int], limits: dict[str, int]) -> set[str]:
    """Those of ``rels`` in the blocks ``wanted`` (negative: from the end of each numbered list, or of its first
    ``limits[list]`` blocks)."""
    found = {rel: block_index(rel) for rel in rels}
    sizes: dict[str, int] = dict(limits)
    for stack, index in filter(None, found.values()):
        if stack in limits:
            continue
        try:
            size = len(part.module.get_submodule(stack))  # (a ModuleList)
        except (AttributeError, TypeError):  # not a list module: the largest index seen
            size = max(sizes.get(stack, 0), index + 1)
        sizes[stack] = size
    chosen = {stack: {w % n for w in wanted if -n <= w < n} for stack, n in sizes.items()}
    return {rel for rel, at in found.items() if at is not None and at[1] in chosen[at[0]]}


def feature_blocks(model: nn.Module, part: ModelPart) -> tuple[str, int, Any] | None:
    """``(block list, blocks used, vision_feature_layer)`` of a vision tower whose model reads its image features from
    an earlier block's output (LLaVA-1.5: ``vision_feature_layer=-2``, the penultimate block's); the blocks after it
    run but never reach the loss, so an adapter there would get no gradient. ``None`` where every block counts."""
    config = getattr(model, "config", None)
    chosen = getattr(config, "vision_feature_layer", None)
    blocks = getattr(getattr(config, "vision_config", None), "num_hidden_layers", None)
    if chosen is None or not blocks:
        return None
    # hidden_states[k]: 0 is the embeddings, k the output of block k - 1; negative k counts from the last block's.
    last = max(k if k >= 0 else blocks + 1 + k for k in ([chosen] if isinstance(chosen, int) else chosen))
    if last >= blocks:
        return None
    for name, sub in part.module.named_modules():
        if isinstance(sub, nn.ModuleList) and len(sub) == blocks:
            return name, last, chosen
    return None


# -- routing outside the language model -----------------------------------------------------------


class TowerContext(RoutingContext):
    """The routing context of the routers of one vision or projector group.

    It follows the model's context (``main``): it records while ``main`` records, and its records are
    those of ``main``'s current pass (a new pass of ``main`` starts them anew). It holds no masks and no
    task ids: a tower's rows are images and its positions patches, not the prompt's tokens, so its
    routers balance over every position of the tower. Instance routing is refused at injection (an
    image is not a sample: a sample may have several images, and Qwen2-VL packs all patches in one
    sequence). Router names are full module paths.
    """

    def __init__(self, main: RoutingContext, part: str, losses: bool) -> None:
        self.main, self.part, self.losses = main, part, losses
        self._pass: list[RouterRecord] | None = None
        super().__init__()

    @property
    def recording(self) -> bool:  # type: ignore[override]
        return self.main.recording

    @recording.setter
    def recording(self, value: bool) -> None:
        pass  # follows the model's context

    @property
    def records(self) -> list[RouterRecord]:  # type: ignore[override]
        return self._records if self._pass is self.main.records else []

    @records.setter
    def records(self, value: list[RouterRecord]) -> None:
        self._records, self._pass = value, self.main.records

    def record(self, record: RouterRecord) -> None:
        if not self.recording:
            return
        if self._pass is not self.main.records:  # the first record of a new pass
            self.records = []
        if record.probs.dim() == 2:  # a tower that packs every image's patches into one (patches, d) sequence
            record = RouterRecord(
                record.name,
                record.logits.unsqueeze(0),
                record.probs.unsqueeze(0),
                record.selected.unsqueeze(0),
                record.top_k,
                record.level,
                record.gate.unsqueeze(0),
            )  # (1, patches, experts) each
        self._records.append(record)


def tower_contexts(model: nn.Module) -> list[TowerContext]:
    """The :class:`TowerContext` of every router of ``model`` outside the language model, once each."""
    found: dict[int, TowerContext] = {}
    for module in model.modules():
        if isinstance(module, Router) and isinstance(module.context, TowerContext):
            found.setdefault(id(module.context), module.context)
    return list(found.values())


def tower_routing_losses(
    towers: list[TowerContext], coefficients: RoutingLosses, losses: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``losses`` (the language model's routing losses) plus those of the vision and projector groups
    (``towers``, :func:`tower_contexts`) that ask for them (``routing_losses: true``), each summed by name;
    unweighted, as :func:`routing_losses`."""
    total = dict(losses or {})
    for context in towers:
        if context.losses:
            for name, value in routing_losses(context, coefficients).items():
                total[name] = total[name] + value if name in total else value
    return total


# -- injection ------------------------------------------------------------------------------------


def inject_adapters(
    language_model: nn.Module, groups: list[AdapterGroup], context: RoutingContext | None = None
) -> dict[str, AdaptedLinear]:
    """Wrap each targeted linear layer of ``language_model`` in an :class:`AdaptedLinear`; returns them by path.

    For groups of the language model only; :func:`mmpeft.models.backbone.inject_model_adapters` takes
    the whole model and every part. The routers of mixture adapters are bound to ``context`` (one per model, see
    :mod:`mmpeft.adapters.routing`), labelled by :func:`group_labels`; adapters that declare
    ``reads_base_weight`` get a read-only view of their base layer. Raises ConfigError when a
    pattern matches no layer (listing the layers that exist), names a conv layer, or when two
    groups claim the same layer.
    """
    for i, group in enumerate(groups):
        if group.part != "language":
            raise ConfigError(
                f"adapters[{i}] ({group.name}) goes into the {PARTS.get(group.part, group.part)}: inject it with "
                "mmpeft.models.backbone.inject_model_adapters(model, groups), which takes the whole model"
            )
    return _inject(language_model, {"language": ModelPart("language", "", language_model)}, groups, context)


def inject_parts(
    model: nn.Module, parts: dict[str, ModelPart], groups: list[AdapterGroup], context: RoutingContext | None = None
) -> dict[str, AdaptedLinear]:
    """Wrap each targeted linear layer of ``model`` (in the part of ``parts`` each group's ``part`` names) in an
    :class:`AdaptedLinear`; returns them by their path in ``model``.

    :func:`mmpeft.models.backbone.inject_model_adapters` finds a multimodal model's parts and calls this. As
    :func:`inject_adapters`, and: the routers of vision and projector groups are bound to a
    :class:`TowerContext` following ``context``; such a group's adapter may not route per instance
    (ConfigError), and a group whose part the model lacks is a ConfigError naming the part and the group.
    """
    return _inject(model, parts, groups, context)


def _targets(i: int, group: AdapterGroup, part: ModelPart | None, model: nn.Module) -> list[str]:
    """The full paths of the layers ``group`` (``adapters[i]``) targets in ``part``."""
    who = f"adapters[{i}] ({group.name}"
    who += f", part {group.part})" if group.part != "language" else ")"
    if part is None:
        raise ConfigError(f"{who}: {type(model).__name__} has no {PARTS[group.part]}")
    candidates = every = part.layers()  # full -> relative
    convs = part.layers(CONV)
    limits, note = {}, ""
    cut = feature_blocks(model, part) if group.part == "vision" else None
    if cut is not None:  # the blocks after the one the model reads features from are not candidates
        stack, used, chosen = cut
        limits[stack] = used
        candidates = {
            full: rel
            for full, rel in candidates.items()
            if (at := block_index(rel)) is None or at[0] != stack or at[1] < used
        }
        note = (
            f" ({type(model).__name__} reads its image features from block {used - 1} of {stack}, "
            f"vision_feature_layer={chosen}: the {len(part.module.get_submodule(stack)) - used} block(s) after it "
            "never reach the loss and take no adapter; negative layers count from block "
            f"{used - 1})"
        )
    existing = ", ".join(sorted(set(map(_collapse, candidates.values())))) or "none"
    hits: list[str] = []
    for target in group.targets:
        patterns = ALIASES.get(target, [target])
        if target not in ALIASES:
            named = [full for full, rel in convs.items() if _matches(rel, target)]
            if named:
                kinds = ", ".join(f"{full} ({type(model.get_submodule(full)).__name__})" for full in named)
                raise ConfigError(
                    f"{who}: target {target!r} names {kinds}: conv layers are not adaptable, only linear layers "
                    f"(nn.Linear, bitsandbytes 4/8-bit) take adapters; the {part.where}'s linear layers are: {existing}"
                )
        found = [full for full, rel in candidates.items() if any(_matches(rel, p) for p in patterns)]
        if group.layers is not None:
            kept = _in_layers(part, [candidates[f] for f in found], group.layers, limits)
            found = [f for f in found if candidates[f] in kept]
        if not found:
            within = f" in blocks {group.layers}" if group.layers is not None else ""
            cut_off = any(_matches(rel, p) for rel in every.values() for p in patterns)
            raise ConfigError(
                f"{who}: target {target!r} matches no linear layer of the {part.where}{within}"
                f"{note if cut_off else ''}; "
                f"its linear layers are: {existing}"
            )
        hits += [f for f in found if f not in hits]
    return hits


def _inject(
    model: nn.Module, parts: dict[str, ModelPart], groups: list[AdapterGroup], context: RoutingContext | None
) -> dict[str, AdaptedLinear]:
    owner: dict[str, int] = {}
    for i, group in enumerate(groups):
        for name in _targets(i, group, parts.get(group.part), model):
            if owner.setdefault(name, i) != i:
                raise ConfigError(
                    f"layer {name!r} is targeted by adapters[{owner[name]}] and adapters[{i}]; "
                    "each layer takes one adapter"
                )
    resolved = [g.resolve(i) for i, g in enumerate(groups)]
    labels = group_labels(groups)
    contexts: list[RoutingContext | None] = [
        context if context is None or g.part == "language" else TowerContext(context, g.part, g.routing_losses)
        for g in groups
    ]
    for i, group in enumerate(groups):  # before any layer is wrapped: a refused group changes nothing
        first = next((name for name in owner if owner[name] == i), None)
        if group.part != "language" and first is not None:
            base = model.get_submodule(first)
            with torch.device("meta"):  # shapes only: no initialisation, no draw from the RNG
                probe = resolved[i][0](base.in_features, base.out_features, resolved[i][1])
            if any(isinstance(m, Router) and m.level == "instance" for m in probe.modules()):
                raise ConfigError(
                    f"adapters[{i}] ({group.name}, part {group.part}) routes per instance, which the "
                    f"{PARTS[group.part]} cannot: its rows are images, not samples (a sample may hold several, "
                    "Qwen2-VL packs all patches in one sequence) and it never sees the prompt; use token routing there"
                )
    wrapped: dict[str, AdaptedLinear] = {}
    for name in _in_model_order(model, owner):
        i = owner[name]
        part = parts[groups[i].part]
        base = model.get_submodule(name)
        cls, config = resolved[i]
        adapter = cls(base.in_features, base.out_features, config)
        # Adapters train in full precision on the base layer's device, whatever the base's storage dtype.
        adapter.to(device=_device_of(base), dtype=torch.float32)
        if Ability.READS_BASE_WEIGHT in abilities_of(cls):
            adapter.attach_base(BaseLayerView(base))
        if contexts[i] is not None:
            # Language routers by their path in the language model (as statistics and merge know them); others in full.
            bind_routers(adapter, contexts[i], _relative(name, part) if part.part == "language" else name, labels[i])
        layer = AdaptedLinear(base, adapter, groups[i].name)
        layer.group = i  # which group it belongs to: its optimizer settings (group_of)
        layer.train(base.training)  # new modules start in train mode; follow the model's (dropout off in eval)
        model.set_submodule(name, layer)
        wrapped[name] = layer
    # One router per block, shared by its adapted projections: per routing context (the language model's groups
    # share theirs, as before; each vision or projector group has its own), block paths as the routers are named.
    blocks: dict[int, tuple[nn.Module, RoutingContext | None, dict[str, list[tuple[str, nn.Module]]]]] = {}
    for name, layer in wrapped.items():
        if Ability.BLOCK_ROUTER in abilities_of(type(layer.adapter)) and layer.adapter.config.router == "block":
            i = owner[name]
            part = parts[groups[i].part]
            language = part.part == "language"
            key = _relative(name, part) if language else name
            entry = blocks.setdefault(id(contexts[i]), (part.module if language else model, contexts[i], {}))
            entry[2].setdefault(key.rpartition(".")[0], []).append((key, layer.adapter))
    for root, block_context, members in blocks.values():
        share_block_routers(root, members, block_context if block_context is not None else RoutingContext())
    return wrapped


def _relative(name: str, part: ModelPart) -> str:
    return name[len(part.path) + 1 :] if part.path else name


def _in_model_order(model: nn.Module, names: Iterable[str]) -> list[str]:
    wanted = set(names)
    return [name for name, _ in model.named_modules() if name in wanted]


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def group_of(layer: AdaptedLinear) -> int | None:
    """The index of the adapter group ``layer`` was injected for (``None`` for a layer wrapped elsewhere)."""
    return getattr(layer, "group", None)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of ``model``, keyed by their full path."""
    return {
        f"{name}.adapter.{key}": value
        for name, sub in model.named_modules()
        if isinstance(sub, AdaptedLinear)
        for key, value in sub.adapter.state_dict().items()
    }
