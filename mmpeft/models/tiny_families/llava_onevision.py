"""Tiny LLaVA-OneVision, mimicking llava-hf/llava-onevision-qwen2-0.5b-ov-hf.

SigLIP vision tower (no CLS, "full" feature selection), Qwen2 text model and tokenizer. As in
the real model, an image that is alone in its sample goes through anyres: a base view plus a
grid of crops chosen among grids up to 6x6, with features pooled down when the grid holds more
than about 9 views' worth ("anyres_max_9"), so its token count varies with its size and shape
(here about 10 to 46 tokens). Each image of a sample with several images is padded to a square
and takes the base view only (4 + 1 newline tokens). The processor returns
``batch_num_images``, which the model needs to tell the two cases apart.
"""

from __future__ import annotations

import itertools
import pathlib

from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil

from mmpeft.models.tiny import (
    _TEXT_LAYERS,
    pinpoints,
    qwen_generation,
    qwen_text_config,
    qwen_tokenizer,
    save_model,
    save_processor_parts,
    siglip_vision_config,
    token_id,
)

# A 16x16 view cut into 8x8 SigLIP patches: 2x2 = 4 features per view (real: 384 / 14 = 27x27 = 729).
_IMAGE_SIZE = 16
_PATCH = 8
_NUM_IMAGE_TOKENS = (_IMAGE_SIZE // _PATCH) ** 2
# Real pinpoints: every (rows, columns) grid of 384-pixel views up to 6x6.
_GRIDS = tuple(itertools.product(range(1, 7), repeat=2))
_VISION_ASPECT_RATIO = "anyres_max_9"

# Qwen2's special tokens, then LLaVA's, in the real tokenizer's order (151643-151647).
_IMAGE_TOKEN = "<image>"
_VIDEO_TOKEN = "<video>"
_ADDED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", _IMAGE_TOKEN, _VIDEO_TOKEN)

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf's chat_template.json, as is. Its quirks: no system
# prompt is added; a turn opens with "<|im_start|>{role} " (a space, not a newline), then all
# its images, then all its videos, then each text part after a "\n"; a turn ends with
# "<|im_end|>" and no newline; assistant text sits in {% generation %} tags; the generation
# prompt is "<|im_start|>assistant\n", so a prompt does not prefix the rendered conversation
# (" \n" there, "\n" here). String content renders no text.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build(out: pathlib.Path, seed: int) -> None:
    tokenizer = qwen_tokenizer(_ADDED_TOKENS, chat_template=_CHAT_TEMPLATE)
    grid_pinpoints = pinpoints(_IMAGE_SIZE, _GRIDS)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}, image_grid_pinpoints=grid_pinpoints
    )
    config = LlavaOnevisionConfig(
        vision_config=siglip_vision_config(_IMAGE_SIZE, _PATCH),
        text_config=qwen_text_config(
            tokenizer,
            model_type="qwen2",
            max_window_layers=_TEXT_LAYERS,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            tie_word_embeddings=True,  # as Qwen2-0.5B's
        ),
        image_token_index=token_id(tokenizer, _IMAGE_TOKEN),
        video_token_index=token_id(tokenizer, _VIDEO_TOKEN),
        image_grid_pinpoints=grid_pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=_VISION_ASPECT_RATIO,
    )
    save_model(LlavaOnevisionForConditionalGeneration, config, out, seed, **qwen_generation(tokenizer))
    # LlavaOnevisionProcessor cannot be built without its video processor, which needs torchvision.
    save_processor_parts(
        out,
        tokenizer,
        image_processor,
        {
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": _NUM_IMAGE_TOKENS,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": _VISION_ASPECT_RATIO,
            "image_token": _IMAGE_TOKEN,
            "video_token": _VIDEO_TOKEN,
        },
    )
