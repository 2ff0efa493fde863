"""One-shot GPU validation: 7B-shaped LLaVA-1.5 and Qwen2-VL trained in NF4 with LoRA, AsymLoRA and PEFT's LoRA.

    python benchmarks/gpu_check.py [--cpu] [--steps N] [--seq T] [--batch B] [--families llava,qwen2_vl]
                                   [--rank R] [--heads N] [--no-packing] [--packing-batch B] [--packing-seq T]
                                   [--packing-steps N] [--packing-attn A,...] [--out FILE]

Needs no download. For each family the script builds a model with the published checkpoint's
shapes (the values are written below in ``SHAPES``, each citing the hub repository whose
``config.json`` they come from) and random weights:

- the model is instantiated with its parameters on the meta device (``accelerate.init_empty_weights``;
  buffers such as rotary frequencies are computed for real) and transformers' own bitsandbytes
  quantizer, given mmpeft's ``quantization_config``, swaps in the ``Linear4bit`` layers there, so the
  same layers are 4-bit as after ``from_pretrained`` (every linear layer but the LM head, the vision
  tower's included). Then each of them, one at a time, gets a random ``(out, in)`` weight on the
  target device that bitsandbytes quantizes at once to NF4 with double quantization (``Params4bit``).
  No full 16-bit copy of the model ever exists: the largest transient is one linear layer's weight.
  The parameters left (embeddings, LM head, norms, convolutions, biases) are materialised in the
  compute dtype (bfloat16 on CUDA, float32 on a CPU), as ``from_pretrained`` loads them;
- the weights come from one seeded generator, so every build of a family is the same model.

Batches are built as the real encoder lays them out, without a tokenizer: a short text prompt,
the family's image tokens (LLaVA-1.5: 576 for a 336 px image, CLIP ViT-L/14 without its CLS;
Qwen2-VL: 576 for a 672 px image, 14 px patches merged 2x2) with random pixel values, then
random text; the last eighth of each sample is the labelled answer. Token ids are random ids of
the published vocabulary (special ids excluded) and the special ids are the published ones, so
the embedding and the LM head have their real size (the LM head's logits are a large part of the
peak). The tiny builders' tokenizers are not used: their ids would not match a 7B vocabulary.

Per family three models are built in turn, each alone on the device (the previous one freed):

- ``lora``: mmpeft's QLoRA preparation (``prepare_for_training``: frozen base, norms in float32,
  non-reentrant checkpointing, ``model.speed`` defaults), LoRA on every linear layer of the language
  model, a step as ``MMPeftModule`` trains (``routed`` + ``lm_losses`` with the chunked LM head +
  the weighted routing losses), AdamW;
- ``asymlora``: the same with AsymLoRA (``--heads`` B heads sharing one A, token router);
- ``peft``: PEFT's usual path on the same model: ``prepare_model_for_kbit_training`` (gradient
  checkpointing as it sets it), ``get_peft_model`` with a ``LoraConfig`` of the same r, alpha and
  dropout on exactly the same linear layers, ``model(**inputs, labels=labels).loss``, as
  ``benchmarks/vs_peft.py`` does. Its ``lora_A`` are mmpeft LoRA's initial ``A``; both ``B`` start
  at zero, so both compute the base model's loss at step 0, which the script checks (relative
  difference at most 1e-4 in float32 on a CPU, 2e-2 under bfloat16 on CUDA).

Each model takes one untimed warm-up step (AdamW's state, first-call costs), then ``--steps``
timed steps. Reported per row: the training loss at step 0 (AsymLoRA's includes its weighted
routing losses; its language-model loss is the base model's too, its ``B`` heads starting at
zero), the step time (median), tokens/s (real tokens per second), the resident memory before the
steps (weights, adapters, optimizer state), the peak of the steps above it, and the total peak.
On CUDA the total is ``torch.cuda.max_memory_allocated`` over the timed steps; on a CPU the step
peak comes from torch's profiler memory events (every allocation and free of the steps, summed in
time order, as ``vs_peft.py``) and the resident bytes are counted from the tensors. The
``estimate`` column is mmpeft's planned peak for the same setup (``mmpeft.planner.plan`` from the
config alone: the static breakdown plus one step of the same batch run on the meta device, under
the same precision), and ``peak / estimate`` its ratio to the measured peak.

Packing (``data.packing``, on unless ``--no-packing``; after both families' rows, whose JSON is
written first, so that nothing of them is lost if this part breaks): per family, mmpeft's LoRA
(dropout 0, so that a step is deterministic) on a batch of ``--packing-batch`` samples (default 8)
of mixed lengths, evenly spread from a quarter of ``--packing-seq`` (default ``--seq``; at least
the prompt, the image, 16 tokens and the answer: 682 tokens at the 7B shapes) to ``--packing-seq``,
each with its image and the last eighth labelled, in a seeded order, built as above. Three layouts
of the same samples train through mmpeft's training step (``training_loss``: ``routed`` +
``lm_losses`` with the batch's ``Layout``): ``padded`` (right-padded, attention mask), ``packed``
(``pack_length`` the longest sample) and ``packed 2x`` (twice it), each built from the padded batch
by ``mmpeft.packing.pack_padded`` as ``ChatEncoder`` collates it; first under the model's default
attention (sdpa), then under each of ``--packing-attn`` (default ``flash_attention_2``: a row says
why it is skipped without the ``flash-attn`` package or CUDA), switched with
``set_attn_implementation`` as ``vs_peft.py --attn`` does. Each row starts from the same adapters
with a fresh AdamW, takes a warm-up step and ``--packing-steps`` timed steps (default 2; 1 with
``--cpu``). Checked: every packed row's warm-up loss and adapter gradients (relative L2 difference)
against the padded row's under the same attention: the loss within 1e-4 in float32 on a CPU and
2e-2 under bfloat16 on CUDA, the gradients within 1e-4 and ``GRAD_TOLERANCE_BF16`` (a guess until
a GPU run). The gradients are the check with teeth: with random weights the loss hardly moves
when samples see each other (relative 2e-7 on the CPU-sized LLaVA), the gradients move by 0.36 to
0.66. A control row shows it on every run: ``packed 2x`` with positions counting along the row, so
transformers finds no boundary and samples attend to the ones before them; its gradients must
differ (a warning if they do not: the check would then be blind). Reported per row: rows x width,
padded positions of all positions, the first loss and both relative differences, step time
(median), real tokens per second, resident, step peak and total memory as above, and time and
peak as a ratio to the padded row. A row that raises (an out-of-memory, a crash in a kernel) gets
its traceback printed and its status recorded, and the next row runs; at the end the script exits
non-zero if a row failed or differed, after writing everything (``packing`` in the JSON).

``--cpu``: the same code path with the models scaled down (2 layers, widths of 64-128, a vocabulary
of 8192 with the special ids moved into it, 256-token samples with 64 image tokens; packing samples
of 96 to 256 tokens) so that it runs in seconds on two CPU cores (the tests run it); its numbers are
CPU-sized checks of the path, not GPU numbers. ``--out FILE`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from adapter_overhead import environment, loadavg, mib, sync  # noqa: E402
from profiling import cpu_peak_bytes  # noqa: E402
from torch import nn  # noqa: E402

from mmpeft.activations import training_loss  # noqa: E402
from mmpeft.adapters import AdaptedLinear, AdapterGroup, inject_adapters  # noqa: E402
from mmpeft.adapters.quant import keep_standard_layout  # noqa: E402
from mmpeft.adapters.routing import RoutingContext, RoutingLosses  # noqa: E402
from mmpeft.models.backbone import (  # noqa: E402
    LANGUAGE_MODEL_PATHS,
    Backbone,
    get_path,
    language_model,
    prepare_for_training,
    quantization_config,
)
from mmpeft.objective import IGNORE_INDEX  # noqa: E402
from mmpeft.speed import Speed, apply_to_adapters  # noqa: E402

# -- the published shapes -------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One family's model and image sizes, and where they come from."""

    family: str
    """``llava`` or ``qwen2_vl``."""
    source: str
    """The hub repository whose ``config.json`` the values are copied from (or what they scale down)."""
    text: dict[str, Any]
    """The text model's config keys."""
    vision: dict[str, Any]
    """The vision tower's config keys."""
    top: dict[str, Any]
    """Top-level config keys: the special token ids, the projector and feature-layer settings."""
    image: int
    """Side of the square image in pixels; it fixes the number of image tokens."""
    text_ids: tuple[int, int]
    """``[low, high)`` of the ids random text is drawn from: the vocabulary without its special tokens."""


