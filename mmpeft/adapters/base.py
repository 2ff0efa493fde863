"""The adapter contract and its checker, the shared LoRA initialisation, and the wrapper that puts an
adapter beside a base layer.

An adapter plugin is a class registered under the entry-point group ``mmpeft.adapters``. It
is an ``nn.Module`` that computes only the *update*: :class:`AdaptedLinear` runs the frozen
base layer, calls ``delta = adapter(x, base_out)`` and adds it, so no adapter ever copies or
subclasses the model's own layers, and every adapter works on every quantization through the
one seam in :mod:`mmpeft.adapters.quant`. What an adapter can do beyond that (be merged, be
written as a LoRA, read its base weight) it *declares* in ``abilities``; mmpeft reads the
declaration and never probes for methods. :func:`check_adapter_class` checks all of it when a
plugin is loaded from its entry point.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from mmpeft.adapters.quant import base_forward
from mmpeft.errors import ConfigError


class Ability(StrEnum):
    """What an adapter may declare in its ``abilities`` beyond computing its update.

    Each is a plain string too, so a plugin can write ``abilities = frozenset({"as_lora"})``
    without importing this class. :data:`REQUIRES` names what each one obliges the class to define.
    """

    READS_BASE_WEIGHT = "reads_base_weight"
    """Its update depends on the frozen weight: ``attach_base(view)`` is called once right after
    construction with a :class:`~mmpeft.adapters.quant.BaseLayerView` of the base layer (whose
    ``weight()`` is the weight dequantized to float32, whatever the storage). DoRA."""

    READS_BASE_OUTPUT = "reads_base_output"
    """Its update uses ``base_out`` in a way autograd keeps for backward (``g * base_out`` with a
    trainable ``g`` keeps ``base_out`` for ``g``'s gradient), so the update is added out of place:
    the in-place add (``model.speed.inplace_add``) would change the kept tensor and backward would
    fail. Adapters that ignore ``base_out``, or use it only where autograd keeps nothing of it (in a
    sum, as DoRA does), leave this out and keep the in-place add."""

    AS_LORA = "as_lora"
    """``as_lora(gate=None) -> (A, B, scaling)``: the update as one plain LoRA, ``A``
    ``(rank, in_features)`` and ``B`` ``(out_features, rank)``, update ``scaling * B @ A``; merge
    folds it into the base weight and export writes it for PEFT. A mixture receives ``gate``, the
    ``(experts,)`` mean of the gate its :class:`~mmpeft.adapters.routing.Router` applied over one
    task's data (:func:`~mmpeft.adapters.routing.expert_gate` checks it)."""

    AS_DORA = "as_dora"
    """``as_dora() -> (A, B, scaling, magnitude)``: the adapted weight is DoRA's
    ``W' = m / ||W + s B A||_row * (W + s B A)`` with ``magnitude`` ``m`` ``(out_features,)``;
    merge computes ``W'`` from the base weight the adapter trained against, export writes a PEFT
    ``LoraConfig(use_dora=True)`` with the magnitude under PEFT's key."""

    DELTA_WEIGHT = "delta_weight"
    """``delta_weight()``: the update as a dense ``(out_features, in_features)`` matrix, for an
    adapter that merges into the base weight but is no LoRA (merge uses it; export refuses it)."""

    BLOCK_ROUTER = "block_router"
    """Its config has ``router: projection | block``; with ``block``, ``block_router(width)`` makes the one
    :class:`~mmpeft.adapters.routing.Router` every adapter of a block (``layers.3.mlp``) shares, reading the block's
    input of ``width`` features (:func:`~mmpeft.adapters.routing.share_block_routers` sets it up at injection), and the
    adapter gates with ``block_gate(self.block_router, x)`` instead of a router of its own. AsymLoRA."""

    UNMERGEABLE = "unmergeable"
    """Its update has no single weight at all (MixLoRA: one per input): the class attribute
    ``unmergeable`` is the reason, a sentence merge and export stop with."""


REQUIRES: dict[Ability, str | None] = {
    Ability.READS_BASE_WEIGHT: "attach_base",
    Ability.READS_BASE_OUTPUT: None,
    Ability.AS_LORA: "as_lora",
    Ability.AS_DORA: "as_dora",
    Ability.DELTA_WEIGHT: "delta_weight",
    Ability.BLOCK_ROUTER: "block_router",
    Ability.UNMERGEABLE: "unmergeable",
}
"""The method (or, for ``unmergeable``, the string attribute) each ability obliges the class to define."""

MERGE_FORMS = (Ability.AS_LORA, Ability.AS_DORA, Ability.DELTA_WEIGHT)
"""The abilities that say how an update becomes weights; ``unmergeable`` contradicts them."""


@runtime_checkable
class AdapterPlugin(Protocol):
    """What an adapter class registered under ``mmpeft.adapters`` provides (:func:`check_adapter_class` checks it).

    - ``config_class``: a dataclass whose fields are the adapter's hyperparameters;
    - constructed as ``cls(in_features, out_features, config)``, an ``nn.Module`` whose parameters
      are the trainable ones (created in float32 on the base layer's device);
    - called as ``delta = adapter(x, base_out)``: ``x`` ``(..., in_features)`` is the layer's input,
      ``base_out`` ``(..., out_features)`` the frozen base layer's output on it, bias included; it
      returns the update ``(..., out_features)`` that is added to ``base_out``. Most adapters ignore
      ``base_out`` (and may give it the default ``None``, so they can be called on ``x`` alone);
    - ``abilities``: the :class:`Ability` names it declares (default: none), with the methods
      :data:`REQUIRES` names.

    Mixture adapters route with :mod:`mmpeft.adapters.routing`; their routers are bound to the
    model's routing context at injection, which is how they see task labels and masks and report
    auxiliary losses.
    """

    config_class: ClassVar[type]
    abilities: ClassVar[frozenset[str]]

    def __call__(self, in_features: int, out_features: int, config: Any) -> nn.Module: ...


def abilities_of(cls: type) -> frozenset[Ability]:
    """The abilities ``cls`` declares (an adapter class that passed :func:`check_adapter_class`)."""
    return frozenset(Ability(name) for name in getattr(cls, "abilities", ()))


def check_adapter_class(cls: Any, name: str | None = None, distribution: str | None = None) -> None:
    """Raise ConfigError unless ``cls`` meets the adapter contract (:class:`AdapterPlugin`).

    Checks, without constructing it: ``config_class`` is a dataclass; ``cls`` is an ``nn.Module``
    subclass constructible as ``cls(in_features, out_features, config)``; ``forward`` takes
    ``(x, base_out)``; ``abilities`` holds only known :class:`Ability` names, each with what
    :data:`REQUIRES` names, and no merge form beside ``unmergeable``. The message names the plugin
    (``name``, the class, ``distribution``) and every problem found.
    """
    qualname = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
    who = f"adapter plugin {name!r} ({qualname}" if name else f"adapter class ({qualname}"
    who += f", from {distribution})" if distribution else ")"
    problems = _contract_problems(cls)
    if problems:
        raise ConfigError(f"{who} does not meet the adapter contract (docs/plugins.md): {'; '.join(problems)}")


def _contract_problems(cls: Any) -> list[str]:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return [f"it is {type(cls).__name__} {cls!r}, not an nn.Module subclass"]
    problems = []
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        problems.append("no class attribute config_class (the dataclass of its hyperparameters)")
    elif not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)):
        problems.append(f"config_class {config_class!r} is not a dataclass")
    if not _accepts(cls, 3):
        problems.append(
            f"it cannot be constructed as cls(in_features, out_features, config): __init__{_signature(cls)}"
        )
    if not _accepts(cls.forward, 3):  # self, x, base_out
        problems.append(
            f"forward{_signature(cls.forward)} does not take (x, base_out): adapters are called as "
            "adapter(x, base_out) with the base layer's output (an adapter that ignores it may write "
            "forward(self, x, base_out=None))"
        )
    declared = getattr(cls, "abilities", frozenset())
    if isinstance(declared, str) or not isinstance(declared, (set, frozenset, tuple, list)):
        return [*problems, f"abilities must be a frozenset of ability names, got {declared!r}"]
    known = ", ".join(a.value for a in Ability)
    abilities = set()
    for ability in declared:
        try:
            abilities.add(Ability(ability))
        except ValueError:
            problems.append(f"unknown ability {ability!r} (known: {known})")
    for ability in sorted(abilities):
        member = REQUIRES[ability]
        if member is None:
            continue
        value = getattr(cls, member, None)
        if ability is Ability.UNMERGEABLE:
            if not (isinstance(value, str) and value.strip()):
                problems.append("declares 'unmergeable' but its class attribute unmergeable is not the reason (a str)")
        elif not callable(value):
            problems.append(f"declares {ability.value!r} but defines no {member}()")
    forms = [a.value for a in MERGE_FORMS if a in abilities]
    if Ability.UNMERGEABLE in abilities and forms:
        problems.append(f"declares 'unmergeable' together with {', '.join(map(repr, forms))}")
    return problems


