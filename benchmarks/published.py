"""The published shapes of the checkpoints the shipped configs name, and local stand-ins of that shape.

``python -m mmpeft estimate`` reads a checkpoint's ``config.json`` and its processor, never a weight. Without
network (CI, the tests) the hub checkpoints are not there, so :func:`standin` writes a folder that reads as the
published checkpoint does: the tiny family's build (:func:`mmpeft.models.tiny.build_tiny_model`: its real model
and processor classes, tokenizer and chat template) with its ``config.json`` rewritten to the published sizes and
its processor files to the published image settings. ``AutoConfig`` and ``load_processor`` then see a checkpoint of
the published shape; the weights are not written (the tiny ones would not fit the shape), so the folder cannot be
trained, only planned.

What is kept from the tiny build: the tokenizer, and with it every special token id in the configs (``bos``,
``eos``, ``pad``, the image, video and vision start/end tokens): the tiny tokenizer's ids are below 1000, inside
every published vocabulary, so the embedding and the LM head have their published size while the ids match the
tokenizer that encodes the batch. The text around an image is a few tokens shorter or longer than with the real
tokenizer; the image tokens are the published count.

:data:`PUBLISHED` holds, for each hub checkpoint, the ``config.json`` values that decide memory (widths, depths,
heads, vocabulary, tied embeddings, rotary sections, sliding windows, the vision tower, the image-token count, the
projector) and the processor settings that decide the image tokens, each entry citing its repository. LLaVA-1.5-7B
and Qwen2-VL-7B are ``benchmarks/gpu_check.py``'s shapes (one copy of those numbers).

    python benchmarks/published.py --out /tmp/standins    # writes every stand-in, prints its image tokens
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import LLAVA_7B, QWEN2_VL_7B  # noqa: E402

from mmpeft.files import staged_dir  # noqa: E402
from mmpeft.models.tiny import MARKER_FILE, build_tiny_model, write_json  # noqa: E402

# Keys whose values are token ids: the stand-in keeps the tiny tokenizer's (see the module docstring).
TOKEN_ID_KEYS = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "image_token_index",
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "boi_token_index",
        "eoi_token_index",
    }
)
STANDIN_MARKER = ".mmpeft-standin.json"
"""Written last in a stand-in folder: the repository it stands for (a complete folder is reused)."""
_STANDIN_VERSION = 1


@dataclass(frozen=True)
class Published:
    """One hub checkpoint's shape as its ``config.json`` and processor files publish it."""

    repo: str
    """The hub repository the values are copied from."""
    family: str
    """The tiny family (:data:`mmpeft.models.tiny.FAMILIES`) with the same model and processor classes."""
    text: dict[str, Any]
    """``text_config`` keys."""
    vision: dict[str, Any]
    """``vision_config`` keys."""
    top: dict[str, Any] = field(default_factory=dict)
    """Top-level ``config.json`` keys: image-token count, projector, feature layer, tied embeddings."""
    image_processor: dict[str, Any] = field(default_factory=dict)
    """The image processor's settings (``preprocessor_config.json``, or ``processor_config.json``'s
    ``image_processor``), in transformers 5's spelling."""
    processor: dict[str, Any] = field(default_factory=dict)
    """The processor's own settings (``processor_config.json``)."""
    parameters: int = 0
    """The parameter count this shape builds (counted on the meta device; the hub page rounds it)."""


