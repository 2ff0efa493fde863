"""The training objective, in one place: what a batch trains, the LM loss, and what the routers see.

A batch from the data module (:meth:`mmpeft.data.encode.ChatEncoder.collate`) is ``inputs`` for the
model, ``labels`` ``(batch, seq)`` holding a token id where the model is trained and
:data:`IGNORE_INDEX` everywhere else (prompts, image tokens, padding), and ``task_ids`` ``(batch,)``.
Everything that reads those labels is here:

- :func:`next_token_targets`: which positions predict a trained token, and that token;
- :func:`token_losses`, :func:`lm_losses`: the next-token cross-entropy of those positions, with the
  LM head applied whole or in chunks (``model.speed.loss_chunk``), one function either way;
- :func:`routing_masks`, :func:`routed`: the masks the routers of mixture adapters read (the real
  tokens, and the prompt tokens an instance router pools over) and the routing context set with them.

The LightningModule, ``merge``/``export``, the tests and the benchmarks all call these; none writes
the rules again.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.packing import Layout, packed_inputs

if TYPE_CHECKING:  # the data pipeline imports this module for IGNORE_INDEX; it needs no adapter code
    from mmpeft.adapters.routing import RoutingContext

log = logging.getLogger("mmpeft")

IGNORE_INDEX = -100
"""The label of a position that is not trained (PyTorch's and transformers' ``ignore_index``)."""


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions predict a trained token, and those tokens.

    ``labels`` is ``(batch, seq)`` with ``IGNORE_INDEX`` where nothing is trained. Returns a
    ``(batch, seq)`` bool mask of the positions whose *next* token is trained and the
    ``(n_kept,)`` tokens they must predict, in the mask's row-major order.
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (batch, seq): the token each position predicts
    keep = shifted != IGNORE_INDEX
    return keep, shifted[keep]


def routing_masks(
    inputs: dict[str, torch.Tensor], labels: torch.Tensor, packed: Layout | None = None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The masks routers read: the real tokens ``(batch, seq)`` bool (``None`` without an attention mask) and the
    prompt tokens ``(batch, seq)`` bool, which instance routers pool over: the real tokens before the sample's first
    trained token.

    Before the *first* trained token, not every untrained one: in a multi-turn chat, a gate computed from later user
    turns would route earlier answers with what comes after them, which generation never has. Generation pools the
    same tokens of its prompt (the ``routing_mask`` :meth:`ChatEncoder.encode_prompt` adds), so every turn routes
    as it trained.

    A packed batch (``packed``): the same masks in its rows ``(rows, length)``, each sample's prompt taken within
    the sample."""
    if packed is not None:
        trained = packed.unpack(labels, IGNORE_INDEX) != IGNORE_INDEX  # (n, longest)
        prompt = (trained.cumsum(dim=1) == 0) & packed.mask.to(labels.device)
        return packed.real().to(labels.device), packed.pack(prompt, False)
    attention = inputs.get("attention_mask")
    attention = None if attention is None else attention.bool()
    trained = labels.to(attention.device if attention is not None else labels.device) != IGNORE_INDEX
    prompt = trained.cumsum(dim=1) == 0  # (batch, seq): before the first trained token
    if attention is not None:
        prompt &= attention
    return attention, prompt


def routed(context: RoutingContext, batch: dict[str, Any], record: bool = True) -> AbstractContextManager:
    """``context`` set up for one forward pass over ``batch``: its masks (:func:`routing_masks`) and task ids.

    ``batch`` holds ``inputs``, ``labels`` and ``task_ids`` on the model's device. With ``record``
    the routers' decisions are kept in ``context.records`` for the auxiliary losses and statistics.
    """
    packed = Layout.of(batch)
    attention, prompt = routing_masks(batch["inputs"], batch["labels"], packed)
    task_ids = batch.get("task_ids")
    if task_ids is not None and attention is not None:
        task_ids = task_ids.to(attention.device)
    return context.step(attention, prompt, task_ids, record=record, packed=packed)


# -- the LM loss ----------------------------------------------------------------------------------


def kept_logits(model: nn.Module, inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """The logits ``(n_kept, vocab)`` of the positions ``keep`` ``(batch, seq)`` only (``logits_to_keep``).

    Prompts and image tokens never reach the LM head: with a 150k-token vocabulary the full
    ``(batch, seq, vocab)`` logits would be the largest tensor of the step.
    """
    return model(**inputs, use_cache=False, logits_to_keep=keep).logits


def token_losses(
    model: nn.Module, inputs: dict[str, torch.Tensor], keep: torch.Tensor, targets: torch.Tensor, chunk: int = 0
) -> torch.Tensor:
    """Each kept position's next-token cross-entropy, ``(n_kept,)`` float32.

    With ``chunk`` > 0 and an LM head that can be chunked (:func:`output_head`), the head and the
    cross-entropy run ``chunk`` positions at a time (:class:`ChunkedLinearCrossEntropy`), so no
    ``(positions, vocab)`` logits outlive a chunk; otherwise the kept positions' logits are
    computed whole (:func:`kept_logits`). Both give the same losses up to float32 noise.
    """
    head = output_head(model) if chunk > 0 else None
    decoder = getattr(model, "base_model", None)
    if head is not None and decoder is not None and decoder is not model:
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (batch, seq, h)
        return ChunkedLinearCrossEntropy.apply(hidden[keep], head.weight, head.bias, targets, chunk)  # (n_kept,)
    if chunk > 0:
        log.debug("speed.loss_chunk: %s's LM head cannot be chunked; computing whole logits", type(model).__name__)
    logits = kept_logits(model, inputs, keep)  # (n_kept, vocab)
    return F.cross_entropy(logits.float(), targets, reduction="none")  # (n_kept,)


def lm_losses(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    chunk: int = 0,
    packed: Layout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the trained tokens, and each sample's own mean.

    The per-sample means ``(batch,)`` (detached; NaN for a sample without trained tokens) come
    from the same per-token losses (:func:`token_losses`), for the per-task losses of
    :mod:`mmpeft.monitor`. A packed batch (``packed``) gets its position ids here
    (:func:`~mmpeft.packing.packed_inputs`) and a mean per sample, not per row.
    """
    keep, targets = next_token_targets(labels)
    with packed_inputs(model, inputs, packed) as model_in:
        token_loss = token_losses(model, model_in, keep, targets, chunk)  # (n_kept,)
    per_position = token_loss.new_zeros(keep.shape).masked_scatter(keep, token_loss.detach())  # (batch, seq)
    if packed is not None:  # (n, longest): each sample's positions
        per_position, keep = packed.unpack(per_position), packed.unpack(keep, False)
    return token_loss.mean(), per_position.sum(1) / keep.sum(1)  # (), (batch,)


def lm_loss(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    chunk: int = 0,
    packed: Layout | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the trained tokens (see :func:`lm_losses`)."""
    return lm_losses(model, inputs, labels, chunk, packed)[0]


# -- the LM head and cross-entropy in chunks ------------------------------------------------------


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
    """The model's LM head if the chunked loss can compute it: a frozen plain linear layer, no logit post-processing."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return None
    config = getattr(model.config, "text_config", model.config)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return head