def _accepts(function: Any, positional: int) -> bool:
    """Whether ``function`` (or a class's constructor) can be called with ``positional`` arguments."""
    try:
        inspect.signature(function).bind(*range(positional))
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): nothing to check
        return True
    return True


def _signature(function: Any) -> str:
    try:
        return str(inspect.signature(function))
    except (TypeError, ValueError):
        return "(?)"


# -- the shared LoRA initialisation ---------------------------------------------------------------


class LoRASettings(Protocol):
    """The hyperparameters every low-rank adapter shares (:class:`~mmpeft.adapters.lora.LoRAConfig` and
    its subclasses)."""

    r: int
    alpha: float
    dropout: float


class LoRAParts(NamedTuple):
    """LoRA's parameters and input dropout, initialised so that training starts at the base model."""

    A: nn.Parameter
    """``(rows, in_features)``, kaiming-uniform with ``a = sqrt(5)`` (``nn.Linear``'s default, as Hu et
    al. and PEFT)."""
    B: nn.Parameter
    """``(out_features, columns)``, zeros: the update ``B A`` is 0 until ``B`` trains."""
    dropout: nn.Module
    """Dropout on the adapter's input (``nn.Identity`` for 0); the base layer sees the clean input."""
    scaling: float
    """``alpha / r``, so that changing ``r`` needs no new learning rate (Hu et al. 2021, sec. 4.1)."""


