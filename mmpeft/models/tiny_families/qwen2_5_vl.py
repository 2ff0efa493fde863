"""Tiny Qwen2.5-VL, mimicking Qwen/Qwen2.5-VL-3B-Instruct (`Qwen2_5_VLForConditionalGeneration`).

Same processing as the tiny Qwen2-VL (Qwen2-VL's image processor, dynamic resolution, the
Qwen2-VL chat template, which Qwen2.5-VL kept), with Qwen2.5-VL's vision tower: an RMSNorm/SwiGLU
ViT whose blocks attend within windows of merged patches except the `fullatt_block_indexes`
ones, and tied input/output embeddings as in the 3B checkpoint.
"""

from __future__ import annotations

import pathlib

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mmpeft.models.tiny import (
    _QWEN_MERGE,
    _QWEN_PATCH,
    build_qwen_vl,
    qwen2_vl_text_config,
    qwen_image_processor,
    qwen_tokenizer,
    qwen_vision_config,
)

# The added tokens of the Qwen2.5 tokenizer (Qwen2.5-VL, and InternVL3 and Qwen3-VL, which extend
# it), in vocabulary order (151643-151664 in the real one).
QWEN2_5_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# The last eight, from <tool_call> on, are single tokens but not special (skip_special_tokens keeps them).
QWEN2_5_NOT_SPECIAL = frozenset(QWEN2_5_ADDED_TOKENS[QWEN2_5_ADDED_TOKENS.index("<tool_call>") :])

# Windows of 2x2 merged tokens (4x4 patches of 8 pixels); the real 112 is 4x4 merged tokens of
# 14-pixel patches. A square image (8x8 patches) spans 4 windows.
_WINDOW_SIZE = 2 * _QWEN_MERGE * _QWEN_PATCH


def build(out: pathlib.Path, seed: int) -> None:
    tokenizer = qwen_tokenizer(QWEN2_5_ADDED_TOKENS, not_special=QWEN2_5_NOT_SPECIAL)
    build_qwen_vl(
        out,
        seed,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLConfig,
        tokenizer,
        qwen_image_processor(),
        text_config=qwen2_vl_text_config(tokenizer),
        vision_config=qwen_vision_config(
            _QWEN_PATCH,
            window_size=_WINDOW_SIZE,
            fullatt_block_indexes=[1],  # real: [7, 15, 23, 31] of 32, the last block full too
            tokens_per_second=2,
        ),
        tie_word_embeddings=True,
    )
