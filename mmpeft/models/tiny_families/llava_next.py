"""Tiny LLaVA-NeXT, mimicking llava-hf/llava-v1.6-mistral-7b-hf.

CLIP vision tower, Mistral text model, anyres image patches: every image becomes a base view
plus a grid of crops chosen from ``image_grid_pinpoints`` by its aspect ratio, so the number of
``<image>`` tokens varies with the image size and shape, as in the real model (here about 19 to
51 per image).
"""

from __future__ import annotations

import pathlib

from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    MistralConfig,
)

from mmpeft.models.tiny import (
    _LLAVA_SPECIALS,
    llava_special_ids,
    llava_tokenizer,
    pinpoints,
    save_model,
    text_sizes,
    token_id,
    vision_sizes,
)

# A 24x24 view cut into 8x8 CLIP patches: 3x3 = 9 features per view (real: 336 / 14 = 24x24 = 576).
_IMAGE_SIZE = 24
_PATCH = 8
# Real pinpoints as (rows, columns) of 336-pixel views: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]].
_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))

# llava-hf/llava-v1.6-mistral-7b-hf's chat_template.json, as is: images before the text of a
# turn, no BOS (the tokenizer adds <s>), "</s> " after each answer, an optional Llama-2 style
# system block, no generation prompt (a prompt ends with " [/INST]" whatever
# add_generation_prompt says), and list content only (``content[0]['text']`` for system and
# assistant turns; string content raises).
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)


def build(out: pathlib.Path, seed: int) -> None:
    tokenizer = llava_tokenizer(padding_side="left")  # as in the real tokenizer_config.json
    grid_pinpoints = pinpoints(_IMAGE_SIZE, _GRIDS)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE},
        crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        image_grid_pinpoints=grid_pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by "default"
        chat_template=_CHAT_TEMPLATE,
    )
    special_ids = llava_special_ids(tokenizer)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision_sizes(image_size=_IMAGE_SIZE, patch_size=_PATCH, projection_dim=32)),
        text_config=MistralConfig(
            **text_sizes(vocab_size=len(tokenizer), **special_ids),
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        ),
        image_token_index=token_id(tokenizer, _LLAVA_SPECIALS["image"]),
        image_grid_pinpoints=grid_pinpoints,
        image_seq_length=(_IMAGE_SIZE // _PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    save_model(LlavaNextForConditionalGeneration, config, out, seed, **special_ids)
    processor.save_pretrained(out)
