"""Tiny LLaVA-NeXT, mimicking llava-hf/llava-v1.6-mistral-7b-hf.

CLIP vision tower, Mistral text model, anyres image patches: every image becomes a base view
plus a grid of crops chosen from ``image_grid_pinpoints`` by its aspect ratio, so the number of
``<image>`` tokens varies with the image size and shape, as in the real model (here about 19 to
51 per image).

Also home of the helpers the other tiny families of this folder share (text sizes, byte-level
tokenizer, anyres grid).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from tokenizers import pre_tokenizers
from transformers import (
    BaseImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
)

from mmpeft.models.tiny import (
    _MAX_POSITIONS,
    _TARGET_VOCAB,
    _TEXT_HEADS,
    _TEXT_HIDDEN,
    _TEXT_INIT_STD,
    _TEXT_INTERMEDIATE,
    _TEXT_KV_HEADS,
    _TEXT_LAYERS,
    _save_model,
    _token_id,
    _train_bpe,
)

# A 24x24 view cut into 8x8 CLIP patches: 3x3 = 9 features per view (real: 336 / 14 = 24x24 = 576).
_IMAGE_SIZE = 24
_PATCH = 8
# Real pinpoints as (rows, columns) of 336-pixel views: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]].
_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))

_SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>", "pad": "<pad>"}

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


def text_sizes(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of the shared tiny text-model size, for any Llama-like text config."""
    return {
        "hidden_size": _TEXT_HIDDEN,
        "intermediate_size": _TEXT_INTERMEDIATE,
        "num_hidden_layers": _TEXT_LAYERS,
        "num_attention_heads": _TEXT_HEADS,
        "num_key_value_heads": _TEXT_KV_HEADS,
        "max_position_embeddings": _MAX_POSITIONS,
        "initializer_range": _TEXT_INIT_STD,
        **overrides,
    }


def byte_level_tokenizer(
    leading: list[str],
    trailing: list[str],
    pre_tokenizer: pre_tokenizers.PreTokenizer | None = None,
    **kwargs: Any,
) -> PreTrainedTokenizerFast:
    """A ~1000-token byte-level BPE: ``leading`` special tokens take the first ids (as <unk>, <s>,
    </s> in Llama/Mistral vocabularies), ``trailing`` ones follow the learned vocabulary (as
    LLaVA's <image> or Llama 3's <|...|> tokens). ``kwargs`` go to PreTrainedTokenizerFast."""
    backend = _train_bpe(
        pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False), leading, _TARGET_VOCAB - len(trailing)
    )
    backend.add_special_tokens(trailing)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=_MAX_POSITIONS, **kwargs)


def pinpoints(view: int, grids: tuple[tuple[int, int], ...]) -> list[list[int]]:
    """``image_grid_pinpoints`` (height, width in pixels) of anyres grids of ``view``-pixel crops."""
    return [[rows * view, cols * view] for rows, cols in grids]


def save_processor_parts(
    out: pathlib.Path,
    processor_class: str,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: BaseImageProcessor,
    chat_template: str,
    **settings: Any,
) -> None:
    """Save a processor that cannot be built here part by part, as its hub repo lays it out:
    tokenizer files, preprocessor_config.json, processor_config.json with the processor's own
    settings, and the chat template (chat_template.jinja). For processors whose class needs
    torchvision (its video processor, or its module): ``AutoProcessor`` rebuilds them from these
    files where torchvision is installed."""
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    config = {"processor_class": processor_class, **settings}
    (out / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build(out: pathlib.Path, seed: int) -> None:
    specials = _SPECIALS
    # <unk>, <s>, </s> take ids 0-2; <image> and <pad> follow the vocabulary (32000, 32001 in the real one).
    tokenizer = byte_level_tokenizer(
        [specials["unk"], specials["bos"], specials["eos"]],
        [specials["image"], specials["pad"]],
        bos_token=specials["bos"],
        eos_token=specials["eos"],
        unk_token=specials["unk"],
        pad_token=specials["pad"],
        extra_special_tokens={"image_token": specials["image"]},
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",  # as in the real tokenizer_config.json
    )
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
    ids = {name: _token_id(tokenizer, token) for name, token in specials.items()}
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=_IMAGE_SIZE,
            patch_size=_PATCH,
            projection_dim=32,
        ),
        text_config=MistralConfig(
            **text_sizes(),
            vocab_size=len(tokenizer),
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        ),
        image_token_index=ids["image"],
        image_grid_pinpoints=grid_pinpoints,
        image_seq_length=(_IMAGE_SIZE // _PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    _save_model(LlavaNextForConditionalGeneration, config, generation_config, out, seed)
    processor.save_pretrained(out)
