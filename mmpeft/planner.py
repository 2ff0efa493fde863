"""Will it fit: the peak memory of a training run, line by line, against a card or a budget.

A plan adds up what training holds before its first batch (:func:`mmpeft.memory.static_memory`:
4-bit weights, unquantized modules, adapters, optimizer state) and what one training step adds at
its worst moment (:func:`mmpeft.activations.step_peak`: activations under the configured
checkpointing, the LM head's chunk of the loss, the vision tower's activations, gradients in
flight, the optimizer's temporaries). Both are counted without reading a weight.

The sum is what the allocator hands out at the peak (CUDA's ``max_memory_allocated``). A CUDA
device needs more than that: the CUDA context and the libraries' workspaces, which no allocator
statistic shows, and the caching allocator's rounding and fragmentation. :data:`CUDA_CONTEXT` and
:data:`FRAGMENTATION` are that allowance; they are not measured on a GPU yet (docs/memory.md says so
where it prints them).

:func:`preflight` (``model.preflight``) is the check ``fit`` runs before loading any weight.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mmpeft.activations import StepPeak, step_peak
from mmpeft.adapters import AdapterGroup
from mmpeft.adapters.routing import RoutingLosses
from mmpeft.errors import ConfigError, ImagesDoNotFit
from mmpeft.memory import Part, gib, parse_size, static_memory
from mmpeft.models.backbone import Backbone
from mmpeft.speed import Speed

log = logging.getLogger("mmpeft")

CUDA_CONTEXT = 512 * 2**20
"""Memory a CUDA process uses outside PyTorch's allocator (context, cuBLAS and cuDNN workspaces): an allowance."""
FRAGMENTATION = 0.05
"""Share of the allocated peak the caching allocator holds beyond it (rounding, fragmentation): an allowance."""

_GIB = 2**30
CARDS: dict[str, tuple[str, int]] = {
    "rtx3060": ("RTX 3060 (12 GB)", 12 * _GIB),
    "rtx3070": ("RTX 3070 (8 GB)", 8 * _GIB),
    "rtx3080": ("RTX 3080 (10 GB)", 10 * _GIB),
    "rtx3090": ("RTX 3090 (24 GB)", 24 * _GIB),
    "rtx4060": ("RTX 4060 (8 GB)", 8 * _GIB),
    "rtx4060ti": ("RTX 4060 Ti (16 GB)", 16 * _GIB),
    "rtx4070": ("RTX 4070 (12 GB)", 12 * _GIB),
    "rtx4070ti": ("RTX 4070 Ti (12 GB)", 12 * _GIB),
    "rtx4080": ("RTX 4080 (16 GB)", 16 * _GIB),
    "rtx4090": ("RTX 4090 (24 GB)", 24 * _GIB),
    "rtx5080": ("RTX 5080 (16 GB)", 16 * _GIB),
    "rtx5090": ("RTX 5090 (32 GB)", 32 * _GIB),
    "t4": ("T4 (16 GB)", 16 * _GIB),
    "v100": ("V100 (16 GB)", 16 * _GIB),
    "a10": ("A10 (24 GB)", 24 * _GIB),
    "l4": ("L4 (24 GB)", 24 * _GIB),
    "a6000": ("RTX A6000 (48 GB)", 48 * _GIB),
    "l40s": ("L40S (48 GB)", 48 * _GIB),
    "a100-40gb": ("A100 (40 GB)", 40 * _GIB),
    "a100": ("A100 (80 GB)", 80 * _GIB),
    "h100": ("H100 (80 GB)", 80 * _GIB),
}
"""Cards ``--gpu`` knows by name: what it prints and the memory (a card sold as "12 GB" has 12 GiB)."""
COMMON_SIZES = (8, 12, 16, 24, 48, 80)
"""The card sizes (GB) every estimate is checked against."""


def card(text: str, key: str = "--gpu") -> tuple[str, int]:
    """A card name (``rtx4070``, ``RTX 4090``) or a size (``12GiB``, ``16GB``; a bare ``12`` is 12 GiB): its label
    and bytes. ConfigError naming ``key`` otherwise."""
    name = re.sub(r"[\s_]", "", str(text).lower())
    if name in CARDS:
        return CARDS[name]
    if re.fullmatch(r"\d+(\.\d+)?", name):
        size = int(float(name) * _GIB)
        return f"{gib(size)}", size
    try:
        size = parse_size(text, key)
    except ConfigError:
        raise ConfigError(
            f"{key}: {text!r} is neither a size (12GiB, 16GB) nor a card mmpeft knows ({', '.join(CARDS)})"
        ) from None
    return gib(size), size


