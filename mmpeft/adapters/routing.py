"""Routing for mixture adapters: routers, the per-model routing context, the auxiliary losses.

Every mixture adapter (AsymLoRA, LoRA-MoE, MixLoRA and third-party ones) routes through
this module, so gating, top-k, prompt pooling and the balance losses exist once.

How task labels reach the routers without patching the model's forward: all routers of a
model are bound at injection to one :class:`RoutingContext`. Before each training step the
LightningModule puts the batch's attention mask, prompt mask and task ids into it
(:meth:`RoutingContext.step`); routers read them and record their logits into it; after the
forward the module turns the records into auxiliary losses (:func:`routing_losses`), and
observers of the context (:attr:`RoutingContext.observers`) see every recorded pass, which is
how statistics (:class:`RoutingStats`, logged by :mod:`mmpeft.monitor`) follow training and
validation without another hook in the model.

Records are taken only during the step's own forward. Non-reentrant gradient checkpointing
re-runs the forward inside backward; by then recording is off, while the masks stay set so
that the recomputation routes exactly as the forward did. (Under *reentrant* checkpointing
the forward runs without grad and a recorded loss would silently not train the routers;
mmpeft always uses the non-reentrant form.)

Instance routing (MixLoRA, AsymLoRA with ``routing: instance``) pools a layer's input over the
prompt tokens of each sample. When generating, :meth:`RoutingContext.generation` computes that
routing once per instance, on the prompt, and reuses it at every decoding step, with or
without a KV cache, so generation routes as training did.

A :class:`Router` decides in one of two ways, both written here once: :meth:`Router.forward`
gives a dense gate over every expert (top-k renormalised, or the full softmax), which AsymLoRA
and LoRA-MoE multiply into their experts' outputs; :meth:`Router.select` gives the indices of the
top-k experts and a weight for each (:func:`selection_weights`), for adapters that gather the
chosen experts (MixLoRA's factors), optionally with conditional scores added before the top-k.
Either way the router records what it applied (:attr:`RouterRecord.gate`), so the statistics
describe the experts that ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.errors import MergeError
from mmpeft.packing import Layout

Level = Literal["token", "instance"]


Weighting = Literal["straight_through", "score"]
"""How :meth:`Router.select` weights the experts it chose (see :func:`selection_weights`)."""


@dataclass
class RouterRecord:
    """One router's decision in one forward pass, kept for the auxiliary losses and statistics."""

    name: str
    """Path of the adapted layer (``layers.3.mlp.up_proj``) plus the router's role, if several."""

    logits: torch.Tensor
    """``(batch, T, experts)`` pre-softmax scores; ``T`` is the sequence length for token routing,
    1 for instance routing."""

    probs: torch.Tensor
    """``(batch, T, experts)`` the router's own probabilities ``softmax(logits / temperature)``:
    what the balance losses train (for a router with conditional scores, without them)."""

    selected: torch.Tensor
    """``(batch, T, experts)`` bool, the experts each token or instance actually used."""

    top_k: int
    """Experts used per token or instance (the number of experts for a dense router)."""

    level: Level
    """``token``: one decision per token; ``instance``: one per sample, from its pooled prompt."""

    gate: torch.Tensor
    """``(batch, T, experts)`` the gate the forward applied, detached; sums to 1 over each token's
    (instance's) experts and is 0 on the experts not selected.

    For a gating router (:meth:`Router.forward`) it is the gate itself: the top-k probabilities
    renormalised, or every probability for a dense router. For a selecting router
    (:meth:`Router.select`) it is the forward weights of the chosen experts divided by their sum:
    ``1 / k`` on each chosen expert under ``straight_through`` weighting (the forward uses them
    unweighted), the chosen experts' scores renormalised under ``score`` weighting. The scores
    include any conditional term, so for MixLoRA's B-factor router the gate and :attr:`selected`
    are the factors that ran, not the top-k of :attr:`probs`. Nothing recomputes it from
    :attr:`probs`; statistics (:class:`RoutingStats`, :class:`GateMeans`) read it as it is."""