def _sizes(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without token ids (the stand-in keeps the tiny tokenizer's)."""
    return {key: value for key, value in values.items() if key not in TOKEN_ID_KEYS}


# CLIP ViT-L/14-336's normalisation, which every Qwen-VL processor also uses.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Qwen2-VL's and Qwen2.5-VL's preprocessor_config.json (the same in the 2B, 3B and 7B repos): 14-pixel patches, 2x2
# merged, so an image gives (H / 28) x (W / 28) tokens after resizing to between min_pixels = 4 x 28 x 28 and
# max_pixels = 16384 x 28 x 28 (transformers 5 spells them size.shortest_edge / size.longest_edge).
_QWEN_IMAGE_PROCESSOR = {
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "size": {"shortest_edge": 3136, "longest_edge": 12845056},
    "image_mean": _CLIP_MEAN,
    "image_std": _CLIP_STD,
}

LLAVA_15_7B = Published(
    repo=LLAVA_7B.source,  # llava-hf/llava-1.5-7b-hf: Vicuna-7B (Llama 2 shapes) + CLIP ViT-L/14-336
    family="llava",
    text={**_sizes(LLAVA_7B.text), "head_dim": 128},  # 4096 / 32 heads
    vision=_sizes(LLAVA_7B.vision),
    # image_seq_length 576 = (336 / 14)^2: CLIP's CLS token dropped ("default" feature selection); the projector
    # is a two-layer GELU MLP with biases.
    top={**_sizes(LLAVA_7B.top), "multimodal_projector_bias": True},
    # preprocessor_config.json: resize the shortest edge to 336, centre-crop 336 x 336.
    image_processor={"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
    # processor_config.json: 14-pixel patches, + 1 for CLS, which "default" drops.
    processor={"patch_size": 14, "num_additional_image_tokens": 1, "vision_feature_select_strategy": "default"},
    parameters=7_063_427_072,
)

QWEN2_VL_2B = Published(
    repo="Qwen/Qwen2-VL-2B-Instruct",  # Qwen2-1.5B text model + the 675M ViT with its 2x2 merger
    family="qwen2_vl",
    text={
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "layer_types": ["full_attention"] * 28,
        # head_dim 128: rotary's 64 frequency pairs split over (temporal, height, width)
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    },
    vision={
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 1536,  # the merger projects into the text model
        "mlp_ratio": 4,
        "num_heads": 16,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_act": "quick_gelu",
    },
    top={"tie_word_embeddings": True},
    image_processor=_QWEN_IMAGE_PROCESSOR,
    parameters=2_208_985_600,
)

QWEN2_VL_7B_INSTRUCT = Published(
    repo=QWEN2_VL_7B.source,  # Qwen/Qwen2-VL-7B-Instruct: Qwen2-7B text model + the same ViT
    family="qwen2_vl",
    text={**_sizes(QWEN2_VL_7B.text), "use_sliding_window": False, "layer_types": ["full_attention"] * 28},
    vision=_sizes(QWEN2_VL_7B.vision),
    top=_sizes(QWEN2_VL_7B.top),
    image_processor=_QWEN_IMAGE_PROCESSOR,
    parameters=8_291_375_616,
)

QWEN2_5_VL_7B = Published(
    repo="Qwen/Qwen2.5-VL-7B-Instruct",  # Qwen2.5-7B text model + the windowed SwiGLU ViT
    family="qwen2_5_vl",
    text={
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "layer_types": ["full_attention"] * 28,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    },
    vision={
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,  # the merger projects into the text model
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,  # attention within 112 px windows (4 x 4 merged tokens) ...
        "fullatt_block_indexes": [7, 15, 23, 31],  # ... except in these blocks
        "tokens_per_second": 2,
        "hidden_act": "silu",
    },
    top={"tie_word_embeddings": False},
    image_processor=_QWEN_IMAGE_PROCESSOR,
    parameters=8_292_166_656,
)

_GEMMA3_LAYERS = 34
GEMMA3_4B = Published(
    repo="google/gemma-3-4b-it",  # Gemma 3 4B text model + SigLIP so400m (896 px), pooled to 256 tokens
    family="gemma3",
    text={
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": _GEMMA3_LAYERS,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "vocab_size": 262208,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        # Five sliding-window layers (1024 tokens) to one global layer (sliding_window_pattern 6).
        "sliding_window": 1024,
        "_sliding_window_pattern": 6,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(_GEMMA3_LAYERS)],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    },
    vision={
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 896,
        "patch_size": 14,
        "vision_use_head": False,
    },
    # (896 / 14)^2 = 4096 patches, average-pooled 4 x 4 into 256 tokens per image.
    top={"mm_tokens_per_image": 256, "tie_word_embeddings": True},
    image_processor={"size": {"height": 896, "width": 896}, "image_seq_length": 256},
    processor={"image_seq_length": 256},
    parameters=4_300_079_472,
)

PUBLISHED: dict[str, Published] = {
    shape.repo: shape for shape in (LLAVA_15_7B, QWEN2_VL_2B, QWEN2_VL_7B_INSTRUCT, QWEN2_5_VL_7B, GEMMA3_4B)
}
"""The published shapes by hub repository."""


def _overlay(values: dict[str, Any], published: dict[str, Any]) -> dict[str, Any]:
    """``values`` with ``published``'s keys set (token ids never: the tiny tokenizer's stay)."""
    return {**values, **_sizes(published)}


def standin(repo: str, out_dir: str | os.PathLike) -> Path:
    """A folder in ``out_dir`` that ``AutoConfig`` and ``load_processor`` read as ``repo``'s checkpoint (see the module
    docstring); a complete stand-in of the same repository already there is reused."""
    if repo not in PUBLISHED:
        raise KeyError(f"no published shape for {repo!r}; known: {', '.join(PUBLISHED)}")
    shape = PUBLISHED[repo]
    out = Path(out_dir)
    wanted = {"repo": repo, "version": _STANDIN_VERSION}
    try:
        if json.loads((out / STANDIN_MARKER).read_text()) == wanted:
            return out
    except (OSError, ValueError):
        pass
    with staged_dir(out) as staging:
        build_tiny_model(shape.family, staging, overwrite=True)
        # No weights: the tiny ones do not fit the published shape, and a plan reads none.
        for path in staging.glob("*.safetensors*"):
            path.unlink()
        (staging / MARKER_FILE).unlink()  # not a tiny model any more
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config["text_config"] = _overlay(config["text_config"], shape.text)
        config["vision_config"] = _overlay(config["vision_config"], shape.vision)
        config = _overlay(config, shape.top)
        config["_name_or_path"] = repo
        write_json(config_path, config)
        processor_path = staging / "processor_config.json"
        if processor_path.is_file():  # LLaVA, Gemma 3: the image processor is nested in the processor's file
            processor = json.loads(processor_path.read_text())
            processor["image_processor"] = _overlay(processor["image_processor"], shape.image_processor)
            write_json(processor_path, _overlay(processor, shape.processor))
        else:  # Qwen-VL: preprocessor_config.json holds the image processor
            image_path = staging / "preprocessor_config.json"
            write_json(image_path, _overlay(json.loads(image_path.read_text()), shape.image_processor))
        write_json(staging / STANDIN_MARKER, wanted)
    return out


def standin_name(repo: str) -> str:
    """A folder name for ``repo``'s stand-in."""
    return repo.replace("/", "--")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the stand-ins into (one subfolder each)")
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    from mmpeft.models.backbone import load_processor
    from mmpeft.models.images import image_tokens

    for repo in PUBLISHED:
        path = standin(repo, Path(args.out) / standin_name(repo))
        config = AutoConfig.from_pretrained(path)
        tokens = image_tokens(load_processor(str(path)), 336, 336, config)
        print(f"{repo:<32} {path}  image tokens of a 336 x 336 image: {tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