@dataclass(frozen=True)
class Plan:
    """The peak memory of a training run, line by line."""

    parts: list[Part]
    """What the allocator holds at the peak: before the first batch, then what the step adds, by what made it."""
    device_type: str
    allowance: int = 0
    """Beyond the allocator's peak (CUDA: context, workspaces, fragmentation); 0 on a CPU."""
    step: StepPeak | None = field(default=None, repr=False)

    @property
    def peak(self) -> int:
        """The allocator's peak: ``max_memory_allocated`` on CUDA."""
        return sum(part.bytes for part in self.parts)

    @property
    def needed(self) -> int:
        """What the device must have free: the peak and the allowance."""
        return self.peak + self.allowance

    def fits(self, budget: int) -> bool:
        return self.needed <= budget

    def lines(self) -> list[str]:
        """The breakdown as aligned text lines."""
        rows = [(part.name, gib(part.bytes), part.note) for part in self.parts if part.bytes]
        rows.append(("peak (allocated)", gib(self.peak), ""))
        if self.allowance:
            rows.append(("CUDA allowance", gib(self.allowance), allowance_note()))
            rows.append(("needed", gib(self.needed), ""))
        width = max(len(name) for name, _, _ in rows)
        return [f"{name:<{width}}  {size:>11}  {note}".rstrip() for name, size, note in rows]


def allowance_note() -> str:
    return f"context and workspaces {gib(CUDA_CONTEXT)} + {FRAGMENTATION:.0%} of the peak (not measured on a GPU yet)"


_SCOPE_NOTES = {
    "vision tower": "activations: the frozen vision tower's, at the peak",
    "projector": "activations: the projector's",
    "language model": "activations: the language model's (kept under checkpointing, or recomputed)",
    "loss": "the LM head's chunk of logits and the cross-entropy",
    "backward": "backward in flight: gradients and activation gradients",
    "optimizer": "the optimizer step's temporaries",
    "other": "the rest of the step",
}


def plan(
    backbone: Backbone,
    adapters: list[AdapterGroup],
    batch: dict[str, Any],
    *,
    device_type: str = "cuda",
    optimizer: str = "adamw",
    speed: Speed | None = None,
    routing: RoutingLosses | None = None,
    accumulating: bool = False,
    precision: str | int | None = None,
) -> Plan:
    """The peak memory of training ``backbone`` with ``adapters`` on ``batch`` (a collated batch of CPU tensors), under
    the trainer's ``precision`` (``bf16-mixed``: the forward runs under autocast)."""
    static = static_memory(backbone, adapters, optimizer, device_type)
    step = step_peak(
        backbone,
        adapters,
        batch,
        device_type,
        speed=speed,
        routing=routing,
        accumulating=accumulating,
        optimizer=optimizer,
        autocast=autocast_dtype(precision),
    )
    # Without accumulation the gradients are made during backward: the step's peak counts those made by then.
    parts = [part for part in static if accumulating or part.name != "gradients"]
    for scope, size in sorted(step.by_scope.items(), key=lambda item: -item[1]):
        parts.append(Part(f"step: {scope}", size, _SCOPE_NOTES.get(scope, "")))
    peak = sum(part.bytes for part in parts)
    allowance = CUDA_CONTEXT + int(FRAGMENTATION * peak) if device_type == "cuda" else 0
    return Plan(parts, device_type, allowance, step)


def autocast_dtype(precision: str | int | None) -> torch.dtype | None:
    """The dtype Lightning's mixed ``precision`` runs the forward in under autocast; ``None`` for no autocast."""
    text = str(precision)
    if text == "bf16-mixed":
        return torch.bfloat16
    if text in ("16-mixed", "16"):
        return torch.float16
    return None


# -- the largest setting that fits -------------------------------------------------------------------


