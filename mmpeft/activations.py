"""What a training step adds to memory: one step run with stand-ins for the weights, every allocation counted.

:mod:`mmpeft.memory` counts what training holds before its first batch. What a batch adds on top
(activations, the recomputation of checkpointed layers, the LM head's logits, gradients in flight,
the optimizer's temporaries) depends on the model's own code, the batch's images and tokens,
checkpointing, precision and the attention kernel, so it is not written down here as a formula: the
step is *run*, with the model built on the meta device and its tensors then replaced by fake CPU
tensors (PyTorch's ``FakeTensor``: sizes, dtypes and devices, no data, no arithmetic), and a torch
dispatch mode (:class:`StepMemory`) counts the bytes of every storage an operation creates and frees,
in order, as the allocator would see them. Its peak is what the step adds.

What makes the run the real one:

- **The batch is real.** Token ids, masks, image grids and pixel values stay real CPU tensors, so
  everything the model computes from them alone (image-token positions, rotary indices, masks) is
  computed for real; an operation that mixes them with the model's stand-ins runs on stand-ins. A
  ``.to(device)`` is what it is on one GPU: no copy.
- **Fake CPU tensors, not meta ones**, because autocast casts only tensors of its own device type:
  under ``bf16-mixed`` the forward runs under autocast as Lightning runs it (CPU autocast's rules
  stand in for CUDA's). bitsandbytes' ``Params4bit`` cannot hold a fake tensor, so the 4-bit weights
  stay on meta, with meta quantization states (:func:`attach_meta_quant_states`), and get a fake
  stand-in when an operator reads them; bitsandbytes' 4-bit matmul runs its own code (its operators
  have fake kernels).
- **The same step.** :func:`training_loss` is the loss :class:`mmpeft.module.MMPeftModule` trains
  on (``routed`` + ``lm_losses`` with the chunked LM head + the weighted routing losses), on the
  model :func:`mmpeft.memory.meta_model` builds as ``load_backbone`` loads it (4-bit layers with
  their quantization state, norms in float32, checkpointing as ``model.speed`` places it) with the
  adapters injected as training injects them, then backward and AdamW's step (its state made
  beforehand: steady state).
- **The attention kernel of the target device.** On a CPU the stand-ins get PyTorch's own choice;
  for CUDA, :func:`fused_attention` calls the kernel CUDA would pick (flash attention without a mask
  in 16-bit, memory-efficient attention otherwise), which keeps no ``(heads, length, length)``
  scores.
- **Allocations inside a kernel.** The dispatcher sees operators, not what a kernel allocates for
  itself. Two such allocations matter and are added while their operator runs (:func:`_inside_kernel`):
  bitsandbytes' 4-bit matmul for more than a few rows dequantizes the whole weight (``out x in`` in
  the compute dtype) before multiplying, and ``logsumexp`` (the chunked loss's) exponentiates a copy
  of its input. On CUDA every allocation is rounded up to the caching allocator's 512-byte blocks.

``benchmarks/memory_model.py`` compares the result with the measured peak (the CPU profiler's
memory events) over families, widths, lengths, batch sizes, image sizes, adapters, checkpointing and
precision: every row within 1% (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from bitsandbytes.functional import QuantState
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from mmpeft.adapters import AdapterGroup
from mmpeft.adapters.inject import TowerContext, tower_routing_losses
from mmpeft.adapters.routing import RoutingContext, RoutingLosses, routing_losses, weighted_sum
from mmpeft.memory import meta_model
from mmpeft.models.backbone import (
    LANGUAGE_MODEL_PATHS,
    PROJECTOR_PATHS,
    VISION_PATHS,
    Backbone,
    get_path,
    inject_model_adapters,
)
from mmpeft.objective import lm_losses, routed
from mmpeft.packing import Layout
from mmpeft.speed import Speed, apply_to_adapters

aten = torch.ops.aten
META = torch.device("meta")
CUDA_BLOCK = 512
"""PyTorch's CUDA caching allocator hands out multiples of 512 bytes (its smallest block size)."""


