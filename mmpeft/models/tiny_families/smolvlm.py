"""Tiny SmolVLM: mimics HuggingFaceTB/SmolVLM2-256M-Video-Instruct (SmolLM2 text model, SigLIP tower).

The architecture and image splitting are Idefics3's (see ``idefics3.py``); what differs is the
SmolLM2 tokenizer (GPT-2 class, no BOS added, the template writes ``<|im_start|>``), the tile
tokens ``<global-img>`` and ``<row_r_col_c>`` being single special tokens, a pixel shuffle by 4
(512 / 16 = 32x32 patches -> 64 image tokens a tile in the real model) and a processor with a
video processor. Here a tile is 32 pixels, cut into 8x8 patches of 4 pixels and shuffled by 4 into 4 image
tokens; images are resized to a longest edge of 4 tiles, so a 40x30 image gives 3 x 4 tiles + 1
global (52 ``<image>``), a square one 17 (68).

The processor needs the ``num2words`` package, and its video processor needs torchvision: without
torchvision a ``SmolVLMProcessor`` cannot be built, not even with ``video_processor=None``. So the
files are written part by part in the real checkpoint's layout: ``processor_config.json``
(``image_seq_len``), ``chat_template.json``, ``preprocessor_config.json`` (the image settings, and
the video settings under ``video_sampling``, where transformers' video processor reads them) and
the tokenizer files.
"""

from __future__ import annotations

import json
import pathlib

from transformers import GPT2Tokenizer, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

from mmpeft.models.tiny import _MAX_POSITIONS, bpe_vocab, save_model, save_processor_parts, token_ids, write_json
from mmpeft.models.tiny_families.idefics3 import (
    chat_template,
    image_processor_kwargs,
    image_seq_len,
    llama_text_config,
    vision_config,
)

# 32-pixel tiles cut into 8x8 patches of 4 pixels, pixel-shuffled by 4 (SmolVLM's factor): 4 tokens a tile.
_TILE = 32
_PATCH = 4
_SCALE = 4
# SmolVLM2's video sampling (frames are single tiles).
_VIDEO_SAMPLING = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": _TILE}}

# SmolLM2's first tokens (ids 0-2), then the BPE vocabulary, then SmolVLM's image tokens in the
# real order (49152: <global-img>, 49153-49188: <row_1_col_1>...<row_6_col_6>,
# 49189: <fake_token_around_image>, 49190: <image>, ... 49279: <end_of_utterance>).
_ENDOFTEXT, _IM_START, _IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
_GLOBAL_IMAGE, _FAKE_IMAGE, _IMAGE, _END_OF_UTTERANCE = (
    "<global-img>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
)
_ROW_COL = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))
_IMAGE_TOKENS = (_GLOBAL_IMAGE, *_ROW_COL, _FAKE_IMAGE, _IMAGE, _END_OF_UTTERANCE)

# HuggingFaceTB/SmolVLM2-256M-Video-Instruct's template: Idefics3's, opened with <|im_start|> and
# with a <video> branch. The tokenizer adds no BOS, so <|im_start|> appears once.
_CHAT_TEMPLATE = chat_template("<|im_start|>", "{% elif line['type'] == 'video' %}{{ '<video>' }}")


def _tokenizer() -> GPT2Tokenizer:
    vocab, merges = bpe_vocab(leading=(_ENDOFTEXT, _IM_START, _IM_END), trailing=_IMAGE_TOKENS)
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=_ENDOFTEXT,
        bos_token=_IM_START,
        eos_token=_END_OF_UTTERANCE,
        pad_token=_IM_END,
        add_prefix_space=False,
        model_max_length=_MAX_POSITIONS,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [_IM_START, _IM_END, *_IMAGE_TOKENS]})
    return tokenizer


def build(out: pathlib.Path, seed: int) -> None:
    tokenizer = _tokenizer()
    ids = token_ids(tokenizer, (_IM_START, _IM_END, _IMAGE, _END_OF_UTTERANCE))
    config = SmolVLMConfig(
        vision_config=vision_config(_TILE, _PATCH),
        text_config=llama_text_config(
            len(tokenizer), ids[_IM_END], ids[_IM_START], ids[_END_OF_UTTERANCE], rope_theta=100_000.0
        ),
        image_token_id=ids[_IMAGE],
        scale_factor=_SCALE,
        pad_token_id=ids[_IM_END],
    )
    save_model(
        SmolVLMForConditionalGeneration,
        config,
        out,
        seed,
        bos_token_id=ids[_IM_START],
        eos_token_id=ids[_END_OF_UTTERANCE],
        pad_token_id=ids[_IM_END],
    )
    # The layout of the real checkpoint, part by part (see the module docstring): the video
    # settings join the image processor's, the chat template goes to chat_template.json.
    save_processor_parts(
        out,
        tokenizer,
        SmolVLMImageProcessorPil(**image_processor_kwargs(_TILE)),
        {"image_seq_len": image_seq_len(_TILE, _PATCH, _SCALE), "processor_class": "SmolVLMProcessor"},
    )
    image_settings = out / "preprocessor_config.json"
    video = {"processor_class": "SmolVLMProcessor", "video_sampling": _VIDEO_SAMPLING}
    write_json(image_settings, {**json.loads(image_settings.read_text()), **video})
    write_json(out / "chat_template.json", {"chat_template": _CHAT_TEMPLATE})
