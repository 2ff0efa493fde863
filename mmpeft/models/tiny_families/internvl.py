"""Tiny InternVL3, mimicking OpenGVLab/InternVL3-1B-hf (`InternVLForConditionalGeneration`).

InternViT (CLS token, layer scale) -> pixel shuffle (downsample_ratio 0.5: 2x2 neighbouring
features concatenated) -> LayerNorm+MLP projector -> a Qwen2 text model, with the Qwen2.5
tokenizer extended by InternVL's tokens. Images are cut as the real processor does by default
(`crop_to_patches` is off in the image processor but `InternVLProcessor` turns it on): a grid of
1-12 tiles whose aspect ratio is closest to the image's, plus a thumbnail tile when there are
several, so the tile count follows the aspect ratio, not the size.
"""

from __future__ import annotations

import pathlib

from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
)

from mmpeft.models.tiny import (
    qwen_ids,
    qwen_text_config,
    qwen_tokenizer,
    save_model,
    save_processor_parts,
    token_id,
    vision_sizes,
)
from mmpeft.models.tiny_families.qwen2_5_vl import QWEN2_5_ADDED_TOKENS, QWEN2_5_NOT_SPECIAL

# Appended to the Qwen2.5 tokenizer (151665-151673 in the real one), all special.
_INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    # Not in the vocabulary of the real checkpoint; transformers 5 adds it on load (a video is
    # expanded into frames of <IMG_CONTEXT> before tokenisation, so it never reaches the model).
    "video_token": "<video>",
}

# A 32x32 tile (real: 448) cut into 8x8 patches (real: 14): 16 patches + CLS; pixel shuffle
# merges 2x2 patches, so each tile gives 4 image tokens (real: 256). With up to 12 tiles plus the
# thumbnail an image takes at most 52 tokens.
_TILE = 32
_PATCH = 8
_DOWNSAMPLE = 0.5
_IMAGE_SEQ_LENGTH = int((_TILE // _PATCH) ** 2 * _DOWNSAMPLE**2)

# OpenGVLab/InternVL3-1B-hf's template (no default system prompt; one "<IMG_CONTEXT>\n" per image,
# which the processor expands into <img><IMG_CONTEXT>*n</img>).
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def build(out: pathlib.Path, seed: int) -> None:
    tokenizer = qwen_tokenizer(
        QWEN2_5_ADDED_TOKENS + _INTERNVL_TOKENS,
        not_special=QWEN2_5_NOT_SPECIAL,
        chat_template=_CHAT_TEMPLATE,
        extra_special_tokens=_NAMED_TOKENS,
        return_token_type_ids=False,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": _TILE, "width": _TILE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**vision_sizes(image_size=_TILE, patch_size=_PATCH, attention_bias=True)),
        text_config={
            "model_type": "qwen2",
            **qwen_text_config(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
        },
        image_token_id=token_id(tokenizer, "<IMG_CONTEXT>"),
        image_seq_length=_IMAGE_SEQ_LENGTH,
        downsample_ratio=_DOWNSAMPLE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    end_of_text, im_end = qwen_ids(tokenizer)
    save_model(
        InternVLForConditionalGeneration,
        config,
        out,
        seed,
        bos_token_id=end_of_text,
        eos_token_id=im_end,
        pad_token_id=end_of_text,
    )
    # The layout of OpenGVLab/InternVL3-1B-hf: an InternVLProcessor cannot be built without its
    # video processor, which needs torchvision (the real checkpoint also has a
    # video_preprocessor_config.json). The chat template goes with the tokenizer (chat_template.jinja).
    save_processor_parts(
        out,
        tokenizer,
        image_processor,
        {"image_seq_length": _IMAGE_SEQ_LENGTH, "processor_class": InternVLProcessor.__name__},
    )
