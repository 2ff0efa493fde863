"""Padding-free packed batches: a batch's samples laid end to end in a few rows (``data.packing``).

A padded batch is ``(batch, longest)``: every shorter sample is filled up to the longest one, and
multimodal samples differ wildly in length (an image is 64 to thousands of tokens). A packed batch
holds the same samples, whole and in the same order of their tokens, in ``rows`` rows of at most
``capacity`` tokens each (:func:`plan_rows`), so only the shorter rows' ends are padding.

What keeps a packed batch exact (every sample's loss and every gradient as in the padded batch):

- **Positions restart at 0 for every sample**, and the batch carries no 2-D ``attention_mask``:
  transformers then reads the boundaries from the position ids (``find_packed_sequence_indices``)
  and keeps attention inside each sample, with a block-diagonal mask under sdpa and eager, and with
  flash-attention's variable-length kernels on CUDA. The models' own mask rules still apply inside
  a sample (Gemma 3's bidirectional image tokens, PaliGemma's prefix).
- **Multimodal RoPE** (the Qwen-VL family): each sample's 3-D positions come from the model's own
  ``get_rope_index`` on that sample alone (:func:`model_positions`), and the row gets the 4-row form
  ``(text, t, h, w)`` these models accept for packed input; the text row marks the boundaries.
- **Labels**: a sample's first token is never predicted in a padded batch; in a row its label is
  ignored too, so the token before it (the previous sample's last) predicts nothing.
- **Routers see samples**: the :class:`Layout` maps every position to its sample. Instance routers
  pool each sample's prompt, the routing losses and statistics count samples and their tokens
  exactly as in the padded batch (:meth:`Layout.unpack` gives them the padded layout), and
  per-sample losses and per-task metrics come out per sample.

Image inputs are the padded batch's, in sample order: every family but Mllama scatters image
features into image-token positions in token order, which packing keeps. Mllama's cross-attention
reads the images of its own row: each sample brings the padded batch's image slots (its images,
then the processor's padding images) into its row, its cross-attention mask moves to those slots,
and the key and value projections' routers work per sample through the slots' layout
(:data:`PACKED_IMAGES`); text that attends to no image, which Mllama lets attend to every vision
token of its row, is kept to its own sample's slots for the forward (:func:`packed_inputs`). So
each sample attends to exactly what it attends to padded.

Gemma 3 (:data:`OWN_MASKS`): transformers 5.25 gets the mask of its sliding-window layers wrong for
packed rows (measured; tests/test_packing.py keeps the measurement, so a transformers that fixes it
shows up as a failing test), so its masks are built per sample by the model's own
``create_masks_for_generate`` and laid block-diagonally in the rows (:func:`sample_masks`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn

from mmpeft.errors import ConfigError

PACKING = "packing"
"""Where a packed batch keeps its :class:`Layout` tensors (``batch["packing"]``)."""

PACKED_IMAGES = "packed_images"
"""Where a packed batch whose cross-attention reads each row's images (Mllama) keeps the :class:`Layout` of its image
slots: each sample's slots in its row."""


