"""Levers on the training step's speed and memory, each switchable in ``model.speed``.

None of them changes what is computed beyond floating-point noise (tests/test_speed.py checks
each against the step with it off); ``benchmarks/vs_peft.py`` measures each on its own
(docs/speed.md). Length-grouped batching, the data-side lever, is ``data.group_by_length``.

- ``loss_chunk``: the LM head and the cross-entropy in chunks of positions, with the gradient
  of the hidden states computed chunk by chunk in the forward pass
  (:class:`ChunkedLinearCrossEntropy`), so no ``(positions, vocabulary)`` logits outlive a chunk.
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

import torch
from torch import nn

log = logging.getLogger("mmpeft")


@dataclass
class Speed:
    """Training-step speed and memory levers (docs/speed.md). None changes the loss beyond floating-point noise."""

    loss_chunk: int = 256
    """Positions per chunk of the LM head and cross-entropy; 0 computes all trained positions' logits at once. A chunk holds ``loss_chunk x vocabulary`` float32 logits (256 x 151,646: 148 MiB)."""

    inplace_add: bool = True
    """Adapters add their update into the base layer's output in place (no copy of the 4-bit output)."""

    input_grads: bool = False
    """Make every embedding output require grad, as PEFT does (backward then also runs through the frozen vision tower). Only reentrant checkpointing needs it."""

    checkpoint_every: int = 1
    """With ``model.backbone.gradient_checkpointing``: recompute every k-th decoder layer of the language model only (1: all of them). Larger values trade memory for speed."""

    def check(self) -> None:
        from mmpeft.errors import ConfigError

        if self.loss_chunk < 0:
            raise ConfigError(f"model.speed.loss_chunk must be >= 0 (0: no chunking), got {self.loss_chunk}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"model.speed.checkpoint_every must be >= 1, got {self.checkpoint_every}")


# -- the LM head and cross-entropy in chunks -------------------------------------------------


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, chunk by chunk.

    Forward computes, per chunk of ``chunk`` positions, the logits ``(chunk, vocab)`` in float32,
    their log-sum-exp and the loss, and (when ``hidden`` needs a gradient) the gradient of each
    position's loss with respect to its hidden state, ``(softmax - onehot) @ weight``. Only
    that ``(positions, hidden)`` gradient is kept for backward, which scales it by the incoming
    gradient of each position's loss. The LM head (``weight``, ``bias``) must be frozen.
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        # hidden: (n, h); weight: (vocab, h); targets: (n,)
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (n,)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # (n, h)
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]  # (c, h), (c,)
            logits = nn.functional.linear(h, weight, bias).float()  # (c, vocab)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            losses[start : start + chunk] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # (c, vocab): softmax, in the logits' memory
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # d loss / d logits
                grad[start : start + chunk] = probs.to(weight.dtype) @ weight  # (c, h)
            del logits
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad,) = ctx.saved_tensors  # (n, h)
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None, None


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head if the chunked loss can compute it: a frozen plain linear layer and no logit post-processing."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return None
    config = getattr(model.config, "text_config", model.config)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return head


def chunked_token_losses(
    model: nn.Module, inputs: dict[str, torch.Tensor], keep: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor | None:
    """Each kept position's cross-entropy ``(n_kept,)``, never holding more than ``chunk`` positions' logits.

    Runs the model without its LM head (``model.base_model``: the decoder's final hidden
    states), takes the kept positions ``keep`` ``(batch, seq)`` and applies the head chunk by
    chunk. ``None`` when this model's head cannot be chunked (an adapted or trainable head,
    logit soft-capping or scaling): the caller then computes the logits whole.
    """
    head = output_head(model)
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        log.debug("speed.loss_chunk: %s's LM head cannot be chunked; computing whole logits", type(model).__name__)
        return None
    hidden = base(**inputs, use_cache=False).last_hidden_state  # (batch, seq, h)
    return ChunkedLinearCrossEntropy.apply(hidden[keep], head.weight, head.bias, targets, chunk)  # (n_kept,)


def apply_to_adapters(model: nn.Module, speed: Speed) -> int:
    """Set the adapter-side levers (``inplace_add``) on every adapted layer of ``model``, after injection. Returns how many."""
    from mmpeft.adapters import AdaptedLinear

    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    for layer in layers:
        layer.add_in_place = speed.inplace_add
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
