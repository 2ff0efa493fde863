"""Tiny PaliGemma 2: mimics google/paligemma2-3b-mix-224 (Gemma 2 text model, SigLIP tower, linear projector).

Every image is resized to one square (224 pixels in the real model, 32 here) and gives
``image_seq_length`` tokens: (32 / 8)^2 = 16 (the real (224 / 14)^2 = 256), whatever its size.

PaliGemma checkpoints ship no chat template. ``PaliGemmaProcessor(text=prefix, images=...)``
builds ``<image>`` x 16 per image + ``<bos>`` + prefix + ``"\\n"``; with ``suffix=`` it appends the
suffix + ``<eos>`` and returns ``token_type_ids`` (1 on the suffix) and ``labels`` (the suffix only):
the prefix (image and prompt) is attended bidirectionally, the suffix causally.

The tokenizer keeps PaliGemma's 1024 ``<locXXXX>`` and 128 ``<segXXX>`` tokens (the processor
would add them anyway), so its vocabulary is the usual ~1000 tokens plus those 1152.
"""

from __future__ import annotations

import pathlib

from transformers import (
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
)
from transformers.image_utils import PILImageResampling
from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS

from mmpeft.models.tiny import _TEXT_HIDDEN, save_model, siglip_vision_config, token_id
from mmpeft.models.tiny_families.gemma3 import GEMMA_TURN_TOKENS, gemma_text_config, gemma_tokenizer

# 32-pixel images cut into 4x4 patches of 8 pixels: 16 image tokens.
_IMAGE_SIZE = 32
_PATCH = 8
_IMAGE_SEQ_LENGTH = (_IMAGE_SIZE // _PATCH) ** 2
# Gemma 2's sliding window (4096 in the real model, 16 images' worth of tokens).
_SLIDING_WINDOW = 16 * _IMAGE_SEQ_LENGTH
_IMAGE = "<image>"


def build(out: pathlib.Path, seed: int) -> None:
    # Vocabulary order as in PaliGemma: Gemma's, then <loc0000>..<loc1023>, <seg000>..<seg127>, <image>.
    tokenizer = gemma_tokenizer(1)
    tokenizer.add_tokens(EXTRA_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": [*GEMMA_TURN_TOKENS, _IMAGE]})
    image_processor = SiglipImageProcessorPil(
        size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        image_seq_length=_IMAGE_SEQ_LENGTH,  # read by PaliGemmaProcessor
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = PaliGemmaConfig(
        vision_config=siglip_vision_config(_IMAGE_SIZE, _PATCH),
        text_config={
            **gemma_text_config(len(tokenizer), _SLIDING_WINDOW),
            "model_type": "gemma2",
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
        image_token_index=token_id(tokenizer, _IMAGE),
        vocab_size=len(tokenizer),
        projection_dim=_TEXT_HIDDEN,
        hidden_size=_TEXT_HIDDEN,
    )
    save_model(PaliGemmaForConditionalGeneration, config, out, seed, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    processor.save_pretrained(out)