def lora_parts(
    in_features: int, out_features: int, config: LoRASettings, rows: int | None = None, columns: int | None = None
) -> LoRAParts:
    """``A``, ``B``, the dropout and the scaling of a LoRA-style adapter; ``rows``/``columns`` default to ``config.r``.

    Mixtures stack their experts: AsymLoRA's heads are ``columns = N * r`` of ``B``, LoRA-MoE's
    experts ``N * r`` rows of ``A`` and columns of ``B``, MixLoRA's factor pools ``E`` of each.
    One kaiming draw over the whole stacked ``A`` has the bound of a separate draw per expert (the
    fan-in is ``in_features`` either way). Assign the result in this order
    (``self.A, self.B, self.dropout, self.scaling = lora_parts(...)``): the parameters register
    as ``A`` then ``B``, and nothing else draws from the RNG, so a seed gives the same weights
    as it always did.
    """
    a = nn.Parameter(torch.empty(config.r if rows is None else rows, in_features))  # (rows, d_in)
    b = nn.Parameter(torch.zeros(out_features, config.r if columns is None else columns))  # (d_out, columns)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
    return LoRAParts(a, b, dropout, config.alpha / config.r)


# -- the wrapper ----------------------------------------------------------------------------------


class AdaptedLinear(nn.Module):
    """``y = base(x) + adapter(x, base(x))``: a frozen base linear layer with an adapter beside it."""

    def __init__(self, base: nn.Linear, adapter: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.adapter_name = adapter_name
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.inplace_add = True
        """Add the update into the base output's memory (``model.speed.inplace_add``): no base layer's
        backward reads its own output."""
        self.reads_base_output = Ability.READS_BASE_OUTPUT in abilities_of(type(adapter))
        """The adapter declares that autograd saves ``base_out`` for its backward: the add is then out
        of place whatever :attr:`inplace_add` says (in place, backward would fail on the changed tensor)."""
        self._refused: set[tuple[bool, int]] = set()
        # (requires_grad, dims) of base outputs autograd refused to change in place: asked once each.

    @property
    def weight(self) -> torch.Tensor:
        # Some model code reads `.weight` of a projection (e.g. for its dtype); point it at the base.
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = base_forward(self.base, x)  # (..., out_features)
        delta = self.adapter(x, y).to(y.dtype)  # (..., out_features)
        kind = (y.requires_grad, y.dim())
        if self.inplace_add and not self.reads_base_output and kind not in self._refused:
            try:
                return y.add_(delta)
            except RuntimeError:
                # Autograd refuses to change in place a view that a custom autograd Function returned, as
                # bitsandbytes' 4-bit matmul does for some layers and shapes (a bias and 3-D inputs). No public
                # API tells such a view apart beforehand; the refusal comes before anything is written, and an
                # error of another kind is raised again by the add below.
                self._refused.add(kind)
        return y + delta

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}"
