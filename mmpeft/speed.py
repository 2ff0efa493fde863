"""Levers on the training step's speed and memory, each switchable in ``model.speed``.

None of them changes what is computed beyond floating-point noise (tests/test_speed.py checks
each against the step with it off); ``benchmarks/vs_peft.py`` measures each on its own
(docs/speed.md). Length-grouped batching, the data-side lever, is ``data.group_by_length``.

- ``loss_chunk``: the LM head and the cross-entropy in chunks of positions, with the gradient
  of the hidden states computed chunk by chunk in the forward pass
  (:class:`mmpeft.objective.ChunkedLinearCrossEntropy`), so no ``(positions, vocabulary)`` logits
  outlive a chunk.
- ``inplace_add``: adapters add their update into the frozen base layer's output instead of
  allocating a third tensor (PEFT even clones the 4-bit output first).
- ``input_grads``: transformers' ``enable_input_require_grads`` (which PEFT's
  ``prepare_model_for_kbit_training`` calls) makes every embedding's output require grad, the
  frozen vision tower's included, so backward runs through the whole vision tower for nothing.
  Non-reentrant checkpointing does not need it; mmpeft leaves it off.
- ``checkpoint_every``: recompute only every k-th decoder layer of the language model, keeping
  the others' activations; the frozen vision tower is never checkpointed (nothing in it trains).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

log = logging.getLogger("mmpeft")


@dataclass
class Speed:
    """Training-step speed and memory levers (docs/speed.md). None changes the loss beyond floating-point noise."""

    loss_chunk: int = 256
    """Positions per chunk of the LM head and cross-entropy; 0 computes all trained positions' logits at once. A
    chunk holds ``loss_chunk x vocabulary`` float32 logits (256 x 151,646: 148 MiB)."""

    inplace_add: bool = True
    """Adapters add their update into the base layer's output in place (no copy of the 4-bit output)."""

    input_grads: bool = False
    """Make every embedding output require grad, as PEFT does (backward then also runs through the frozen vision
    tower). Only reentrant checkpointing needs it."""

    checkpoint_every: int = 1
    """With ``model.backbone.gradient_checkpointing``: recompute every k-th decoder layer of the language model only
    (1: all of them). Larger values trade memory for speed."""

    def check(self) -> None:
        from mmpeft.errors import ConfigError

        if self.loss_chunk < 0:
            raise ConfigError(f"model.speed.loss_chunk must be >= 0 (0: no chunking), got {self.loss_chunk}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"model.speed.checkpoint_every must be >= 1, got {self.checkpoint_every}")


def apply_to_adapters(model: nn.Module, speed: Speed) -> int:
    """Set the adapter-side levers (``inplace_add``) on every adapted layer of ``model``, after injection. Returns how
    many."""
    from mmpeft.adapters import AdaptedLinear

    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    for layer in layers:
        layer.inplace_add = speed.inplace_add
    return len(layers)


# -- where gradients and recomputation go -----------------------------------------------------


def place_checkpointing(model: nn.Module, language: nn.Module, every: int) -> None:
    """Checkpoint only every ``every``-th decoder layer of ``language``, and no layer outside it.

    Call after transformers' ``activation_checkpointing_enable`` (which sets each
    ``GradientCheckpointingLayer``'s ``gradient_checkpointing`` flag): the frozen vision tower
    has nothing to recompute for.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    inside = {id(m) for m in language.modules()}
    index = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            if id(module) in inside:
                module.gradient_checkpointing = index % every == 0
                index += 1
            else:
                module.gradient_checkpointing = False