LLAVA_7B = Shape(
    family="llava",
    source="llava-hf/llava-1.5-7b-hf",  # config.json: Vicuna-7B (Llama-2 shapes) + CLIP ViT-L/14-336
    text={
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 32001,
        "tie_word_embeddings": False,
    },
    vision={
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    top={
        "image_token_index": 32000,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": 576,
        "tie_word_embeddings": False,
    },
    image=336,
    text_ids=(3, 32000),
)

QWEN2_VL_7B = Shape(
    family="qwen2_vl",
    source="Qwen/Qwen2-VL-7B-Instruct",  # config.json: Qwen2-7B text model + the 675M ViT with its 2x2 merger
    text={
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    },
    vision={
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 3584,  # the merger projects into the text model
        "mlp_ratio": 4,
        "num_heads": 16,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_act": "quick_gelu",
    },
    top={
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": False,
    },
    image=672,  # (672 / 14)^2 = 2304 patches, 576 tokens after the 2x2 merge: as many as LLaVA-1.5's image
    text_ids=(0, 151643),
)


def scaled_down(shape: Shape) -> Shape:
    """``shape`` at CPU size for ``--cpu``: 2 layers, widths 64-128, 64 image tokens, a vocabulary of 8192 with
    the special ids moved into it; everything else (architecture, head_dim 64, GQA, mRoPE, the merger) kept."""
    if shape.family == "llava":
        text = {**shape.text, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2}
        text |= {"num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 8192, "pad_token_id": 8191}
        vision = {**shape.vision, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2}
        vision |= {"num_attention_heads": 2, "image_size": 112, "projection_dim": 64}
        top = {**shape.top, "image_token_index": 8190, "image_seq_length": 64}
        return dataclasses.replace(
            shape,
            source=f"{shape.source}, scaled down",
            text=text,
            vision=vision,
            top=top,
            image=112,
            text_ids=(3, 8190),
        )
    text = {**shape.text, "hidden_size": 128, "intermediate_size": 688, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 8192, "max_window_layers": 2}
    text |= {"bos_token_id": 8180, "eos_token_id": 8181}
    text["rope_parameters"] = {**shape.text["rope_parameters"], "mrope_section": [8, 12, 12]}  # head_dim 64
    vision = {**shape.vision, "depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 2}
    top = {**shape.top, "image_token_id": 8185, "video_token_id": 8186}
    top |= {"vision_start_token_id": 8182, "vision_end_token_id": 8183}
    return dataclasses.replace(
        shape, source=f"{shape.source}, scaled down", text=text, vision=vision, top=top, image=224, text_ids=(0, 8180)
    )


SHAPES = {"llava": LLAVA_7B, "qwen2_vl": QWEN2_VL_7B}


def model_config(shape: Shape):
    if shape.family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        return LlavaConfig(
            text_config=LlamaConfig(**shape.text), vision_config=CLIPVisionConfig(**shape.vision), **shape.top
        )
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(text_config=dict(shape.text), vision_config=dict(shape.vision), **shape.top)


def image_tokens(shape: Shape) -> int:
    if shape.family == "llava":
        return (shape.image // shape.vision["patch_size"]) ** 2  # CLS dropped ("default" feature selection)
    return (shape.image // shape.vision["patch_size"] // shape.vision["spatial_merge_size"]) ** 2


# -- the model: meta device, then NF4 layer by layer ------------------------------------------


INIT_STD = 0.02  # Llama's and Qwen2's initializer_range


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """``shape``'s model with random weights, every linear layer but the LM head in NF4 (double quantization), built
    one layer at a time on ``device``; the same ``seed`` gives the same model."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText
    from transformers.quantizers import AutoHfQuantizer

    backbone = Backbone(pretrained=f"<random {shape.source}>")
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary frequencies) computed
        model = AutoModelForImageTextToText.from_config(model_config(shape), dtype=dtype)
    # transformers' own bitsandbytes quantizer swaps in the Linear4bit layers (on meta), so the same layers are 4-bit
    # as after from_pretrained with mmpeft's quantization_config (everything but the LM head).
    quantizer = AutoHfQuantizer.from_config(quantization_config(backbone, dtype), pre_quantized=False)
    quantizer.preprocess_model(model, device_map={"": device})
    generator = torch.Generator(device=device).manual_seed(seed)

    def random(*size: int) -> torch.Tensor:
        return torch.empty(size, device=device, dtype=dtype).normal_(0.0, INIT_STD, generator=generator)

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        old = module.weight
        weight = random(module.out_features, module.in_features)  # (out, in): the only 16-bit copy, one layer's
        module.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            quant_type=old.quant_type,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_storage=old.quant_storage,
        ).to(device)  # quantized here
        del weight
    for module in model.modules():
        norm = "norm" in type(module).__name__.lower()
        for key, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            if norm or key == "bias":
                value = torch.full(param.shape, 1.0 if norm and key == "weight" else 0.0, device=device, dtype=dtype)
            else:
                value = random(*param.shape)  # embeddings, LM head, patch convolutions, class/position embeddings
            setattr(module, key, nn.Parameter(value, requires_grad=param.requires_grad))
        for key, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, key, buffer.to(device))  # a registered buffer stays one (persistent or not)
    quantizer.postprocess_model(model)  # is_loaded_in_4bit, which PEFT's preparation reads
    model.hf_quantizer = quantizer  # as from_pretrained leaves a quantized model
    keep_standard_layout(model)
    return model


# -- batches ----------------------------------------------------------------------------------


def make_batch(
    shape: Shape,
    batch: int,
    seq: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    lengths: list[int] | None = None,
) -> dict:
    """``batch`` samples of ``seq`` tokens as the family's encoder lays them out: prompt, image tokens, text; the last
    eighth labelled. Random ids of the published vocabulary, random pixel values. With ``lengths`` (each at most
    ``seq``) sample ``i`` has ``lengths[i]`` tokens, its last eighth labelled, and is padded on the right to ``seq``
    (the pad id, attention mask 0), as the encoder pads a batch."""
    generator = torch.Generator().manual_seed(seed)
    low, high = shape.text_ids
    n_image = image_tokens(shape)
    ids = torch.randint(low, high, (batch, seq), generator=generator)  # (batch, seq)
    start = 4  # "USER: " before the image, as the chat templates put it
    if shape.family == "llava":
        ids[:, 0] = shape.text["bos_token_id"]
        ids[:, start : start + n_image] = shape.top["image_token_index"]
        side = shape.image
        pixels = torch.randn(batch, 3, side, side, generator=generator)  # (batch, 3, H, W), normalised
        inputs = {"pixel_values": pixels}
    else:
        ids[:, start - 1] = shape.top["vision_start_token_id"]
        ids[:, start : start + n_image] = shape.top["image_token_id"]
        ids[:, start + n_image] = shape.top["vision_end_token_id"]
        v = shape.vision
        grid = shape.image // v["patch_size"]
        patch = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
        pixels = torch.randn(batch * grid * grid, patch, generator=generator)  # (batch * patches, 3 * 2 * 14 * 14)
        inputs = {
            "pixel_values": pixels,
            "image_grid_thw": torch.tensor([[1, grid, grid]] * batch),  # (batch, 3)
            "mm_token_type_ids": (ids == shape.top["image_token_id"]).long(),  # (batch, seq): 1 on image tokens
        }
    if start + n_image + 16 > seq - seq // 8:
        raise SystemExit(f"--seq {seq} is too short for {n_image} image tokens and an answer")
    labels = torch.full((batch, seq), IGNORE_INDEX)  # (batch, seq)
    labels[:, -(seq // 8) :] = ids[:, -(seq // 8) :]
    mask = torch.ones(batch, seq, dtype=torch.long)  # (batch, seq)
    if lengths is not None:
        if len(lengths) != batch or not all(shortest_sample(shape) <= n <= seq for n in lengths):
            raise SystemExit(f"sample lengths {lengths}: {batch} of {shortest_sample(shape)} to {seq} tokens expected")
        labels.fill_(IGNORE_INDEX)
        for i, n in enumerate(lengths):
            labels[i, n - n // 8 : n] = ids[i, n - n // 8 : n]
            ids[i, n:] = shape.text.get("pad_token_id", shape.text["bos_token_id"])  # Qwen2-VL: <|endoftext|>
            mask[i, n:] = 0
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = (ids == shape.top["image_token_id"]).long()  # (batch, seq)
    inputs |= {"input_ids": ids, "attention_mask": mask}
    inputs = {k: v.to(device, dtype=dtype if k == "pixel_values" else None) for k, v in inputs.items()}
    return {
        "inputs": inputs,
        "labels": labels.to(device),
        "task_ids": torch.zeros(batch, dtype=torch.long, device=device),
    }


def shortest_sample(shape: Shape) -> int:
    """The fewest tokens :func:`make_batch` lays a sample in: the prompt, the image tokens, 16 text tokens, then an
    answer of an eighth of the sample."""
    before = 4 + image_tokens(shape) + 16
    return -(-before * 8 // 7)  # n - n // 8 >= before


def mixed_lengths(shape: Shape, batch: int, seq: int, seed: int) -> list[int]:
    """``batch`` sample lengths evenly spread from a quarter of ``seq`` (at least :func:`shortest_sample`) to
    ``seq``, in a seeded random order (so that packing reorders the samples and their images)."""
    low = max(seq // 4, shortest_sample(shape))
    if low > seq:
        raise SystemExit(f"--packing-seq {seq} is too short for {image_tokens(shape)} image tokens and an answer")
    spread = [round(low + (seq - low) * i / max(batch - 1, 1)) for i in range(batch)]
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed)).tolist()
    return [spread[i] for i in order]


# -- the runners ------------------------------------------------------------------------------


@dataclass
class Row:
    family: str
    variant: str
    adapter: str
    trainable_params: int
    loss_step0: float
    losses: list[float]
    step_s: list[float]
    step_s_median: float
    tokens_per_s: float
    resident_bytes: int
    step_peak_bytes: int
    peak_bytes: int
    estimate_bytes: int | None


def mmpeft_model(
    shape: Shape, adapter: str, config: dict, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[nn.Module, RoutingContext, Speed]:
    """The model as ``load_backbone`` + ``MMPeftModule`` prepare it: QLoRA preparation, ``adapter`` on every linear
    layer of the language model, the ``model.speed`` defaults."""
    speed = Speed()
    model = build_model(shape, device, dtype, seed)
    prepare_for_training(model, Backbone(pretrained=f"<random {shape.source}>"), speed)
    context = RoutingContext()
    torch.manual_seed(seed)
    inject_adapters(language_model(model), [AdapterGroup(adapter, ["all-linear"], config)], context)
    apply_to_adapters(model, speed)
    model.train()
    return model, context, speed


def peft_model(shape: Shape, names: list[str], lora: dict, a_init: dict[str, torch.Tensor], device, dtype, seed: int):
    """PEFT's usual QLoRA path on the same model: ``names`` are the adapted linears' full paths, ``a_init`` their
    initial ``A`` (mmpeft LoRA's)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = build_model(shape, device, dtype, seed)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=names)
    model = get_peft_model(model, config)
    adapted = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    if set(adapted) != set(names):
        raise AssertionError(f"PEFT adapted other layers than mmpeft: {sorted(set(adapted) ^ set(names))[:5]}")
    with torch.no_grad():
        for name, layer in adapted.items():
            layer.lora_A["default"].weight.copy_(a_init[name])
    model.train()
    return model


def peft_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch["inputs"], labels=batch["labels"], use_cache=False).loss


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Bytes held before a step: on CUDA the allocator's count, on a CPU the model's tensors (4-bit weights with
    their quantization constants) and AdamW's state."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        state = getattr(t, "quant_state", None)
        for q in (state, getattr(state, "state2", None)) if state is not None else ():
            if q is None:
                continue
            for c in (q.absmax, getattr(q, "code", None), getattr(q, "offset", None)):
                if torch.is_tensor(c):
                    seen[c.untyped_storage().data_ptr()] = c.untyped_storage().nbytes()
    for state in optimizer.state.values():
        for t in state.values():
            if torch.is_tensor(t):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def run_steps(model, optimizer, loss_fn, batch, steps: int, device: torch.device, autocast: bool, first=None):
    """One warm-up step, then ``steps`` timed steps. Returns (losses of all steps, timed seconds, resident bytes,
    peak bytes of the timed steps above the resident). ``first``, if given, is called after the warm-up step's
    backward, before its optimizer step (to read the first gradients)."""
    losses: list[float] = []

    def step(after_backward=None) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(batch)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    step(first)  # warm-up: AdamW's state, first-call costs
    gc.collect()
    sync(device)
    resident = resident_bytes(model, optimizer, device)
    seconds: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            start = time.perf_counter()
            step()
            sync(device)
            seconds.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device)
        free_now, total = torch.cuda.mem_get_info(device)
        # What the memory planner's CUDA allowance stands for, measured: memory the process uses outside
        # PyTorch's allocator (context, library workspaces), and what the caching allocator reserved beyond the
        # allocated peak.
        outside = total - free_now - torch.cuda.memory_reserved(device)
        reserved = torch.cuda.max_memory_reserved(device)
        print(
            f"  CUDA: peak allocated {mib(peak)} MiB, peak reserved {mib(reserved)} MiB "
            f"(+{reserved / peak - 1:.1%}), outside PyTorch's allocator {mib(outside)} MiB",
            flush=True,
        )
        return losses, seconds, resident, peak - resident

    def timed_steps() -> None:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)

    return losses, seconds, resident, cpu_peak_bytes(timed_steps)


def first_loss(model: nn.Module, loss_fn, batch: dict, autocast: bool) -> float:
    """The loss on ``batch`` before any step, dropout off (eval mode), under the run's precision."""
    model.eval()
    device_type = batch["labels"].device.type
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        loss = float(loss_fn(batch))
    model.train()
    return loss


def free(device: torch.device) -> None:
    """Drop the last model; on CUDA say so if something of it is still allocated (it would count in the next
    model's resident bytes)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated(device)
        if left > 2**26:
            print(f"  warning: {mib(left)} MiB still allocated after freeing a model", flush=True)


# -- the estimate -----------------------------------------------------------------------------


def estimate_peak(shape: Shape, adapter: str, adapter_config: dict, args: argparse.Namespace, device, dtype) -> int:
    """mmpeft's planned peak bytes for this row (``mmpeft.planner.plan``: weights, adapters, AdamW's state and one
    step of the same batch run on the meta device, under the same precision), from the model's config alone."""
    import tempfile

    from mmpeft.planner import plan

    with tempfile.TemporaryDirectory() as folder:
        model_config(shape).save_pretrained(folder)  # config.json only: the plan reads no weight
        backbone = Backbone(pretrained=folder, compute_dtype=str(dtype).removeprefix("torch."))
        batch = make_batch(shape, args.batch, args.seq, torch.device("cpu"), dtype, args.seed)
        result = plan(
            backbone,
            [AdapterGroup(adapter, ["all-linear"], adapter_config)],
            batch,
            device_type=device.type,
            precision="bf16-mixed" if device.type == "cuda" else None,
        )
    return result.peak


# -- packing: padded against packed batches, under sdpa and flash-attention -----------------------

PACK_LAYOUTS = (("padded", None), ("packed", 0), ("packed 2x", 2))
"""The packing rows' layouts: name, and the rows' capacity as a multiple of the longest sample (``None``: padded;
0: ``pack_length`` ``None``, the batch's longest sample)."""

FLASH = "flash_attention_2"


@dataclass
class PackRow:
    family: str
    attention: str
    """The attention implementation the language model ran under (``config._attn_implementation``)."""
    layout: str
    """``padded``, ``packed`` (``pack_length`` the longest sample) or ``packed 2x`` (twice the longest)."""
    pack_length: int | None
    rows: int
    width: int
    real_tokens: int
    padded_positions: int
    """Positions of the batch that hold no sample's token: ``rows x width`` less the real tokens."""
    status: str
    """``ok``; ``differs from padded ...`` (a packed row's first loss or gradients off the padded row's by more than
    the tolerance); ``failed: ...`` (an exception, its traceback printed); ``skipped: ...`` (flash-attention
    unavailable); for the control, ``ok: differs ...`` or ``weak: ...`` (it does not differ)."""
    loss_step0: float | None = None
    relative_to_padded: float | None = None
    """``|loss - padded loss| / |padded loss|`` at step 0, against the padded row of the same attention."""
    grad_relative_to_padded: float | None = None
    """The first step's adapter gradients against the padded row's: ``||g - g_padded|| / ||g_padded||``."""
    losses: list[float] = dataclasses.field(default_factory=list)
    step_s: list[float] = dataclasses.field(default_factory=list)
    step_s_median: float | None = None
    tokens_per_s: float | None = None
    """Real tokens (not padding) per second."""
    resident_bytes: int | None = None
    step_peak_bytes: int | None = None
    peak_bytes: int | None = None
    time_x_padded: float | None = None
    peak_x_padded: float | None = None
    error: str | None = None
    """The traceback of a failed row."""

    @property
    def padded_share(self) -> float:
        return self.padded_positions / max(self.rows * self.width, 1)


def flash_unavailable(device: torch.device) -> str | None:
    """Why flash-attention cannot run here (``None`` when it can): the ``flash-attn`` package and CUDA."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn not installed"
    if device.type != "cuda":
        return "flash-attn needs CUDA"
    return None


def packing_lengths(shape: Shape, args: argparse.Namespace) -> list[int]:
    """The packing batch's sample lengths (:func:`mixed_lengths`, a seed of their own)."""
    return mixed_lengths(shape, args.packing_batch, args.packing_seq, args.seed + 1)


def packing_batches(shape: Shape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The mixed-length batch padded and packed as each of :data:`PACK_LAYOUTS` packs it, on ``device``; and the
    samples' lengths."""
    from mmpeft.packing import PACKING, pack_padded

    lengths = packing_lengths(shape, args)
    padded = make_batch(shape, len(lengths), max(lengths), torch.device("cpu"), dtype, args.seed + 1, lengths)
    batches = {}
    for name, factor in PACK_LAYOUTS:
        if factor is None:
            batch = padded
        else:
            pack_length = factor * max(lengths) or None
            batch = pack_padded(padded, lengths, pack_length, ignore_index=IGNORE_INDEX)
            batch[PACKING] = {k: v.to(device) for k, v in batch[PACKING].items()}
        inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
        batches[name] = {**batch, "inputs": inputs, "labels": batch["labels"].to(device)}
        batches[name]["task_ids"] = batch["task_ids"].to(device)
    return batches, lengths


def adapter_grads(model: nn.Module) -> torch.Tensor:
    """The trainable parameters' gradients, flattened, float32, on the CPU (kept out of the device's memory, which
    the next rows measure)."""
    grads = [p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None]
    return torch.cat(grads).float().cpu()  # (trainable,)


def relative(x: torch.Tensor | float, reference: torch.Tensor | float) -> float:
    """``|x - reference| / |reference|`` (L2 norms for tensors)."""
    if torch.is_tensor(x):
        return float((x - reference).norm() / reference.norm())
    return abs(x - reference) / abs(reference)


def leaky(batch: dict) -> dict:
    """``batch`` (packed) with its positions counting along each row instead of restarting per sample: transformers
    then finds no boundary and every sample attends to the ones before it in its row (the negative control)."""
    from mmpeft.packing import PACKING

    layout = dict(batch[PACKING])
    rows, width = layout["position"].shape
    layout["position"] = torch.arange(width, device=layout["position"].device).expand(rows, -1).clone()
    return {**batch, PACKING: layout}


CONTROL = "packed 2x, boundaries ignored (control)"


def check_packing(shape: Shape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[PackRow]:
    """The packing rows of ``shape``'s family: mmpeft's LoRA model (dropout 0, so that a training step is
    deterministic), each layout of :data:`PACK_LAYOUTS` under the model's default attention, then under
    flash-attention where it runs, and the :data:`CONTROL` row. Every row starts from the same adapters and a fresh
    AdamW; its warm-up step's loss and adapter gradients are compared with the padded row's of the same attention.
    A row that raises is recorded with its traceback and the next one runs."""
    from mmpeft.packing import Layout

    autocast = device.type == "cuda"
    loss_tolerance = 1e-4 if device.type == "cpu" else 2e-2
    grad_limit = grad_tolerance(device)
    lora = {"r": args.rank, "alpha": 2.0 * args.rank, "dropout": 0.0}
    batches, lengths = packing_batches(shape, args, device, dtype)
    batches[CONTROL] = leaky(batches["packed 2x"])
    real = sum(lengths)
    shapes = {}
    for name, batch in batches.items():
        packed = Layout.of(batch)
        rows, width = packed.shape if packed is not None else tuple(batch["labels"].shape)
        pack_length = None if packed is None else (max(lengths) if name == "packed" else 2 * max(lengths))
        shapes[name] = {"rows": rows, "width": width, "pack_length": pack_length}
    print(f"  lengths {lengths} ({real:,} real tokens); layouts (rows x width):", flush=True)
    print("  " + ", ".join(f"{n} {s['rows']} x {s['width']}" for n, s in shapes.items() if n != CONTROL), flush=True)
    print(f"  samples in the rows' order, packed 2x: {batches['packed 2x']['lengths']}", flush=True)

    def empty(attention: str, name: str, status: str, error: str | None = None) -> PackRow:
        s = shapes[name]
        positions = s["rows"] * s["width"]
        r = PackRow(
            shape.family, attention, name, s["pack_length"], s["rows"], s["width"], real, positions - real, status
        )
        r.error = error
        return r

    try:
        model, context, speed = mmpeft_model(shape, "lora", lora, device, dtype, args.seed)
    except Exception:
        error = traceback.format_exc()
        print(error, flush=True)
        return [empty("-", name, failure(error), error) for name in shapes]
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def restore(model: nn.Module = model, initial: dict = initial) -> None:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in initial:
                    p.copy_(initial[n])

    def loss_fn(b: dict, model: nn.Module = model, context: RoutingContext = context) -> torch.Tensor:
        return training_loss(model, context, b, speed, RoutingLosses())

    default = language_model(model).config._attn_implementation
    out: list[PackRow] = []
    for attention in dict.fromkeys([default, *args.packing_attn]):
        if attention == FLASH and (why := flash_unavailable(device)) is not None:
            out.append(PackRow(shape.family, FLASH, "all", None, 0, 0, real, 0, f"skipped: {why}"))
            print(f"  {shape.family} {FLASH}: skipped, {why}", flush=True)
            continue
        try:
            if attention != default:
                model.set_attn_implementation(attention)  # every sub-model's, as vs_peft.py --attn
            got = language_model(model).config._attn_implementation
            if got != attention:
                raise AssertionError(f"the language model runs {got!r} after set_attn_implementation({attention!r})")
        except Exception:
            error = traceback.format_exc()
            print(error, flush=True)
            out += [empty(attention, name, failure(error), error) for name in shapes]
            continue
        padded: PackRow | None = None
        reference: torch.Tensor | None = None  # the padded row's first gradients
        for name in shapes:
            r = empty(attention, name, "ok")
            grads: list[torch.Tensor] = []
            optimizer = None
            try:
                restore()
                if name == CONTROL:  # one step's loss and gradients, nothing timed
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        loss = loss_fn(batches[name])
                    loss.backward()
                    r.loss_step0, r.losses = float(loss.detach()), [float(loss.detach())]
                    grads.append(adapter_grads(model))
                    del loss
                else:
                    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                    r.losses, r.step_s, r.resident_bytes, r.step_peak_bytes = run_steps(
                        model,
                        optimizer,
                        loss_fn,
                        batches[name],
                        args.packing_steps,
                        device,
                        autocast,
                        first=lambda grads=grads, model=model: grads.append(adapter_grads(model)),
                    )
                    r.loss_step0 = r.losses[0]  # the warm-up step's: dropout 0, the adapters' initial values
                    r.peak_bytes = r.resident_bytes + r.step_peak_bytes
                    r.step_s_median = statistics.median(r.step_s)
                    r.tokens_per_s = real / r.step_s_median
            except Exception:
                r.error = traceback.format_exc()
                r.status = failure(r.error)
                print(r.error, flush=True)
            del optimizer
            model.zero_grad(set_to_none=True)
            free(device)
            if name == "padded":
                padded, reference = (r, grads[0]) if r.status == "ok" else (None, None)
            elif r.status == "ok" and padded is not None and reference is not None:
                r.relative_to_padded = relative(r.loss_step0, padded.loss_step0)
                r.grad_relative_to_padded = relative(grads[0], reference)
                if name != CONTROL:
                    r.time_x_padded = r.step_s_median / padded.step_s_median
                    r.peak_x_padded = r.peak_bytes / padded.peak_bytes
                r.status = judge(r, loss_tolerance, grad_limit)
            elif r.status == "ok":
                r.status = "ok, no padded row to compare with"
            print_pack_row(r)
            out.append(r)
    del model, context, initial, restore, loss_fn
    free(device)
    return out


GRAD_TOLERANCE_BF16 = 0.1
"""The largest relative difference (L2) of a packed row's first adapter gradients from the padded row's under
bfloat16 on CUDA: a guess to be set from the first GPU run (different kernels and shapes round differently; float32
on a CPU agrees to 1e-6). The control row says how far a real packing error moves them (0.36-0.66 on the CPU-sized
models)."""


def grad_tolerance(device: torch.device) -> float:
    return 1e-4 if device.type == "cpu" else GRAD_TOLERANCE_BF16


def failure(error: str) -> str:
    return f"failed: {error.strip().splitlines()[-1]}"


def judge(r: PackRow, loss_tolerance: float, grad_tolerance: float) -> str:
    """A compared row's status: a packed row must give the padded row's first loss and gradients within the
    tolerances; the control must not (else the check could not see a packing error)."""
    close = r.relative_to_padded <= loss_tolerance and r.grad_relative_to_padded <= grad_tolerance
    if r.layout == CONTROL:
        if r.grad_relative_to_padded > grad_tolerance:
            return "ok: differs, as a packing error does"
        return f"weak: the control's gradients are within {grad_tolerance:.0e}, the check cannot see a packing error"
    if close:
        return "ok"
    return (
        f"differs from padded (loss {r.relative_to_padded:.1e}, tolerance {loss_tolerance:.0e}; "
        f"gradients {r.grad_relative_to_padded:.1e}, tolerance {grad_tolerance:.0e})"
    )


def print_pack_row(r: PackRow) -> None:
    parts = []
    if r.loss_step0 is not None:
        parts.append(f"loss at step 0 {r.loss_step0:.6f}")
    if r.grad_relative_to_padded is not None:
        parts.append(f"against padded: loss {r.relative_to_padded:.1e}, gradients {r.grad_relative_to_padded:.1e}")
    if r.step_s_median is not None:
        parts.append(f"step {r.step_s_median:.3f} s, peak {mib(r.peak_bytes)} MiB")
    print(f"  {r.family} {r.attention} {r.layout}: " + ", ".join([*parts, r.status]), flush=True)


def pack_table(rows: list[PackRow], device: torch.device) -> str:
    memory = "CUDA allocator" if device.type == "cuda" else "CPU, profiler"

    def cell(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    lines = [
        "| attention | layout | rows x width | padded positions | loss step 0 | loss vs padded (rel.) "
        f"| grads vs padded (rel.) | step s median | real tokens / s | resident MiB | step peak MiB ({memory}) "
        "| peak MiB | time x padded | peak x padded | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = "-" if r.rows == 0 else f"{r.rows} x {r.width}"
        share = "-" if r.rows == 0 else f"{r.padded_positions:,} / {r.rows * r.width:,} ({r.padded_share:.1%})"
        memory_cells = [cell(None if b is None else b / 2**20, ".1f") for b in (r.resident_bytes, r.step_peak_bytes)]
        lines.append(
            f"| {r.attention} | {r.layout} | {shape} | {share} | {cell(r.loss_step0, '.6f')} "
            f"| {cell(r.relative_to_padded, '.1e')} | {cell(r.grad_relative_to_padded, '.1e')} "
            f"| {cell(r.step_s_median, '.3f')} | {cell(r.tokens_per_s, '.1f')} "
            f"| {' | '.join(memory_cells)} | {cell(None if r.peak_bytes is None else r.peak_bytes / 2**20, '.1f')} "
            f"| {cell(r.time_x_padded, '.3f')} | {cell(r.peak_x_padded, '.3f')} | {r.status} |"
        )
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def check_family(shape: Shape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Row]:
    autocast = device.type == "cuda"
    lora = {"r": args.rank, "alpha": 2.0 * args.rank, "dropout": 0.05}
    variants = [("lora", "lora", lora), ("asymlora", "asymlora", {**lora, "heads": args.heads})]
    batch = make_batch(shape, args.batch, args.seq, device, dtype, args.seed)
    tokens = int(batch["inputs"]["attention_mask"].sum())
    rows: list[Row] = []
    names: list[str] = []
    a_init: dict[str, torch.Tensor] = {}
    for variant, adapter, adapter_config in variants:
        model, context, speed = mmpeft_model(shape, adapter, adapter_config, device, dtype, args.seed)
        if variant == "lora":
            lm_path = get_path(model, LANGUAGE_MODEL_PATHS, "language model")[0]
            for name, m in language_model(model).named_modules():
                if isinstance(m, AdaptedLinear):
                    names.append(f"{lm_path}.{name}")
                    a_init[names[-1]] = m.adapter.A.detach().clone()  # (r, d_in)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def loss_fn(b: dict, model=model, context=context, speed=speed) -> torch.Tensor:
            return training_loss(model, context, b, speed, RoutingLosses())

        loss0 = first_loss(model, loss_fn, batch, autocast)
        losses, seconds, resident, step_peak = run_steps(model, optimizer, loss_fn, batch, args.steps, device, autocast)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        estimate = estimate_peak(shape, adapter, adapter_config, args, device, dtype)
        rows.append(
            row(shape, variant, adapter, trainable, loss0, losses, seconds, tokens, resident, step_peak, estimate)
        )
        print_row(rows[-1], flush=True)
        del model, context, optimizer, loss_fn
        free(device)

    model = peft_model(shape, names, lora, a_init, device, dtype, args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss_peft(b: dict, model=model) -> torch.Tensor:
        return peft_loss(model, b)

    loss0 = first_loss(model, loss_peft, batch, autocast)
    losses, seconds, resident, step_peak = run_steps(model, optimizer, loss_peft, batch, args.steps, device, autocast)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != rows[0].trainable_params:
        raise AssertionError(f"trainable parameters differ: mmpeft {rows[0].trainable_params:,}, PEFT {trainable:,}")
    rows.append(row(shape, "peft", "peft-lora", trainable, loss0, losses, seconds, tokens, resident, step_peak, None))
    print_row(rows[-1], flush=True)
    del model, optimizer, loss_peft
    free(device)
    return rows


def row(shape, variant, adapter, trainable, loss0, losses, seconds, tokens, resident, step_peak, estimate) -> Row:
    median = statistics.median(seconds)
    return Row(
        family=shape.family,
        variant=variant,
        adapter=adapter,
        trainable_params=trainable,
        loss_step0=loss0,
        losses=losses,
        step_s=seconds,
        step_s_median=median,
        tokens_per_s=tokens / median,
        resident_bytes=resident,
        step_peak_bytes=step_peak,
        peak_bytes=resident + step_peak,
        estimate_bytes=estimate,
    )


def print_row(r: Row, flush: bool = False) -> None:
    print(
        f"  {r.family} {r.variant}: loss at step 0 {r.loss_step0:.4f}, step {r.step_s_median:.3f} s, "
        f"peak {mib(r.peak_bytes)} MiB",
        flush=flush,
    )


def table(rows: list[Row], device: torch.device) -> str:
    memory = "CUDA allocator" if device.type == "cuda" else "CPU, profiler"
    lines = [
        f"| variant | trainable params | loss step 0 | step s median | tokens / s | resident MiB | "
        f"step peak MiB ({memory}) | peak MiB | estimate MiB | peak / estimate | time x PEFT | peak x PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peft = next(r for r in rows if r.variant == "peft")
    for r in rows:
        estimate = "-" if r.estimate_bytes is None else mib(r.estimate_bytes)  # PEFT: not mmpeft's to plan
        ratio = "-" if r.estimate_bytes is None else f"{r.peak_bytes / r.estimate_bytes:.3f}"
        lines.append(
            f"| {r.variant} | {r.trainable_params:,} | {r.loss_step0:.4f} | {r.step_s_median:.3f} "
            f"| {r.tokens_per_s:.1f} | {mib(r.resident_bytes)} | {mib(r.step_peak_bytes)} | {mib(r.peak_bytes)} "
            f"| {estimate} | {ratio} | {r.step_s_median / peft.step_s_median:.3f}x "
            f"| {r.peak_bytes / peft.peak_bytes:.3f}x |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cpu", action="store_true", help="CPU-sized mode: the models scaled down, 256-token samples")
    p.add_argument("--families", default="llava,qwen2_vl", help="comma-separated: llava, qwen2_vl")
    p.add_argument("--seq", type=int, default=None, help="tokens per sample (default 2048; 256 with --cpu)")
    p.add_argument("--batch", type=int, default=1, help="samples per batch")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model after a warm-up (default 3; 2 --cpu)")
    p.add_argument("--rank", type=int, default=16, help="r of LoRA and of each AsymLoRA head; alpha is 2 r")
    p.add_argument("--heads", type=int, default=3, help="AsymLoRA's B heads")
    p.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the families' rows, the packing rows: padded against packed batches of mixed lengths, under the "
        "default attention and flash-attention (default on)",
    )
    p.add_argument("--packing-batch", type=int, default=8, help="samples in the packing rows' batch")
    p.add_argument(
        "--packing-attn",
        default=FLASH,
        help="comma-separated attention implementations the packing rows run under after the model's default "
        f"(sdpa), each as vs_peft.py --attn sets it (default {FLASH}, skipped without flash-attn or CUDA; "
        "e.g. flex_attention on CUDA)",
    )
    p.add_argument("--packing-seq", type=int, default=None, help="the longest packing sample (default --seq)")
    p.add_argument(
        "--packing-steps",
        type=int,
        default=None,
        help="timed steps per packing row after a warm-up (default 2; 1 --cpu)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.seq = args.seq or (256 if args.cpu else 2048)
    args.steps = args.steps or (2 if args.cpu else 3)
    args.packing_seq = args.packing_seq or args.seq
    args.packing_attn = [a for a in args.packing_attn.split(",") if a]
    args.packing_steps = args.packing_steps or (1 if args.cpu else 2)
    unknown = set(args.families.split(",")) - set(SHAPES)
    if unknown:
        p.error(f"--families: unknown {sorted(unknown)}; known: {', '.join(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/gpu_check.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    started = time.perf_counter()
    if args.cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: the 7B check needs a GPU; --cpu runs the CPU-sized check")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = Backbone(pretrained="").torch_dtype(device)  # bfloat16 on CUDA, float32 on a CPU, as load_backbone
    env = environment(device)
    print(f"command: {command}")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else env['cpu']}")
    print(
        f"torch {env['torch']}, transformers {env['transformers']}, bitsandbytes {env['bitsandbytes']}, "
        f"python {env['python']}, {torch.get_num_threads()} CPU threads, load average {loadavg()}"
    )
    if args.cpu:
        print("mode: CPU-sized (models scaled down; these are not GPU numbers)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    report: dict[str, Any] = {"command": command, "environment": env, "mode": "cpu" if args.cpu else "gpu"}
    report["setup"] = {"batch": args.batch, "seq": args.seq, "steps": args.steps, "rank": args.rank}
    report["setup"] |= {"heads": args.heads, "quantization": "nf4 + double quant (bitsandbytes)", "families": {}}
    all_rows: list[Row] = []
    tolerance = 1e-4 if device.type == "cpu" else 2e-2
    for family in args.families.split(","):
        shape = scaled_down(SHAPES[family]) if args.cpu else SHAPES[family]
        t = shape.text
        print(
            f"\n## {family}: shapes of {shape.source}; text {t['num_hidden_layers']} layers x {t['hidden_size']}, "
            f"vocab {t['vocab_size']}; {image_tokens(shape)} image tokens ({shape.image} px) in {args.seq}-token "
            f"samples, batch {args.batch}",
            flush=True,
        )
        rows = check_family(shape, args, device, dtype)
        by_name = {r.variant: r for r in rows}
        theirs, ours = by_name["peft"].loss_step0, by_name["lora"].loss_step0
        rel = abs(ours - theirs) / abs(theirs)
        if not rel <= tolerance:
            raise AssertionError(
                f"{family}: step-0 losses differ: mmpeft LoRA {ours:.6f}, PEFT {theirs:.6f} "
                f"(relative {rel:.1e} > {tolerance:.0e})"
            )
        print(f"\n{family}: step-0 losses agree: mmpeft LoRA {ours:.6f}, PEFT {theirs:.6f} (relative {rel:.1e})")
        print(table(rows, device))
        report["setup"]["families"][family] = {"source": shape.source, **dataclasses.asdict(shape)}
        report.setdefault("step0_relative_difference", {})[family] = rel
        all_rows += rows
    report["rows"] = [dataclasses.asdict(r) for r in all_rows]
    failed: list[str] = []
    weak: list[str] = []
    if args.packing:
        write_report(report, args.out, started)  # the rows above are kept, whatever the packing part does
        report["packing"] = {"setup": {"batch": args.packing_batch, "longest": args.packing_seq}, "rows": []}
        report["packing"]["setup"] |= {"steps": args.packing_steps, "attention": ["default", *args.packing_attn]}
        report["packing"]["setup"] |= {"loss_tolerance": tolerance, "grad_tolerance": grad_tolerance(device)}
        for family in args.families.split(","):
            shape = scaled_down(SHAPES[family]) if args.cpu else SHAPES[family]
            print(
                f"\n### packing, {family}: {args.packing_batch} samples of mixed lengths up to {args.packing_seq} "
                "tokens, LoRA; padded, packed (pack_length the longest) and packed 2x (twice it)",
                flush=True,
            )
            report["packing"]["setup"].setdefault("lengths", {})[family] = packing_lengths(shape, args)
            try:
                rows = check_packing(shape, args, device, dtype)
            except Exception:  # check_packing records its rows' failures; this is anything else
                error = traceback.format_exc()
                print(error, flush=True)
                rows = [PackRow(family, "-", "all", None, 0, 0, 0, 0, f"failed: {error.strip().splitlines()[-1]}")]
                rows[0].error = error
            print(f"\n{family} packing (first loss of each packed row against the padded row of its attention):")
            print(pack_table(rows, device))
            report["packing"]["rows"] += [dataclasses.asdict(r) | {"padded_share": r.padded_share} for r in rows]
            failed += [f"{r.family} {r.attention} {r.layout}: {r.status}" for r in rows if not ok(r)]
            weak += [f"{r.family} {r.attention} {r.layout}: {r.status}" for r in rows if r.status.startswith("weak")]
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s; load average at end: {loadavg()}")
    write_report(report, args.out, started)
    for line in weak:
        print(f"warning: {line}")
    if failed:
        raise SystemExit("packing check failed:\n  " + "\n  ".join(failed))


def ok(r: PackRow) -> bool:
    """Whether a packing row passed (ran and, packed, gave the padded row's first loss and gradients), was skipped
    or is a control that does not differ (a warning: the check is weak, packing is not wrong)."""
    return r.status.startswith(("ok", "skipped", "weak"))


def write_report(report: dict[str, Any], out: str | None, started: float) -> None:
    report["total_s"] = time.perf_counter() - started
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