def plan_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """The samples (indices into ``lengths``) of each row: whole samples, as few rows as fit, balanced.

    The number of rows starts at ``ceil(total / capacity)`` (no fewer can hold the tokens) and grows
    until longest-first placement into the least-filled row keeps every row within ``capacity``;
    balancing the rows keeps the longest row, and so the padding of the others, small. A sample
    longer than ``capacity`` gets a row of its own. Within a row samples keep their batch order, and
    rows are ordered by their first sample, so the plan is a deterministic function of ``lengths``.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # longest first, ties by index
    alone = [i for i in order if lengths[i] >= capacity]  # rows of their own
    rest = [i for i in order if lengths[i] < capacity]
    rows: list[list[int]] = [[i] for i in alone]
    if rest:
        count = -(-sum(lengths[i] for i in rest) // capacity)  # ceil
        while True:
            fill, placed = [0] * count, [[] for _ in range(count)]
            for i in rest:
                row = min(range(count), key=lambda r: (fill[r], r))
                fill[row] += lengths[i]
                placed[row].append(i)
            if max(fill) <= capacity:
                break
            count += 1
        rows += placed
    return sorted((sorted(row) for row in rows if row), key=lambda row: row[0])


@dataclass
class Layout:
    """Where each sample of a packed batch lies: ``n`` samples in ``rows`` rows of ``length`` positions.

    Built by :func:`layout` on the data side and moved to the device with the batch (a dict of
    tensors under :data:`PACKING`); :meth:`of` reads it back.
    """

    sample: torch.Tensor
    """``(rows, length)`` long: the sample (its index in the batch) at each position; -1 on padding."""

    position: torch.Tensor
    """``(rows, length)`` long: each position's offset in its sample; the padding of a row counts from 0 as a
    sequence of its own, so transformers finds the boundaries."""

    index: torch.Tensor
    """``(n, longest)`` long: sample ``i``'s token ``j`` is at flat position ``index[i, j]`` of the rows (0 past its
    end)."""

    mask: torch.Tensor
    """``(n, longest)`` bool: ``j`` is within sample ``i`` (the padded batch's real tokens)."""

    images: Layout | None = None
    """Where cross-attention reads each row's images (Mllama): the layout of the image slots, each sample's
    slots in its row (:data:`PACKED_IMAGES`)."""

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"sample": self.sample, "position": self.position, "index": self.index, "mask": self.mask}

    @classmethod
    def of(cls, batch: dict[str, Any], key: str = PACKING) -> Layout | None:
        """The layout of a collated batch (its image slots' with ``key`` :data:`PACKED_IMAGES`), ``None`` when it is
        padded."""
        packed = batch.get(key)
        if packed is None:
            return None
        return cls(**packed, images=cls.of(batch, PACKED_IMAGES) if key == PACKING else None)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, length)``."""
        return tuple(self.sample.shape)  # type: ignore[return-value]

    @property
    def samples(self) -> int:
        return self.mask.shape[0]

    def unpack(self, x: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """``x`` ``(rows, length, ...)`` in the padded layout ``(n, longest, ...)``, ``fill`` past each sample's
        end."""
        flat = x.reshape(-1, *x.shape[2:])  # (rows * length, ...)
        out = flat[self.index.to(x.device)]  # (n, longest, ...)
        mask = self.mask.to(x.device).reshape(*self.mask.shape, *([1] * (x.dim() - 2)))
        return torch.where(mask, out, torch.as_tensor(fill, dtype=x.dtype, device=x.device))

    def pack(self, x: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """``x`` ``(n, longest, ...)`` in the padded layout back in the rows ``(rows, length, ...)``, ``fill`` on
        padding (the inverse of :meth:`unpack`, differentiable)."""
        mask = self.mask.to(x.device)
        rows, length = self.shape
        out = x.new_full((rows * length, *x.shape[2:]), fill)
        out = out.index_put((self.index.to(x.device)[mask],), x[mask])  # (rows * length, ...)
        return out.reshape(rows, length, *x.shape[2:])

    def spread(self, per_sample: torch.Tensor) -> torch.Tensor:
        """``per_sample`` ``(n, ...)`` at every position of its sample: ``(rows, length, ...)`` (padding takes the
        first sample's)."""
        return per_sample[self.sample.to(per_sample.device).clamp(min=0)]

    def repeat(self, k: int) -> Layout:
        """The layout with every position made ``k`` consecutive ones (an image slot's ``k`` vision tokens)."""
        if k == 1:
            return self
        steps = torch.arange(k, device=self.index.device)
        return Layout(
            self.sample.repeat_interleave(k, dim=1),
            (self.position.unsqueeze(-1) * k + steps).flatten(1),
            (self.index.unsqueeze(-1) * k + steps).flatten(1),
            self.mask.repeat_interleave(k, dim=1),
        )

    def real(self) -> torch.Tensor:
        """``(rows, length)`` bool: the positions holding a sample's token."""
        return self.sample >= 0


def packed_order(lengths: list[int], capacity: int) -> tuple[list[int], list[list[int]], Layout]:
    """The order samples of ``lengths`` take in their rows (:func:`plan_rows` with ``capacity``), the rows as
    indices into that order, and the :class:`Layout` of the samples in that order."""
    plan = plan_rows(lengths, capacity)
    order = [i for row in plan for i in row]
    starts = list(accumulate((len(row) for row in plan), initial=0))
    rows = [list(range(a, b)) for a, b in zip(starts, starts[1:])]  # the same rows, in the new order
    return order, rows, layout(rows, [lengths[i] for i in order])


def layout(rows: list[list[int]], lengths: list[int]) -> Layout:
    """The :class:`Layout` of samples of ``lengths`` placed in ``rows`` (each a list of sample indices, in the
    order their tokens go)."""
    n, longest = len(lengths), max(lengths, default=0)
    width = max((sum(lengths[i] for i in row) for row in rows), default=0)
    sample = torch.full((len(rows), width), -1, dtype=torch.long)
    position = torch.zeros((len(rows), width), dtype=torch.long)
    index = torch.zeros((n, longest), dtype=torch.long)
    mask = torch.arange(longest).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # (n, longest)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            span = slice(start, start + lengths[i])
            sample[r, span] = i
            position[r, span] = torch.arange(lengths[i])
            index[i, : lengths[i]] = r * width + torch.arange(start, start + lengths[i])
            start += lengths[i]
        position[r, start:] = torch.arange(width - start)  # the padding: a sequence of its own
    return Layout(sample, position, index, mask)


# -- positions: the model's own rules, per sample --------------------------------------------------

OWN_MASKS = {
    "gemma3": "transformers builds its sliding-window layers' mask with the image blocks as an or-mask, and for "
    "packed rows it looks that mask up at each token's position within its sample instead of within the row "
    "(masking_utils.remap_positions_for_packed_sequence), so tokens would attend to the wrong positions "
    "(measured in tests/test_packing.py)",
}
"""Model types whose masks transformers gets wrong for packed rows, and why: their attention masks are built per
sample by the model's own ``create_masks_for_generate`` and laid block-diagonally in the rows (:func:`sample_masks`).
"""


_found: WeakKeyDictionary[nn.Module, dict[str, nn.Module | None]] = WeakKeyDictionary()


def first_module(model: nn.Module, key: str, test: Callable[[nn.Module], bool]) -> nn.Module | None:
    """The first module of ``model`` (outermost first) that passes ``test``, looked up once per model and ``key``: it
    is asked at every packed step."""
    found = _found.setdefault(model, {})
    if key not in found:
        found[key] = next((m for m in model.modules() if test(m)), None)
    return found[key]


def module_with(model: nn.Module, method: str) -> nn.Module | None:
    """The first module of ``model`` with a callable ``method``."""
    return first_module(model, method, lambda m: callable(getattr(m, method, None)))


def rope_index_owner(model: nn.Module) -> nn.Module | None:
    """The module whose ``get_rope_index`` computes the model's multimodal (3-D) RoPE positions, if it has one."""
    return module_with(model, "get_rope_index")


MASKED_IMPLEMENTATIONS = ("sdpa", "eager")
"""Attention implementations that take the dense masks :func:`sample_masks` builds. The flash-attention ones read the
boundaries from the position ids and honour no mask function in either layout, so they need none."""


def sample_masks(model: nn.Module, inputs: dict[str, torch.Tensor], packed: Layout) -> dict[str, torch.Tensor] | None:
    """The attention masks of ``model``'s layer types for a packed batch, each ``(rows, 1, length, length)``: every
    sample's own mask, as the model's ``create_masks_for_generate`` builds it for the sample in the padded layout
    (its token types included), on the row's diagonal; a row's padding attends causally to itself (a sequence of its
    own, as transformers treats it); nothing crosses a boundary. ``None`` under flash-attention."""
    config = model.config
    implementation = config.get_text_config()._attn_implementation
    if implementation not in MASKED_IMPLEMENTATIONS:
        if implementation and "flash" in implementation:
            return None
        raise ConfigError(
            f"data.packing: {config.model_type} packs under attention implementations "
            f"{', '.join(MASKED_IMPLEMENTATIONS)} or flash-attention, not {implementation!r}"
        )
    builder = module_with(model, "create_masks_for_generate")
    device = inputs["input_ids"].device
    dtype = model.get_input_embeddings().weight.dtype
    n, longest = packed.mask.shape
    mask = packed.mask.to(device)
    extra = {"token_type_ids": packed.unpack(inputs["token_type_ids"])} if "token_type_ids" in inputs else {}
    masks = builder.create_masks_for_generate(
        config=config,
        inputs_embeds=torch.empty((n, longest, 0), dtype=dtype, device=device),  # read for its shape, dtype, device
        attention_mask=mask.long(),
        cache=None,
        position_ids=torch.arange(longest, device=device).expand(n, -1),
        is_first_iteration=True,
        **extra,
    )
    if not isinstance(masks, dict):
        masks = {"full_attention": masks}
    return {kind: _block_diagonal(value, packed, mask, dtype) for kind, value in masks.items()}


def _block_diagonal(per_sample: torch.Tensor | None, packed: Layout, mask: torch.Tensor, dtype: torch.dtype):
    """``per_sample`` ``(n, 1, longest, longest)`` masks (``None``: causal) laid in the rows: ``(rows, 1, length,
    length)``, bool or additive float like the model's own."""
    rows, length = packed.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if per_sample is None:
        longest = mask.shape[1]
        per_sample = (causal[:longest, :longest] & mask[:, None, :]).unsqueeze(1)  # (n, 1, longest, longest)
    allowed = per_sample if per_sample.dtype == torch.bool else per_sample == 0  # additive masks: 0 where attended
    out = torch.zeros(rows, 1, length, length, dtype=torch.bool, device=mask.device)
    for r, end in enumerate((packed.sample >= 0).sum(1).tolist()):  # a row's padding: a causal sequence of its own
        out[r, 0, end:, end:] = causal[: length - end, : length - end]
    for i, (flat, size) in enumerate(zip(packed.index[:, 0].tolist(), mask.sum(1).tolist())):
        r, start = divmod(flat, length)
        out[r, 0, start : start + size, start : start + size] = allowed[i, 0, :size, :size]
    if per_sample.dtype == torch.bool:
        return out
    return torch.zeros(out.shape, dtype=dtype, device=out.device).masked_fill(~out, torch.finfo(dtype).min)


def model_positions(model: nn.Module, inputs: dict[str, torch.Tensor], packed: Layout) -> torch.Tensor:
    """The ``position_ids`` of a packed batch for ``model``.

    ``(rows, length)`` offsets within each sample for 1-D RoPE. For multimodal RoPE, the model's
    ``get_rope_index`` runs on the samples in the padded layout (each sample as it would be alone,
    its images' grids in order) and the result is packed into ``(4, rows, length)``: the text
    positions first, which these models read the sample boundaries from, then ``(t, h, w)``.
    """
    text = packed.position.to(inputs["input_ids"].device)  # (rows, length)
    owner = rope_index_owner(model)
    if owner is None:
        return text
    ids = packed.unpack(inputs["input_ids"])  # (n, longest)
    kwargs = {name: inputs[name] for name in ("image_grid_thw", "video_grid_thw") if inputs.get(name) is not None}
    if "mm_token_type_ids" in inputs:
        kwargs["mm_token_type_ids"] = packed.unpack(inputs["mm_token_type_ids"])
    mask = packed.mask.to(ids.device).long()  # (n, longest)
    rope, _ = owner.get_rope_index(ids, attention_mask=mask, **kwargs)  # (3, n, longest)
    spatial = packed.pack(rope.permute(1, 2, 0)).permute(2, 0, 1)  # (3, rows, length)
    return torch.cat([text.unsqueeze(0), spatial.to(text.dtype)])  # (4, rows, length)


def model_inputs(model: nn.Module, inputs: dict[str, torch.Tensor], packed: Layout | None) -> dict[str, torch.Tensor]:
    """``inputs`` as ``model`` takes them: a packed batch gains its ``position_ids`` (:func:`model_positions`), and for
    the families of :data:`OWN_MASKS` its attention masks (:func:`sample_masks`)."""
    if packed is None:
        return inputs
    out = {**inputs, "position_ids": model_positions(model, inputs, packed)}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in OWN_MASKS and (masks := sample_masks(model, inputs, packed)) is not None:
        out["attention_mask"] = masks
    return out


CROSS_ATTENTION_KWARGS = {"cross_attention_mask", "full_text_row_masked_out_mask"}


def cross_attention_reader(model: nn.Module) -> nn.Module | None:
    """The outermost module of ``model`` that takes a prepared cross-attention mask with its fully-masked-rows mask
    (Mllama's text model: ``cross_attention_mask`` and ``full_text_row_masked_out_mask``), if any."""
    return first_module(
        model, "cross-attention", lambda m: CROSS_ATTENTION_KWARGS <= set(inspect.signature(m.forward).parameters)
    )


@contextmanager
def packed_inputs(
    model: nn.Module, inputs: dict[str, torch.Tensor], packed: Layout | None
) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`model_inputs`, for a forward of ``model`` inside the block.

    Where cross-attention reads each row's images (``packed.images``): a text token that attends to no image (text
    before the first image, a sample without one) has its cross-attention row fully masked, and Mllama then lets it
    attend to every vision token of its row, zeroing only the MLP's output (``_prepare_cross_attention_mask``).
    Padded, that is every vision token of its own sample; packed, it would be other samples'. For the block's
    forward, those tokens' rows are masked to their own sample's image slots, so they attend to what they attend
    to padded.
    """
    out = model_inputs(model, inputs, packed)
    reader = None if packed is None or packed.images is None else cross_attention_reader(model)
    if reader is None:
        yield out
        return

    def own_images(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask, masked_out = kwargs.get("cross_attention_mask"), kwargs.get("full_text_row_masked_out_mask")
        if mask is None or masked_out is None:
            return args, kwargs
        slots = packed.images
        vision = slots.repeat(mask.shape[-1] // slots.shape[1]).sample.to(mask.device)  # (rows, V)
        own = packed.sample.to(mask.device).unsqueeze(-1) == vision.unsqueeze(1)  # (rows, L, V)
        other = ~own.unsqueeze(1) & (masked_out == 0)  # (rows, 1, L, V)
        return args, {**kwargs, "cross_attention_mask": mask.masked_fill(other, torch.finfo(mask.dtype).min)}

    handle = reader.register_forward_pre_hook(own_images, with_kwargs=True)
    try:
        yield out
    finally:
        handle.remove()


def pack_padded(
    batch: dict[str, Any],
    lengths: list[int],
    pack_length: int | None = None,
    images: list[int] | None = None,
    ignore_index: int = -100,
) -> dict[str, Any]:
    """A right-padded ``batch`` as ``data.packing`` collates the same samples (``ChatEncoder._packed``).

    For benchmarks and checks that build padded batches themselves. The rows come from
    :func:`packed_order` (capacity ``pack_length``, or the batch's longest sample; ``lengths`` are
    the samples' real tokens), the samples are reordered as the rows hold them, and each per-token
    tensor ``(batch, seq)`` goes into the rows with the :class:`Layout`'s ``pack``; the attention
    mask is dropped (the boundaries come from the position ids), each sample's first label is
    ignored (the previous sample's last token must predict nothing), and the image inputs follow
    the new sample order: ``images`` gives each sample's number of images (default one each), an
    input with a row per image (LLaVA's ``pixel_values`` ``(images, 3, H, W)``, Qwen2-VL's
    ``image_grid_thw`` ``(images, 3)``) moves by image, and with ``image_grid_thw`` an input with a
    row per patch (Qwen2-VL's ``pixel_values`` ``(patches, d)``, each image's ``t * h * w`` patches
    contiguous) moves by patch. Returns ``inputs``, ``labels`` (``ignore_index`` on padding),
    ``task_ids`` (if ``batch`` has them) and ``lengths`` in the new order, and the layout under
    :data:`PACKING`, as the collated batch holds it.

    Not for inputs that run over the images per token (Mllama's ``cross_attention_mask``: the
    encoder lays those in image slots) nor for videos: a ``ValueError`` names the input.
    """
    ids = batch["inputs"]["input_ids"]  # (batch, seq)
    n = ids.shape[0]
    if len(lengths) != n:
        raise ValueError(f"pack_padded: {len(lengths)} lengths for a batch of {n} samples")
    per_sample = [1] * n if images is None else list(images)
    if len(per_sample) != n:
        raise ValueError(f"pack_padded: {len(per_sample)} image counts (images) for a batch of {n} samples")
    order, _, packed = packed_order(lengths, pack_length or max(lengths))
    longest = max(lengths)
    first = list(accumulate(per_sample, initial=0))  # sample i's images: first[i] to first[i + 1]
    image_order = torch.tensor([j for i in order for j in range(first[i], first[i + 1])], dtype=torch.long)
    patch_order = None
    grid = batch["inputs"].get("image_grid_thw")
    if grid is not None:
        if grid.shape[0] != first[-1]:
            raise ValueError(
                f"pack_padded: image_grid_thw has {grid.shape[0]} images, the samples {first[-1]} (images)"
            )
        start = list(accumulate(grid.prod(-1).tolist(), initial=0))  # image j's patches: start[j] to start[j + 1]
        patch_order = torch.tensor(
            [p for j in image_order.tolist() for p in range(start[j], start[j + 1])], dtype=torch.long
        )
    inputs = {}
    for key, value in batch["inputs"].items():
        if key == "attention_mask":
            continue
        if value.shape[:2] == ids.shape:  # per token
            if value.dim() > 2:
                raise ValueError(
                    f"pack_padded: per-token input {key!r} of shape {tuple(value.shape)} runs over the images; "
                    "only the encoder's collate packs it (image slots)"
                )
            inputs[key] = packed.pack(value[order][:, :longest], 0)  # (batch, longest) -> (rows, width)
        elif key.startswith("video") or key.endswith("_videos"):
            raise ValueError(f"pack_padded: cannot move the video input {key!r} with its samples")
        elif value.shape[0] == len(image_order):  # per image: (images, ...)
            inputs[key] = value[image_order.to(value.device)]
        elif patch_order is not None and value.shape[0] == len(patch_order):  # per patch: (patches, d)
            inputs[key] = value[patch_order.to(value.device)]
        else:
            raise ValueError(
                f"pack_padded: cannot reorder {key!r} of shape {tuple(value.shape)} by sample "
                f"({n} samples, {len(image_order)} images)"
            )
    labels = batch["labels"][order][:, :longest].clone()  # (batch, longest)
    labels[:, 0] = ignore_index
    out = {
        "inputs": inputs,
        "labels": packed.pack(labels, ignore_index),  # (rows, width)
        "lengths": [lengths[i] for i in order],
        PACKING: packed.to_dict(),
    }
    if batch.get("task_ids") is not None:
        out["task_ids"] = batch["task_ids"][order]
    return out