@dataclass
class StepLosses:
    """What one training step computes: the LM loss, each sample's mean, and the unweighted routing losses."""

    lm: torch.Tensor
    """``()`` the mean next-token loss over the batch's trained tokens."""

    samples: torch.Tensor
    """``(batch,)`` each sample's mean (detached; NaN without trained tokens)."""

    aux: dict[str, torch.Tensor]
    """Each enabled routing loss, unweighted (:func:`~mmpeft.adapters.routing.routing_losses`)."""

    total: torch.Tensor
    """``()`` what the step backpropagates: ``lm`` plus the weighted routing losses."""


def step_losses(
    model: nn.Module,
    context: RoutingContext,
    batch: dict[str, Any],
    speed: Speed,
    routing: RoutingLosses,
    towers: list[TowerContext] | tuple = (),
) -> StepLosses:
    """The losses of a training step over ``batch`` (padded or packed), as :meth:`MMPeftModule.training_step` logs and
    backpropagates them; ``towers``: the vision and projector groups' contexts, whose routing losses count only
    where their group asks (``routing_losses: true``)."""
    with routed(context, batch):
        lm, samples = lm_losses(model, batch["inputs"], batch["labels"], speed.loss_chunk, Layout.of(batch))
        aux = tower_routing_losses(list(towers), routing, routing_losses(context, routing))
    extra = weighted_sum(aux, routing)
    return StepLosses(lm, samples, aux, lm if extra is None else lm + extra)


def training_loss(
    model: nn.Module, context: RoutingContext, batch: dict[str, Any], speed: Speed, routing: RoutingLosses
) -> torch.Tensor:
    """The loss a training step backpropagates (:func:`step_losses`)."""
    return step_losses(model, context, batch, speed, routing).total


# -- counting: every storage an operator creates, until it is freed --------------------------------


class StepMemory(TorchDispatchMode):
    """Live bytes of the storages created while the mode is on, their peak, and at the peak where they came from.

    ``known`` tensors (weights, the batch) exist before: their storages are never counted, nor are views of them.
    ``scope`` names what is running (set by :func:`scopes`); the breakdown at the peak is by scope.
    """

    def __init__(self, fake_mode: FakeTensorMode, known: Iterable[torch.Tensor] = (), block: int = 1) -> None:
        super().__init__()
        self.block = block
        """Allocation granularity: CUDA's caching allocator rounds every block up to 512 bytes."""
        self.live = 0
        self.peak = 0
        self.scope = "other"
        self.at_peak: dict[str, int] = {}
        self._sizes: dict[int, tuple[int, str]] = {}
        """Counted storages alive: key -> (bytes, scope)."""
        self._seen: dict[int, Any] = {}
        """Every storage met, counted or not (its weak reference, or None for one that is never counted)."""
        self._mirrors: dict[int, torch.Tensor] = {}
        """Fake CPU stand-ins of meta tensors, one per tensor, kept for the run."""
        self.fake_mode = fake_mode
        for tensor in known:
            self._seen.setdefault(_storage_key(tensor), None)

    # the bookkeeping
    def _created(self, out: Any) -> None:
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self._seen:
                continue
            size = -(-storage.nbytes() // self.block) * self.block
            self._seen[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))
            self._sizes[key] = (size, self.scope)
            self.live += size
            self._note_peak(0)

    def _freed(self, key: int) -> None:
        self._seen.pop(key, None)
        size, _ = self._sizes.pop(key, (0, ""))
        self.live -= size

    def _note_peak(self, transient: int, scope: str = "") -> None:
        if self.live + transient > self.peak:
            self.peak = self.live + transient
            at: dict[str, int] = {}
            for size, where in self._sizes.values():
                at[where] = at.get(where, 0) + size
            if transient:
                at[scope] = at.get(scope, 0) + transient
            self.at_peak = at

    def _on_device(self, value: Any) -> Any:
        """A meta tensor (a 4-bit weight, its quantization state) as a fake CPU tensor of the same size: its
        stand-in, not an allocation. Real tensors are left to the fake tensor mode, which makes the same stand-ins."""
        if not isinstance(value, torch.Tensor) or value.device.type != "meta":
            return value
        mirror = self._mirrors.get(id(value))
        if mirror is None:
            with self.fake_mode:
                mirror = torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device="cpu")
            self._mirrors[id(value)] = mirror
            self._mirrors[-id(value)] = value  # keeps the id from being reused while the mirror stands for it
            self._seen.setdefault(_storage_key(mirror), None)
        return mirror

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and kwargs.get("device") is not None:
            # One device: a move between the batch's real tensors and the model's is no copy on a GPU.
            source = args[0]
            rest = {k: v for k, v in kwargs.items() if k != "device" and v is not None}
            if rest.get("dtype", source.dtype) == source.dtype and set(rest) <= {"dtype", "layout"}:
                return source
            kwargs = {k: v for k, v in kwargs.items() if k != "device"}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if any(not _is_real(t) for t in tensors):
            if func in _INDEXING and any(i is not None and i.dtype == torch.bool and _is_real(i) for i in args[1]):
                # A real boolean mask indexing a stand-in: its integer positions (the output's size needs them).
                positions = []
                for index in args[1]:
                    is_mask = index is not None and index.dtype == torch.bool and _is_real(index)
                    positions.extend(index.nonzero().unbind(1) if is_mask else [index])
                args = (args[0], positions, *args[2:])
            args, kwargs = tree_map(self._on_device, (args, kwargs))
        out = func(*args, **kwargs)
        self._created(out)
        transient = _inside_kernel(func, args)
        if transient:
            self._note_peak(transient, self.scope)
        return out