class Batches(Protocol):
    """Makes the worst-case batch of a setting: every sample ``max_length`` tokens with its images at ``image_side``
    pixels (``None``: the data's own setting). Raises ConfigError when the images do not fit ``max_length``."""

    batch_size: int
    max_length: int
    image_side: int | None
    """The configured image side, when the data sets one."""

    def __call__(self, batch_size: int, max_length: int, image_side: int | None) -> dict[str, Any]: ...


def largest(cost: Callable[[int], int | None], budget: int, low: int, high: int, step: int = 1) -> int | None:
    """The largest multiple of ``step`` in ``[low, high]`` whose ``cost`` (bytes; ``None``: not a setting that
    trains) is at most ``budget``, for a cost that grows with the value; ``None`` when not even ``low`` fits.

    Each cost is a plan (seconds for a 7B model), so the search interpolates: the costs are close to linear in the
    batch size and the length, and the boundary is usually found in three or four plans.
    """
    costs: dict[int, int | None] = {}

    def fits(units: int) -> bool:
        if units not in costs:
            costs[units] = cost(units * step)
        value = costs[units]
        return value is not None and value <= budget

    lo, hi = -(-low // step), high // step  # in units of step
    if hi < lo or not fits(lo):
        return None
    if fits(hi):
        return hi * step
    while hi - lo > 1:  # lo fits, hi does not
        c_lo, c_hi = costs[lo], costs[hi]
        if c_hi is None or c_hi <= c_lo:
            guess = (lo + hi) // 2
        else:
            guess = lo + int((budget - c_lo) * (hi - lo) / (c_hi - c_lo))
        guess = min(max(guess, lo + 1), hi - 1)
        if fits(guess):
            lo = guess
            if guess + 1 < hi and not fits(guess + 1):
                hi = guess + 1
            elif guess + 1 < hi:
                lo = guess + 1
        else:
            hi = guess
            if guess - 1 > lo and fits(guess - 1):
                lo = guess - 1
            elif guess - 1 > lo:
                hi = guess - 1
    return lo * step


@dataclass(frozen=True)
class Suggestion:
    """The largest value of one setting that fits, the others as configured."""

    key: str
    value: int | None
    """``None``: not even the smallest value tried fits (or, with a :attr:`reason`, none was tried)."""
    reason: str = ""
    """Why the setting was not searched (the data's settings leave it nothing to vary)."""


def smallest_valid(valid: Callable[[int], bool], low: int, high: int, step: int = 1) -> int | None:
    """The smallest multiple of ``step`` in ``[low, high]`` for which ``valid`` holds, for a test that, once it holds,
    holds for every larger value (a length long enough for the sample's images); ``None`` when it never holds."""
    lo, hi = -(-low // step), high // step
    if hi < lo or not valid(hi * step):
        return None
    while lo < hi:  # valid(hi)
        middle = (lo + hi) // 2
        if valid(middle * step):
            hi = middle
        else:
            lo = middle + 1
    return lo * step


def suggest(
    budget: int,
    batches: Batches,
    planner: Callable[[dict[str, Any]], Plan],
) -> list[Suggestion]:
    """For ``budget`` bytes: the largest ``data.batch_size`` (up to 4 times the configured one), ``data.max_length``
    (up to 4 times, in steps of 64) and image side (in steps of 28 px, up to 4 times) that fit, each with the other
    settings as configured."""
    b, n, side = batches.batch_size, batches.max_length, batches.image_side

    def cost(batch_size: int, max_length: int, image_side: int | None) -> int | None:
        try:
            batch = batches(batch_size, max_length, image_side)
        except ImagesDoNotFit:  # the images no longer fit max_length: not a setting that trains
            return None
        return planner(batch).needed

    def holds_images(max_length: int) -> bool:
        try:
            batches(1, max_length, side)
        except ImagesDoNotFit:
            return False
        return True

    out = [Suggestion("data.batch_size", largest(lambda v: cost(v, n, side), budget, 1, 4 * b))]
    # From the shortest length that holds the sample's images (making a batch is cheap; planning it is not).
    shortest = smallest_valid(holds_images, 64, 4 * n, 64) or 64
    out.append(Suggestion("data.max_length", largest(lambda v: cost(b, v, side), budget, shortest, 4 * n, 64)))
    if side is not None:
        try:
            found = largest(lambda v: cost(b, n, v), budget, 28, 4 * side, 28)
        except ConfigError as exc:  # e.g. data.processor_kwargs sets the pixel limits the resolution would set
            out.append(Suggestion("data.image_resolution", None, str(exc)))
        else:
            out.append(Suggestion("data.image_resolution", found))
    return out


# -- the preflight: stop before loading any weight when the run cannot fit --------------------------------------


@dataclass
class Preflight:
    """The memory check ``fit`` runs before loading any weight (docs/memory.md)."""

    budget: str | None = "auto"
    """Memory the run may use. ``auto``: the CUDA device's free memory (no check on a CPU); a size such as
    ``12GiB`` checks against that on any device; ``null`` turns the check off. The run's peak is planned (weights,
    adapters, optimizer state, and a worst-case batch of the data's settings run on the meta device, see
    ``python -m mmpeft estimate``); a run that does not fit stops with the breakdown and the settings that would
    fit."""

    def check(self) -> None:
        if self.budget not in (None, "auto"):
            parse_size(self.budget, "model.preflight.budget")

    def limit(self, device: torch.device) -> int | None:
        """The bytes the run may use on ``device``, or ``None`` for no check."""
        if self.budget is None:
            return None
        if self.budget == "auto":
            return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        return parse_size(self.budget, "model.preflight.budget")


def preflight(
    settings: Preflight,
    backbone: Backbone,
    adapters: list[AdapterGroup],
    optimizer: str,
    device: torch.device,
    *,
    batches: Callable[[], Batches | None] | None = None,
    speed: Speed | None = None,
    routing: RoutingLosses | None = None,
    accumulating: bool = False,
    precision: str | int | None = None,
) -> Plan | None:
    """Plan the run's peak and raise ConfigError when it exceeds the budget.

    With ``batches`` (called only when there is a budget to check; it may return ``None``) the plan runs a
    worst-case batch of the data's settings and the error suggests the largest settings that fit; without, it
    counts only what training holds before its first batch.
    """
    limit = settings.limit(device)
    if limit is None:
        return None
    maker = batches() if batches is not None else None
    where = "free on " + str(device) if settings.budget == "auto" else f"model.preflight.budget={settings.budget}"

    def planner(batch: dict[str, Any]) -> Plan:
        return plan(
            backbone,
            adapters,
            batch,
            device_type=device.type,
            optimizer=optimizer,
            speed=speed,
            routing=routing,
            accumulating=accumulating,
            precision=precision,
        )

    try:
        if maker is None:
            parts = static_memory(backbone, adapters, optimizer, device.type)
            result = Plan(parts, device.type)
        else:
            result = planner(maker(maker.batch_size, maker.max_length, maker.image_side))
    except ConfigError:
        raise
    except Exception as exc:  # a check must not stop a run it cannot judge: say so and let the run go on
        log.warning("model.preflight: memory not checked (%s: %s)", type(exc).__name__, exc)
        return None
    if result.fits(limit):
        return result
    lines = ", ".join(f"{part.name} {gib(part.bytes)}" for part in result.parts if part.bytes)
    if maker is None:
        raise ConfigError(
            f"the run cannot fit: before its first batch training holds {gib(result.peak)} ({lines}), more than "
            f"the {gib(limit)} {where}, and activations come on top. Use a smaller model or fewer trainable values "
            "(model.adapters r, targets), model.optim.optimizer: adamw_8bit, or set model.preflight.budget: null "
            "to skip this check"
        )
    hints = []
    for suggestion in suggest(limit, maker, planner):
        if suggestion.value is not None:
            hints.append(f"{suggestion.key}: {suggestion.value}")
    advice = f"settings that fit (one at a time): {', '.join(hints)}" if hints else "no smaller batch or length fits"
    allowance = f" + CUDA allowance {gib(result.allowance)}" if result.allowance else ""
    raise ConfigError(
        f"the run cannot fit: its peak is {gib(result.peak)}{allowance} ({lines}), more than the {gib(limit)} "
        f"{where}. {advice}; or fewer trainable values, model.optim.optimizer: adamw_8bit, "
        "model.backbone.gradient_checkpointing: true; python -m mmpeft estimate shows the whole plan. "
        "model.preflight.budget: null skips this check"
    )