class RoutingContext:
    """What the routers of one model share during a forward pass: masks, task ids, records."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        """``(batch, seq)`` bool, the real (non-padding) tokens."""
        self.prompt_mask: torch.Tensor | None = None
        """``(batch, seq)`` bool, the tokens an instance router pools over (real and not trained on)."""
        self.task_ids: torch.Tensor | None = None
        """``(batch,)`` each sample's task id."""
        self.packed: Layout | None = None
        """A packed batch's layout (:mod:`mmpeft.packing`): the masks above are then ``(rows, length)``, and routers
        and losses work per sample through it."""
        self._repeated: dict[int, Layout] = {}
        self.num_tasks: int | None = None
        """Size of the task vocabulary (else inferred from the batch)."""
        self.records: list[RouterRecord] = []
        self.recording = False
        self.groups: dict[str, str] = {}
        """Each router's group (a record's ``name`` to its label, set by :func:`bind_routers`), for statistics."""
        self.observers: list[Callable[[RoutingContext], None]] = []
        """Called with the context at the end of every recorded :meth:`step`, while its records and masks are set."""
        self._instance_cache: dict[Any, Any] | None = None

    # -- set by the trainer -----------------------------------------------------------------
    @contextmanager
    def step(
        self,
        attention_mask: torch.Tensor | None,
        prompt_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        record: bool = True,
        packed: Layout | None = None,
    ) -> Iterator[RoutingContext]:
        """Route one forward pass with these masks and labels, recording router outputs."""
        self.attention_mask = None if attention_mask is None else attention_mask.bool()
        self.prompt_mask = None if prompt_mask is None else prompt_mask.bool()
        self.task_ids = task_ids
        self.packed, self._repeated = packed, {}
        self.records = []
        self.recording = record
        try:
            yield self
            if record:
                for observe in self.observers:
                    observe(self)
        finally:
            # Masks stay: a checkpointed forward is recomputed during backward, after this exits.
            self.recording = False

    @contextmanager
    def generation(
        self, attention_mask: torch.Tensor | None = None, routing_mask: torch.Tensor | None = None
    ) -> Iterator[RoutingContext]:
        """Generate with instance routing computed once on the prompt and reused for every new token.

        ``attention_mask`` is the prompt's ``(batch, prompt_len)`` mask (left padding is fine); ``routing_mask``
        ``(batch, prompt_len)`` the tokens instance routers pool (default: the real ones), the tokens before the first
        answer of a multi-turn prompt (``ChatEncoder.encode_prompt``).
        """
        self.attention_mask = None if attention_mask is None else attention_mask.bool()
        self.prompt_mask = self.attention_mask
        if routing_mask is not None:
            routing = routing_mask.bool()
            self.prompt_mask = routing if self.attention_mask is None else routing & self.attention_mask
        self.task_ids = None
        self.packed = None
        self.records = []
        self.recording = False
        self._instance_cache = {}
        try:
            yield self
        finally:
            self._instance_cache = None
            self.attention_mask = self.prompt_mask = None

    def generate(self, model: nn.Module, **kwargs: Any) -> Any:
        """``model.generate(**kwargs)`` inside :meth:`generation` (the prompt's masks taken from the kwargs: a
        ``routing_mask`` there is the context's, not passed on to the model).

        ``generate`` repeats every prompt ``num_beams`` times for beam search, else
        ``num_return_sequences`` times, before its first forward; the mask is repeated the same way.
        """
        mask = kwargs.get("attention_mask")
        routing = kwargs.pop("routing_mask", None)  # ours, not the model's
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
        copies = (
            beams
            if beams > 1
            else kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
        )
        if copies > 1:  # (batch * copies, prompt_len), as generate expands the inputs
            mask = None if mask is None else mask.repeat_interleave(copies, dim=0)
            routing = None if routing is None else routing.repeat_interleave(copies, dim=0)
        with self.generation(mask, routing):
            return model.generate(**kwargs)

    # -- used by routers --------------------------------------------------------------------
    def token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The attention mask if it lines up with ``x``'s ``(batch, seq)`` dims."""
        mask = self.attention_mask
        return mask if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2] else None

    def layout_of(self, x: torch.Tensor) -> Layout | None:
        """The layout ``x`` lies in, when it lies in the rows of the packed batch being routed: the tokens'
        ``(rows, length, ...)``, or the image slots' ``(rows, slots * k, ...)`` (``k`` vision tokens a slot, the
        inputs of Mllama's cross-attention keys and values); ``None`` for anything else (a padded batch, a vision
        tower's images)."""
        if self.packed is None or x.dim() < 2:
            return None
        if tuple(x.shape[:2]) == self.packed.shape:
            return self.packed
        slots = self.packed.images  # where cross-attention reads the row's image slots (Mllama)
        if slots is None or x.shape[0] != slots.shape[0] or x.shape[1] % slots.shape[1]:
            return None
        k = x.shape[1] // slots.shape[1]
        if k not in self._repeated:
            self._repeated[k] = slots.repeat(k)
        return self._repeated[k]

    def sequences(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(batch', seq, ...)`` with one row per sequence of the batch (a sample, or a packed row).

        The language model's inputs have one already. Mllama's cross-attention keys and values read its images'
        tiles, ``(batch * images * tiles, patches, d)``, consecutive per sample: their rows fold into ``(batch,
        images * tiles * patches, d)``, so routers, pooling and losses see each sample's images as one sequence.
        """
        rows = self._rows()
        if rows is None or x.dim() < 3 or x.shape[0] == rows or x.shape[0] % rows:
            return x
        return x.reshape(rows, -1, *x.shape[2:])

    def _per_sequence(self, x: torch.Tensor) -> tuple[torch.Tensor, Layout | None]:
        """:meth:`sequences` of ``x`` and the packed layout it lies in (:meth:`layout_of`), if any."""
        folded = self.sequences(x)
        return folded, self.layout_of(folded)

    def _rows(self) -> int | None:
        """The number of sequences of the batch being routed, ``None`` when nothing tells."""
        if self.packed is not None:
            return self.packed.shape[0]
        mask = self.attention_mask if self.attention_mask is not None else self.prompt_mask
        if mask is not None:
            return mask.shape[0]
        return None if self.task_ids is None else self.task_ids.shape[0]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of ``x`` ``(batch, seq, d)`` over each sample's prompt tokens: ``(batch, d)``; for a packed batch's
        rows, ``(n, d)`` over each sample's prompt tokens within its row (:meth:`sequences` first).

        Falls back to the real tokens, then to every position, when no matching mask is set.
        """
        if x.dim() != 3:
            raise ValueError(f"instance routing needs (batch, seq, features) inputs, got shape {tuple(x.shape)}")
        x, packed = self._per_sequence(x)
        if packed is not None:
            mask = self.prompt_mask if packed is self.packed and self.prompt_mask is not None else packed.real()
            x, mask = packed.unpack(x), packed.unpack(mask, False)  # (n, longest, d), (n, longest)
            weights = mask.to(x.dtype).unsqueeze(-1)  # (n, longest, 1)
            return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (n, d)
        mask = next(
            (m for m in (self.prompt_mask, self.attention_mask) if m is not None and m.shape == x.shape[:2]), None
        )
        if mask is None:
            return x.mean(dim=1)
        weights = mask.to(x.dtype).unsqueeze(-1)  # (batch, seq, 1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (batch, d)

    def spread(self, gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """An instance router's ``gate`` ``(batch, 1, E)`` for the tokens of ``x``: itself, or for a packed batch's
        rows each sample's gate at its positions, ``(rows, length, E)``; for folded rows (:meth:`sequences`), at
        ``x``'s own rows."""
        folded, packed = self._per_sequence(x)
        out = gate if packed is None else packed.spread(gate[:, 0])  # (batch, 1, E) or (rows, length, E)
        if folded is x:
            return out
        if packed is None:
            return out.repeat_interleave(x.shape[0] // out.shape[0], dim=0)  # (batch', 1, E)
        return out.reshape(*x.shape[:2], -1)  # (batch', seq, E)

    def by_sample(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` of ``x`` ``(batch, seq, d)`` with one operand per sample (batched matrix products with a row per
        sample), on :meth:`sequences` of ``x``: for a packed batch's rows, ``fn`` runs on the padded layout ``(n,
        longest, d)`` and its result is packed back."""
        folded, packed = self._per_sequence(x)
        out = fn(folded) if packed is None else packed.pack(fn(packed.unpack(folded)))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def sample_records(self) -> Iterator[tuple[RouterRecord, torch.Tensor]]:
        """Each record of the pass with its mask, in the padded layout: ``(batch, T, E)`` and ``(batch, T)`` bool over
        the real tokens (token routing) or ones ``(batch, 1)`` (instance routing). Token records of folded rows
        (:meth:`sequences`) fold too, and a packed batch's token records are unpacked to its samples, so every loss
        and statistic counts samples and their tokens as in the padded batch."""
        for record in self.records:
            if record.level != "token":
                yield record, _mask(record, self)
                continue
            record = _map_tensors(record, self.sequences)
            packed = self.layout_of(record.probs)
            if packed is None:
                yield record, _mask(record, self)
            else:  # (n, longest, E) each
                yield _map_tensors(record, packed.unpack), packed.mask.to(record.probs.device)

    def instance_routing(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, or during generation its value from the prompt's forward pass."""
        if self._instance_cache is None:
            return compute()
        if key not in self._instance_cache:
            self._instance_cache[key] = compute()
        return self._instance_cache[key]

    def record(self, record: RouterRecord) -> None:
        if self.recording:
            self.records.append(record)


def _map_tensors(record: RouterRecord, fn: Callable[[torch.Tensor], torch.Tensor]) -> RouterRecord:
    """``record`` with ``fn`` applied to each of its ``(batch, T, ...)`` tensors."""
    return replace(
        record, logits=fn(record.logits), probs=fn(record.probs), selected=fn(record.selected), gate=fn(record.gate)
    )


def top_k_gate(probs: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row's ``k`` largest probabilities, renormalised to sum to 1 (MoLA / Mixtral style).

    Returns the gate weights and the bool mask of kept experts, both shaped like ``probs``.
    ``k=None`` (or ``k >=`` the number of experts) is the dense gate: ``probs`` unchanged.
    """
    experts = probs.shape[-1]
    if k is None or k >= experts:
        return probs, torch.ones_like(probs, dtype=torch.bool)
    _, index = probs.topk(k, dim=-1)  # (..., k)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, index, True)
    kept = probs * selected
    return kept / kept.sum(dim=-1, keepdim=True), selected


def selection_weights(log_score: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """The weight ``(..., k)`` the forward applies to each chosen expert, from its log score ``(..., k)``.

    A hard top-k with the chosen experts used unweighted (MixLoRA's released code) gives the router
    no gradient, so it never learns; either weighting passes the gradient on to the scores.
    ``straight_through``: 1 in the forward (the unweighted formula), and the gradient of the score
    in the backward, as ``score / stop_grad(score)`` would give. ``score``: the scores renormalised
    over the chosen experts, times ``k`` so that the weights average 1.
    """
    if weighting == "straight_through":
        # Written in log space: score / stop_grad(score) is 0 / 0 (NaN) when a saturated router's
        # score underflows to 0, and training diverges.
        return torch.exp(log_score - log_score.detach())
    if weighting == "score":
        return torch.softmax(log_score, dim=-1) * log_score.shape[-1]
    raise ValueError(f"weighting must be 'straight_through' or 'score', got {weighting!r}")


@dataclass
class Selection:
    """The experts a selecting router chose (:meth:`Router.select`) and the weights the forward applies to them."""

    index: torch.Tensor
    """``(..., k)`` the chosen experts, highest score first."""

    weight: torch.Tensor
    """``(..., k)`` each chosen expert's weight (:func:`selection_weights`); carries the router's gradient."""


class Router(nn.Module):
    """A linear router ``softmax(R x / temperature)`` over ``experts``, per token or per instance.

    Two ways to use it, each recording its decision in the routing context:

    - called with a layer's input ``x`` ``(..., d_in)`` (:meth:`forward`), it returns the gate
      ``(..., experts)`` for token routing, or ``(batch, 1, experts)`` for instance routing (``x``
      pooled over the prompt; broadcastable against ``(batch, seq, ...)``);
    - :meth:`select` returns the top-k experts' indices and weights instead, for adapters that
      gather their chosen experts; its scores may include conditional terms.
    """

    def __init__(
        self,
        in_features: int,
        experts: int,
        *,
        level: Level = "token",
        top_k: int | None = None,
        temperature: float = 1.0,
        weighting: Weighting = "straight_through",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if experts < 1:
            raise ValueError(f"a router needs at least one expert, got {experts}")
        if top_k is not None and not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in [1, {experts}], got {top_k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if weighting not in ("straight_through", "score"):
            raise ValueError(f"weighting must be 'straight_through' or 'score', got {weighting!r}")
        self.level: Level = level
        self.top_k = top_k
        self.temperature = temperature
        self.weighting: Weighting = weighting
        """How :meth:`select` weights the chosen experts; :meth:`forward`'s gate is the renormalised top-k."""
        self.weight = nn.Parameter(torch.empty(experts, in_features))  # (experts, d_in)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default, as HydraLoRA's router
        # HydraLoRA's router is an nn.Linear with its bias; the default (no bias) keeps older adapters' tensors.
        self.bias = nn.Parameter(torch.empty(experts)) if bias else None  # (experts,)
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)  # nn.Linear's default
        self.shared_gate: torch.Tensor | None = None
        """A block router's gate for the current forward (:func:`share_block_routers`), read by every adapter of
        the block; ``None`` outside the block's forward."""
        # Plain attributes, not submodules: the context is shared by every router of the model.
        self.context = RoutingContext()
        self.name = ""

    @property
    def experts(self) -> int:
        return self.weight.shape[0]

    def bind(self, context: RoutingContext, name: str) -> None:
        self.context, self.name = context, name

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h.to(self.weight.dtype), self.weight, self.bias)  # (..., experts)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """What the router reads from a layer input ``x`` ``(batch, seq, d)``: ``x`` itself for token
        routing, its mean over each sample's prompt tokens, ``(batch, 1, d)``, for instance routing."""
        return self.context.pool(x).unsqueeze(1) if self.level == "instance" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.level == "instance":
            # During generation, computed on the prompt's pass and reused for every new token.
            return self.context.instance_routing(self, lambda: self.context.spread(self._gate(self.pool(x)), x))
        return self._gate(x)

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.logits(h)  # (..., experts)
        probs = torch.softmax(logits / self.temperature, dim=-1)  # (..., experts)
        gate, selected = top_k_gate(probs, self.top_k)  # (..., experts) each
        k = self.top_k or self.experts
        self.context.record(RouterRecord(self.name, logits, probs, selected, k, self.level, gate.detach()))
        return gate

    def select(
        self, h: torch.Tensor, conditional_logits: torch.Tensor | None = None, record_conditional: bool = False
    ) -> Selection:
        """The top-k experts for ``h`` ``(batch, T, d_in)`` (see :meth:`pool`), each ``(batch, T, k)``.

        The score of expert ``e`` is ``p_e = softmax(R h / temperature)_e``, plus, with
        ``conditional_logits`` ``(batch, T, n, experts)``, ``sum_n softmax(conditional_logits_n /
        temperature)_e`` (MixLoRA's B-factor router: one softmax per chosen A-factor). Scores are
        summed in log space so that a saturated router, whose probabilities underflow to 0, still
        gives finite weights and gradients. The weights follow :attr:`weighting`. The routing losses see
        the router's own probabilities, or with ``record_conditional`` the whole score divided by ``1 + n``
        (a distribution over the experts, through which the conditional terms get the losses' gradient).
        Not cached for generation: an adapter that selects per instance wraps its whole routing in
        :meth:`RoutingContext.instance_routing`.
        """
        logits = self.logits(h)  # (batch, T, experts)
        log_probs = torch.log_softmax(logits / self.temperature, dim=-1)  # (batch, T, experts)
        log_scores = log_probs
        if conditional_logits is not None:
            conditional = torch.log_softmax(conditional_logits / self.temperature, dim=-1)  # (batch, T, n, experts)
            # log(p + sum_n softmax(c_n)): one logsumexp over the router's and the n conditional terms.
            log_scores = torch.logsumexp(torch.cat([log_probs.unsqueeze(-2), conditional], dim=-2), dim=-2)
        k = self.top_k or self.experts
        log_score, index = log_scores.topk(k, dim=-1)  # (batch, T, k)
        weight = selection_weights(log_score, self.weighting)  # (batch, T, k)
        applied = weight.detach()
        selected = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, index, True)  # (batch, T, experts)
        gate = torch.zeros_like(log_probs).scatter_(
            -1, index, (applied / applied.sum(-1, keepdim=True)).to(log_probs.dtype)
        )  # (batch, T, experts): the applied weights over the chosen experts, summing to 1
        recorded = log_probs.exp()  # (batch, T, experts)
        if record_conditional and conditional_logits is not None:
            recorded = (log_scores - math.log(1 + conditional_logits.shape[-2])).exp()  # sums to 1 over experts
        self.context.record(RouterRecord(self.name, logits, recorded, selected, k, self.level, gate.detach()))
        return Selection(index, weight)


def bind_routers(module: nn.Module, context: RoutingContext, name: str, group: str | None = None) -> None:
    """Bind every :class:`Router` inside ``module`` (an adapter at layer path ``name``) to the model's context.

    ``group`` labels the adapter's layer group for statistics (``asymlora``); an adapter with
    several routers puts each in a group of its own role (``mixlora/router_a``, ``mixlora/router_b``).
    """
    routers = [(sub_name, sub) for sub_name, sub in module.named_modules() if isinstance(sub, Router)]
    for sub_name, router in routers:
        several = len(routers) > 1
        router.bind(context, f"{name}.{sub_name}" if several else name)
        if group is not None:
            context.groups[router.name] = f"{group}/{sub_name}" if several else group


# -- one router per block -------------------------------------------------------------------


def block_width(layers: list[tuple[int, int]]) -> int:
    """The width of a block's input, from its adapted layers' ``(in_features, out_features)``: a residual block's
    output is as wide as its input, so the input width is the one some layer reads and some layer writes (a
    Llama MLP's hidden size: ``gate_proj``/``up_proj`` read it, ``down_proj`` writes it); else the width most of its
    layers read."""
    outs = {out for _, out in layers}
    for width, _ in layers:
        if width in outs:
            return width
    ins = [width for width, _ in layers]
    return max(ins, key=ins.count)


def share_block_routers(
    model: nn.Module, members: dict[str, list[tuple[str, nn.Module]]], context: RoutingContext
) -> dict[str, Router]:
    """One router per block: for each block path (``layers.3.mlp``) and its adapters ``[(layer path, adapter)]``
    (each declaring ``block_router``), the router ``block_router(block width)`` of the first reads the block's input
    once per forward (a forward pre-hook on the block) and every adapter of the block applies that gate (it holds the
    router as ``shared_router``, a reference, not a submodule).

    The router is kept by the block's first adapter (as ``adapter.router``), so it is saved once, with it; the others
    keep no router. It is recorded under the block's path. This is how AsymLoRA's reference code routes its MLP: one
    router on the block's input, shared by ``gate_proj``, ``up_proj`` and ``down_proj``, so that head ``i`` of the
    three projections works as one.
    """
    routers: dict[str, Router] = {}
    for block_path, adapters in members.items():
        block = model.get_submodule(block_path)
        width = block_width([(a.in_features, a.out_features) for _, a in adapters])
        router = adapters[0][1].block_router(width)
        label = context.groups.get(adapters[0][0])
        for layer_path, adapter in adapters:
            context.groups.pop(layer_path, None)
            if "router" in adapter._modules:
                del adapter.router
            object.__setattr__(adapter, "shared_router", router)
        adapters[0][1].router = router
        router.bind(context, block_path)
        if label is not None:
            context.groups[block_path] = label
        block.register_forward_pre_hook(_route_block(router, block_path, width), with_kwargs=True)
        # The gate lives for the block's forward only. Kept on the router after it, the gate of a checkpointed layer's
        # recomputation (whose graph saves every tensor for real) held that layer's recomputed activations until the
        # next forward: all layers' at the end of backward (issue 17). always_call: also when the recomputation
        # stops early, by an exception, inside the block.
        block.register_forward_hook(_clear_block_gate(router), always_call=True)
        routers[block_path] = router
    return routers


def _route_block(router: Router, path: str, width: int) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.shape[-1] != width:
            got = "no tensor" if not isinstance(x, torch.Tensor) else f"width {x.shape[-1]}"
            raise RuntimeError(
                f"router: block at {path!r} reads the block's input (its first argument or hidden_states) of width "
                f"{width}, got {got}; use router: projection for this block"
            )
        router.shared_gate = router(x)

    return hook


def _clear_block_gate(router: Router) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: tuple, _output: Any) -> None:
        router.shared_gate = None

    return hook


def block_gate(router: Router, x: torch.Tensor) -> torch.Tensor:
    """The gate a block router computed for this forward, checked against a projection's input ``x``."""
    gate = router.shared_gate
    if gate is None:
        raise RuntimeError(f"the block router of {router.name!r} has not run: its block's forward was not called")
    if gate.shape[-2] not in (1, x.shape[-2]) or gate.shape[:-2] != x.shape[:-2]:
        raise RuntimeError(
            f"router: block at {router.name!r} gates {tuple(gate.shape[:-1])} tokens but a projection of the block "
            f"reads {tuple(x.shape[:-1])} (cross-attention reads another sequence); use router: projection"
        )
    return gate


# -- auxiliary losses -----------------------------------------------------------------------
# Each takes one record and returns a scalar; masks are (batch, T) bool over real tokens.


@dataclass
class GroupStats:
    """One router group's routing over the batches a :class:`RoutingStats` saw."""

    load: torch.Tensor
    """``(experts,)`` each expert's mean applied gate; sums to 1, and is ``1 / experts`` everywhere when balanced."""

    entropy: float
    """Mean entropy of the routing probabilities divided by ``log(experts)``: 1 is uniform routing, 0 one
    expert per token."""

    task_expert: torch.Tensor | None
    """``(tasks, experts)`` each task's mean applied gate (rows sum to 1), NaN rows for tasks not seen;
    ``None`` without task labels."""

    count: int
    """Tokens (token routing) or samples (instance routing) seen, summed over the group's routers."""


class RoutingStats:
    """Expert load, router entropy and the task x expert gate of each router group, summed over many batches.

    A router's group is its label in ``context.groups`` (see :func:`bind_routers`): an adapter group
    of the config, or one router role of it. Every router of a group counts alike, each over the real
    tokens (token routing) or samples (instance routing) of the batch. Routers with one expert route
    nothing and are left out. Sums stay on the records' device until :meth:`results`; :meth:`reduce`
    can sum them across processes first.
    """

    def __init__(self, num_tasks: int = 0) -> None:
        self.num_tasks = num_tasks
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        """Per group: ``count`` ``()``, ``gate`` ``(E,)``, ``entropy`` ``()``, ``task_gate`` ``(tasks, E)``,
        ``task_count`` ``(tasks,)``."""

    min_experts = 2
    """Routers with fewer experts are left out (one expert routes nothing)."""

    def group_of(self, record: RouterRecord, context: RoutingContext) -> str:
        return context.groups.get(record.name, record.name)

    def add(self, context: RoutingContext) -> None:
        """Count the records of the pass that just ran under ``context.step(..., record=True)``."""
        task_ids = context.task_ids
        for record, mask in context.sample_records():
            experts = record.probs.shape[-1]
            if experts < self.min_experts:
                continue
            mask = mask.double()  # (batch, T): 1 for each real token (sample)
            probs = record.probs.detach().double()  # (batch, T, E)
            gate = record.gate.detach().double() * mask.unsqueeze(-1)  # (batch, T, E), 0 on padding
            entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1) / math.log(experts)  # (batch, T)
            sums = self.sums.setdefault(self.group_of(record, context), {})
            values = {"count": mask.sum(), "gate": gate.sum((0, 1)), "entropy": (entropy * mask).sum()}
            if task_ids is not None and self.num_tasks:
                tasks = F.one_hot(task_ids.to(probs.device), self.num_tasks).double()  # (batch, tasks)
                values["task_gate"] = tasks.T @ gate.sum(1)  # (tasks, E)
                values["task_count"] = tasks.T @ mask.sum(1)  # (tasks,)
            for key, value in values.items():
                sums[key] = sums[key] + value if key in sums else value

    def reduce(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every sum ``s`` by ``fn(s)``, e.g. an all-reduce across processes (every process must hold
        the same groups)."""
        for sums in self.sums.values():
            for key in sorted(sums):
                sums[key] = fn(sums[key])

    def results(self) -> dict[str, GroupStats]:
        out = {}
        for group, sums in self.sums.items():
            count = sums["count"].clamp(min=1)
            task_expert = None
            if "task_gate" in sums:
                seen = sums["task_count"].unsqueeze(1)  # (tasks, 1)
                task_expert = (
                    torch.where(seen > 0, sums["task_gate"] / seen.clamp(min=1), math.nan).float().cpu()
                )  # (tasks, E)
            load = (sums["gate"] / count).float().cpu()  # (E,)
            out[group] = GroupStats(load, float(sums["entropy"] / count), task_expert, int(sums["count"]))
        return out


class GateMeans(RoutingStats):
    """Each router's applied gate averaged over the real tokens (token routing) or samples (instance routing)
    of many batches.

    :class:`RoutingStats` with one group per router (the adapted layer's path), single-expert
    routers included: :meth:`means` gives each router's ``(experts,)`` mean gate, what a mixture
    collapses with into one LoRA for a task (``python -m mmpeft merge``).
    """

    min_experts = 1

    def group_of(self, record: RouterRecord, context: RoutingContext) -> str:
        return record.name

    def means(self) -> dict[str, torch.Tensor]:
        return {name: stats.load for name, stats in self.results().items()}


def expert_gate(gate: torch.Tensor | None, experts: int, what: str) -> torch.Tensor:
    """``gate`` checked to be one weight per expert, ``(experts,)``; ``None`` is allowed for a single expert.

    Used by mixture adapters' ``as_lora(gate)``; raises :class:`~mmpeft.errors.MergeError` when a
    mixture of several experts is collapsed without a gate.
    """
    if gate is None:
        if experts == 1:
            return torch.ones(1)
        raise MergeError(
            f"{what} mixes {experts} experts with a router, so it has no single weight update: collapsing it "
            "into one LoRA needs a task's mean router weights (python -m mmpeft merge|export --task NAME --data SHARDS)"
        )
    gate = torch.as_tensor(gate, dtype=torch.float32).flatten()
    if gate.numel() != experts:
        raise ValueError(f"{what}: the gate has {gate.numel()} weights for {experts} experts")
    return gate


def _mask(record: RouterRecord, context: RoutingContext) -> torch.Tensor:
    batch, t = record.probs.shape[:2]
    mask = context.attention_mask if record.level == "token" else None
    if mask is None or mask.shape != (batch, t):
        mask = torch.ones(batch, t, dtype=torch.bool, device=record.probs.device)
    return mask


def _chosen(record: RouterRecord) -> torch.Tensor:
    """``(batch, T, E)``: 1 on the experts each token or instance counts as using for load balance: its top-k, or
    its top-1 for a dense router, whose every expert is "used"."""
    experts = record.probs.shape[-1]
    if record.top_k >= experts:
        return F.one_hot(record.probs.argmax(-1), experts).to(record.probs.dtype)
    return record.selected.to(record.probs.dtype)


def load_balance_loss(record: RouterRecord, mask: torch.Tensor) -> torch.Tensor:
    """Switch / Mixtral: ``E * sum_e f_e * P_e`` over real tokens.

    ``f_e`` is the fraction of tokens whose top-k includes expert ``e`` (top-1 for a dense
    router, whose every expert is "used"), ``P_e`` the mean routing probability. It equals
    ``k`` when routing is uniform; gradients flow through ``P_e``.
    """
    probs = record.probs[mask]  # (tokens, E)
    chosen = _chosen(record)[mask]  # (tokens, E)
    return probs.shape[-1] * (chosen.mean(0) * probs.mean(0)).sum()


def pooled_load_balance_loss(records: list[RouterRecord], masks: list[torch.Tensor]) -> torch.Tensor:
    """The AsymLoRA/HydraLoRA reference code's load balance: per sample, ``sum_e f_e * P_e`` with ``f_e`` and ``P_e``
    taken over the sample's real tokens in every routed layer at once, without the factor ``E``; the mean over the
    batch. It equals ``1 / E`` when routing is uniform (top-1), where the per-layer form summed over ``L`` layers is
    ``L``. Routers with different numbers of experts are pooled separately and their losses added."""
    groups: dict[int, list[tuple[RouterRecord, torch.Tensor]]] = {}
    for record, mask in zip(records, masks):
        groups.setdefault(record.probs.shape[-1], []).append((record, mask))
    total = None
    for pairs in groups.values():
        probs = chosen = count = None
        for record, mask in pairs:
            weight = mask.to(record.probs.dtype).unsqueeze(-1)  # (batch, T, 1)
            p = (record.probs * weight).sum(1)  # (batch, E)
            c = (_chosen(record) * weight).sum(1)  # (batch, E)
            n = weight.sum((1, 2))  # (batch,)
            probs, chosen, count = (p, c, n) if probs is None else (probs + p, chosen + c, count + n)
        count = count.clamp(min=1).unsqueeze(-1)  # (batch, 1)
        loss = ((probs / count) * (chosen / count)).sum(-1).mean()  # per sample, then over the batch
        total = loss if total is None else total + loss
    return total


def z_loss(record: RouterRecord, mask: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``mean(logsumexp(logits)^2)`` over real tokens, keeps logits small."""
    return (torch.logsumexp(record.logits[mask].float(), dim=-1) ** 2).mean()


def task_groups(experts: int, num_tasks: int) -> torch.Tensor:
    """``(num_tasks, experts)`` bool: the experts assigned to each task.

    Experts are split into ``min(experts, num_tasks)`` contiguous groups and task ``t`` takes
    group ``t mod groups`` (LoRAMoE assigns its expert groups to data types the same way).
    """
    groups = min(experts, num_tasks)
    expert_group = torch.arange(experts) * groups // experts  # (E,) contiguous groups
    return expert_group.unsqueeze(0) == (torch.arange(num_tasks) % groups).unsqueeze(1)


def localized_balance_loss(
    record: RouterRecord, mask: torch.Tensor, task_ids: torch.Tensor, num_tasks: int, delta: float
) -> torch.Tensor:
    """LoRAMoE's localized balancing constraint: ``CV(I * Q)^2``.

    ``Q`` ``(E, batch)`` is each expert's importance for each sample (its routing probability
    summed over the sample's real tokens); ``I`` is ``1 + delta`` for the experts assigned to
    the sample's task and ``1 - delta`` for the others. ``CV^2`` is LoRAMoE's ``cv_squared`` (the sparsely-gated
    MoE's): the sample variance (unbiased) over the mean squared, with its ``1e-10`` guard.
    """
    importance = (record.probs * mask.unsqueeze(-1)).sum(1).T  # (E, batch)
    assigned = task_groups(importance.shape[0], num_tasks).to(importance.device)[task_ids].T  # (E, batch)
    weighted = importance * (1 + delta * (2 * assigned.to(importance.dtype) - 1))
    return weighted.float().var() / (weighted.float().mean() ** 2 + 1e-10)


def mutual_information_loss(
    record: RouterRecord, mask: torch.Tensor, task_ids: torch.Tensor, num_tasks: int
) -> torch.Tensor:
    """Mod-Squad's loss: ``-I(expert; task) = H(expert | task) - H(expert)``.

    ``p(e | t)`` is the mean routing probability over the real tokens of task ``t``'s samples,
    ``p(t)`` their share of the batch's tokens. Minimising it balances experts overall and
    specialises them per task.
    """
    probs = record.probs[mask].float()  # (tokens, E)
    token_tasks = task_ids.unsqueeze(1).expand(mask.shape)[mask]  # (tokens,)
    one_hot = F.one_hot(token_tasks, num_tasks).to(probs.dtype)  # (tokens, tasks)
    joint = one_hot.T @ probs / probs.shape[0]  # (tasks, E): p(t, e)
    p_task = joint.sum(1, keepdim=True)  # (tasks, 1)
    p_expert = joint.sum(0)  # (E,)
    conditional = joint / p_task.clamp(min=1e-12)  # (tasks, E): p(e | t)
    h_expert = -(p_expert * p_expert.clamp(min=1e-12).log()).sum()
    h_conditional = -(p_task.squeeze(1) * (conditional * conditional.clamp(min=1e-12).log()).sum(1)).sum()
    return h_conditional - h_expert


@dataclass
class RoutingLosses:
    """Coefficients of the routers' auxiliary losses, each summed over every routed layer."""

    load_balance: float = 0.01
    """Switch/Mixtral load balance ``E * sum_e f_e P_e`` (Fedus et al. 2022). 0.01 is the usual value for the
    ``layer`` form; HydraLoRA's MLLM script uses 0.05 with the ``sample`` form (:attr:`load_balance_pooling`)."""

    load_balance_pooling: Literal["layer", "sample"] = "layer"
    """How the load balance is taken. ``layer`` (Switch/Mixtral): ``E * sum_e f_e P_e`` per routed layer over the
    batch's real tokens, summed over the layers (``L`` at uniform top-1 routing). ``sample`` (the AsymLoRA/HydraLoRA
    reference code): per sample, ``f`` and ``P`` over its real tokens in every routed layer pooled,
    ``sum_e f_e P_e`` without ``E``, then the mean over samples (``1 / E`` at uniform routing): about ``E x L``
    times smaller, so the reference's coefficient keeps the strength it had there."""

    z_loss: float = 0.001
    """Router z-loss ``mean(logsumexp(logits)^2)`` (Zoph et al. 2022, ST-MoE), keeps router logits small."""

    localized_balance: float = 0.0
    """LoRAMoE's task-aware localized balancing (Dou et al. 2024); needs task labels. 0 turns it off."""

    localized_delta: float = 0.1
    """LoRAMoE's ``delta``: how much more a sample's own task group of experts is weighted."""

    mutual_information: float = 0.0
    """Mod-Squad's expert-task mutual information loss (Chen et al. 2023); needs task labels. 0 turns it off."""


def routing_losses(context: RoutingContext, coefficients: RoutingLosses) -> dict[str, torch.Tensor]:
    """Each enabled auxiliary loss summed over the recorded routers, *unweighted*; empty without routers."""
    losses: dict[str, torch.Tensor] = {}

    def add(name: str, value: torch.Tensor) -> None:
        losses[name] = losses[name] + value if name in losses else value

    task_ids = context.task_ids
    num_tasks = context.num_tasks or (int(task_ids.max()) + 1 if task_ids is not None and task_ids.numel() else None)
    pooled: list[tuple[RouterRecord, torch.Tensor]] = []
    for record, mask in context.sample_records():
        if record.probs.shape[-1] < 2:
            continue  # one expert: nothing to balance
        if coefficients.load_balance and coefficients.load_balance_pooling == "sample":
            pooled.append((record, mask))
        elif coefficients.load_balance:
            add("load_balance", load_balance_loss(record, mask))
        if coefficients.z_loss:
            add("z_loss", z_loss(record, mask))
        if task_ids is not None and num_tasks:
            if coefficients.localized_balance:
                add(
                    "localized_balance",
                    localized_balance_loss(record, mask, task_ids, num_tasks, coefficients.localized_delta),
                )
            if coefficients.mutual_information:
                add("mutual_information", mutual_information_loss(record, mask, task_ids, num_tasks))
    if pooled:
        add("load_balance", pooled_load_balance_loss([r for r, _ in pooled], [m for _, m in pooled]))
    return losses


def weighted_sum(losses: dict[str, torch.Tensor], coefficients: RoutingLosses) -> torch.Tensor | None:
    """``sum_name coefficient[name] * loss[name]``, or ``None`` when there is nothing to add."""
    terms = [getattr(coefficients, name) * value for name, value in losses.items()]
    return torch.stack(terms).sum() if terms else None