def _is_real(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "meta" and not isinstance(tensor, FakeTensor)


_INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default)


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _inside_kernel(func: Any, args: tuple) -> int:
    """Bytes a kernel allocates for itself beside its output, freed before it returns (the dispatcher sees neither):

    - bitsandbytes' 4-bit matmul dequantizes its weight (``out x in`` in the input's dtype, and a nested absmax in
      float32) before multiplying;
    - ``logsumexp`` (ATen's, on a CPU and on CUDA) takes ``exp(x - max)`` of its whole input before summing it.
    """
    if func is aten.logsumexp.default:
        return args[0].numel() * args[0].element_size()
    if getattr(func, "_schema", None) is None or func._schema.name != "bitsandbytes::gemm_4bit":
        return 0
    a, shape, blocksize = args[0], args[2], args[4]
    values = math.prod(shape)
    nested = 4 * math.ceil(values / blocksize) if len(args) > 7 and args[7] is not None else 0
    return values * a.element_size() + nested


# -- the attention kernel the target device picks ---------------------------------------------------

_SDPA = F.scaled_dot_product_attention


def _cuda_backend(q: torch.Tensor, mask: torch.Tensor | None) -> str:
    """The kernel CUDA's ``scaled_dot_product_attention`` picks: flash attention without a mask in 16-bit with a head
    size it takes, memory-efficient attention otherwise."""
    sixteen = q.dtype in (torch.float16, torch.bfloat16)
    return "flash" if mask is None and sixteen and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0 else "efficient"


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the fused kernels take it (PyTorch converts it the same way): 0 where kept, -inf elsewhere."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, torch.zeros((), dtype=dtype), torch.full((), -math.inf, dtype=dtype))


def _make_attention(device_type: str) -> Callable[..., torch.Tensor]:
    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not isinstance(query, FakeTensor) or device_type == "cpu":  # the stand-ins are CPU tensors: PyTorch's pick
            return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        backend = _cuda_backend(query, attn_mask)
        if key.shape[-3] != query.shape[-3]:  # grouped-query attention: the kernels read the shared heads in place
            groups = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(groups, dim=-3) if backend == "efficient" else _expanded(key, groups)
            value = value.repeat_interleave(groups, dim=-3) if backend == "efficient" else _expanded(value, groups)
        mask = _float_mask(attn_mask, query.dtype)
        if backend == "flash":
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
        if mask is not None:
            mask = mask.expand(*query.shape[:-2], query.shape[-2], key.shape[-2])
        grad = query.requires_grad or key.requires_grad or value.requires_grad
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, mask, grad, dropout_p, is_causal, scale=scale
        )[0]

    return attention


def _expanded(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``(batch, kv_heads, length, dim)`` as ``(batch, kv_heads * groups, length, dim)`` without a copy (the meta
    kernels check shapes only)."""
    b, h, n, d = t.shape
    return t.as_strided((b, h * groups, n, d), (t.stride(0), 0, t.stride(2), t.stride(3)))


@contextlib.contextmanager
def fused_attention(device_type: str) -> Iterator[None]:
    """While on, ``F.scaled_dot_product_attention`` on the stand-ins runs the kernel ``device_type`` would pick.

    A function replaced for the run, not a torch function mode: checkpointed layers recompute in backward, where
    no torch function mode is active.
    """
    F.scaled_dot_product_attention = _make_attention(device_type)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


# -- where the bytes come from ----------------------------------------------------------------------

SCOPES = (
    ("vision tower", VISION_PATHS),
    ("projector", PROJECTOR_PATHS),
    ("language model", LANGUAGE_MODEL_PATHS),
)


@contextlib.contextmanager
def scopes(model: nn.Module, counter: StepMemory) -> Iterator[None]:
    """Name what runs in ``counter.scope``: the vision tower, the projector, the language model (forward and its
    recomputation in backward); what runs outside them is named by the caller (``loss``, ``backward``,
    ``optimizer``)."""
    handles = []
    for name, paths in SCOPES:
        found = get_path(model, paths, name, required=False)
        if found is None:
            continue
        module = found[1]

        def enter(_module, _args, name=name):
            stack.append(counter.scope)
            counter.scope = name

        def leave(_module, _args, _out):
            counter.scope = stack.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    stack: list[str] = []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- the meta model made runnable --------------------------------------------------------------------


def attach_meta_quant_states(model: nn.Module, double_quant: bool) -> None:
    """Give every 4-bit layer on the meta device the quantization state bitsandbytes would have made (meta tensors of
    the real sizes), so its matmul runs bitsandbytes' own code."""
    for layer in model.modules():
        if not isinstance(layer, bnb.nn.Linear4bit) or layer.weight.quant_state is not None:
            continue
        values = layer.in_features * layer.out_features
        blocks = math.ceil(values / layer.weight.blocksize)
        shape = torch.Size([layer.out_features, layer.in_features])
        dtype = layer.compute_dtype or torch.float32
        code = torch.empty(16, device=META)
        if double_quant:
            nested = QuantState(
                absmax=torch.empty(math.ceil(blocks / 256), device=META),
                code=torch.empty(256, device=META),
                blocksize=256,
                dtype=torch.float32,
            )
            state = QuantState(
                absmax=torch.empty(blocks, dtype=torch.uint8, device=META),
                shape=shape,
                code=code,
                blocksize=layer.weight.blocksize,
                quant_type=layer.weight.quant_type,
                dtype=dtype,
                offset=torch.empty((), device=META),
                state2=nested,
            )
        else:
            state = QuantState(
                absmax=torch.empty(blocks, device=META),
                shape=shape,
                code=code,
                blocksize=layer.weight.blocksize,
                quant_type=layer.weight.quant_type,
                dtype=dtype,
            )
        layer.weight.quant_state = state


def fake_tensors(model: nn.Module, mode: FakeTensorMode) -> None:
    """Replace the meta parameters and buffers of ``model`` by fake CPU tensors of the same sizes (``mode``'s).

    Fake CPU tensors, not meta ones, because autocast casts only tensors of its device type: under ``bf16-mixed``
    the step must run as autocast runs it. bitsandbytes' ``Params4bit`` cannot hold a fake tensor: the 4-bit
    weights stay on meta and :class:`StepMemory` gives each its stand-in when an operator reads it.
    """
    swapped: dict[int, torch.Tensor] = {}

    def fake(tensor: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(tensor) not in swapped:
            with mode:
                out = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="cpu")
            swapped[id(tensor)] = nn.Parameter(out, requires_grad=tensor.requires_grad) if parameter else out
        return swapped[id(tensor)]

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta" and not isinstance(param, bnb.nn.Params4bit):
                module._parameters[name] = fake(param, parameter=True)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[name] = fake(buffer, parameter=False)


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state is not None:
            state = layer.weight.quant_state
            nested = state.state2
            for tensor in (state.absmax, state.code, state.offset, *((nested.absmax, nested.code) if nested else ())):
                if isinstance(tensor, torch.Tensor):
                    out.append(tensor)
    return out


# -- one step --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPeak:
    """What one training step adds to memory at its peak, above what training holds before it."""

    bytes: int
    """The peak: live bytes of everything the step created, at the worst moment (forward, backward or the
    optimizer's step)."""
    by_scope: dict[str, int]
    """Those bytes by what created them: ``vision tower``, ``projector``, ``language model``, ``loss`` (the LM
    head's chunks and the cross-entropy), ``backward``, ``optimizer``."""


def step_peak(
    backbone: Backbone,
    adapters: list[AdapterGroup],
    batch: dict[str, Any],
    device_type: str = "cuda",
    speed: Speed | None = None,
    routing: RoutingLosses | None = None,
    accumulating: bool = False,
    optimizer: str = "adamw",
    autocast: torch.dtype | None = None,
) -> StepPeak:
    """Run one training step of ``batch`` with stand-ins for the model's tensors and count what it allocates.

    ``batch`` is a collated batch (``inputs``, ``labels``, ``task_ids``) of real CPU tensors, as the data module
    yields it. ``accumulating``: gradients from earlier micro-batches are there (``accumulate_grad_batches > 1``),
    so backward adds into them. ``optimizer``: ``adamw`` runs PyTorch's AdamW step on the stand-in gradients (its
    temporaries count); bitsandbytes' 8-bit optimizers update in one fused kernel (no temporaries). ``autocast``:
    the dtype of mixed precision (``bf16-mixed``: ``torch.bfloat16``), under which the forward runs as Lightning runs
    it; CPU autocast's rules stand in for CUDA's (the same casts for matrix products and the losses).
    """

    speed = speed or Speed()
    routing = routing or RoutingLosses()
    model = meta_model(backbone, device_type, speed)
    context = RoutingContext()
    with torch.device(META):  # the adapters too: sizes only, no initialisation
        inject_model_adapters(model, adapters, context)
    apply_to_adapters(model, speed)
    attach_meta_quant_states(model, backbone.double_quant and backbone.quantization is not None)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_tensors(model, fake_mode)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Steady state: the optimizer's state exists (mmpeft.memory counts it), and with accumulation the gradients do.
    for param in trainable:
        param.grad = torch.zeros_like(param)
    step = torch.optim.AdamW(trainable, lr=1e-4, foreach=device_type == "cuda") if optimizer == "adamw" else None
    if step is not None:
        step.step()
    if not accumulating:
        for param in trainable:
            param.grad = None
    tensors = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
    known = [*model.parameters(), *model.buffers(), *_state_tensors(model), *tensors]
    known += [p.grad for p in trainable if p.grad is not None]
    if step is not None:
        known += [t for state in step.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    counter = StepMemory(fake_mode, known, block=CUDA_BLOCK if device_type == "cuda" else 1)
    with fused_attention(device_type), scopes(model, counter), counter:
        counter.scope = "loss"
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = training_loss(model, context, batch, speed, routing)
        counter.scope = "backward"
        loss.backward()
        del loss
        if step is not None:
            counter.scope = "optimizer"
            step.step()
    return StepPeak(counter.peak, dict(counter.at_peak))
