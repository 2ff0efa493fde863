"""Tiny Idefics3: mimics HuggingFaceM4/Idefics3-8B-Llama3 (Llama 3 text model, SigLIP tower, pixel shuffle).

Also the home of what SmolVLM (the same architecture, see ``smolvlm.py``) shares with it: the
image splitting geometry, the vision tower and the Llama text model.

Image splitting as in the real processor: every image is resized so that its longest edge is
four tiles (1456 = 4 x 364 pixels in Idefics3), padded up to whole tiles, cut into rows x cols
tiles and followed by a global image resized to one tile. One ``<image>`` placeholder becomes,
per tile, ``<fake_token_around_image><row_r_col_c>`` + ``<image>`` x image_seq_len (a newline
after each row), then ``\\n<fake_token_around_image><global-img>`` + ``<image>`` x image_seq_len +
``<fake_token_around_image>``. Here a tile is 16 pixels, cut into 4x4 patches of 4 pixels and
pixel-shuffled by 2 into 4 image tokens (the real 364 / 14 = 26x26 patches shuffled into 169):
a 40x30 image gives 3 rows x 4 cols + 1 = 13 tiles (52 ``<image>``), a square one 17 (68).
"""

from __future__ import annotations

import pathlib
from typing import Any

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import PILImageResampling

from mmpeft.models.tiny import llama3_tokenizer, save_model, text_sizes, token_ids, vision_sizes

# Idefics3: 16-pixel tiles of 4x4 patches, pixel shuffle by 2 -> (16 / 4)^2 / 2^2 = 4 image tokens a tile.
_TILE = 16
_PATCH = 4
_SCALE = 2
# Images are resized to a longest edge of this many tiles before splitting (1456 = 4 x 364 in
# Idefics3, 2048 = 4 x 512 in SmolVLM): up to 4 x 4 tiles plus the global one.
_TILES_PER_EDGE = 4

_BOS, _EOS, _PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"
_FAKE_IMAGE, _IMAGE, _END_OF_UTTERANCE = "<fake_token_around_image>", "<image>", "<end_of_utterance>"


# The template of HuggingFaceM4/Idefics3-8B-Llama3 (opened with <|begin_of_text|>, which the
# tokenizer adds once more) and of SmolVLM (opened with <|im_start|>). Quirks kept: "User:" takes no
# space when the message starts with an image; the generation prompt "Assistant:" has no trailing
# space, while a finished assistant turn is "Assistant: " + text; string content is not supported
# (it renders as an empty message); a system message becomes "System: ...".
def chat_template(start: str, extra_parts: str = "") -> str:
    """The Idefics3/SmolVLM template opened with ``start``; ``extra_parts`` adds ``{% elif %}`` branches for other
    part types."""
    return (
        start + "{% for message in messages %}{{message['role'] | capitalize}}"
        "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
        "{% for line in message['content'] %}"
        "{% if line['type'] == 'text' %}{{line['text']}}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}" + extra_parts + "{% endif %}"
        "{% endfor %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


def image_seq_len(tile: int, patch: int, scale: int) -> int:
    """``<image>`` tokens per tile: the tile's (tile / patch)^2 patches pixel-shuffled by ``scale``."""
    return (tile // patch) ** 2 // scale**2


def image_processor_kwargs(tile: int) -> dict[str, Any]:
    """Settings of an Idefics3/SmolVLM image processor with ``tile``-pixel tiles (the real ones store these)."""
    return {
        "do_image_splitting": True,
        "size": {"longest_edge": _TILES_PER_EDGE * tile},
        "max_image_size": {"longest_edge": tile},
        "resample": PILImageResampling.LANCZOS,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def vision_config(tile: int, patch: int) -> dict[str, Any]:
    """A tiny SigLIP-style vision tower seeing one ``tile`` at a time."""
    return vision_sizes(image_size=tile, patch_size=patch)


def llama_text_config(
    vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int, rope_theta: float
) -> dict[str, Any]:
    """The tiny Llama text model of Idefics3 (Llama 3) and SmolVLM (SmolLM2)."""
    return {
        "model_type": "llama",
        **text_sizes(vocab_size=vocab_size),
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def _tokenizer() -> PreTrainedTokenizerFast:
    # Llama 3 layout: the BPE vocabulary, then <|begin_of_text|>, <|end_of_text|>,
    # <|reserved_special_token_0|> (128000-128002), then Idefics3's three tokens (128256-128258).
    # <row_r_col_c> and <global-img> are not tokens in Idefics3: they are tokenized as text.
    return llama3_tokenizer(
        [_BOS, _EOS, _PAD, _FAKE_IMAGE, _IMAGE, _END_OF_UTTERANCE],
        eos_token=_END_OF_UTTERANCE,
        pad_token=_PAD,
        extra_special_tokens=[_FAKE_IMAGE, _IMAGE, _END_OF_UTTERANCE],
        padding_side="left",
    )


def build(out: pathlib.Path, seed: int) -> None:
    tokenizer = _tokenizer()
    seq_len = image_seq_len(_TILE, _PATCH, _SCALE)
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(**image_processor_kwargs(_TILE)),
        tokenizer=tokenizer,
        image_seq_len=seq_len,
        chat_template=chat_template(_BOS),
    )
    ids = token_ids(tokenizer, (_BOS, _EOS, _PAD, _IMAGE, _END_OF_UTTERANCE))
    config = Idefics3Config(
        vision_config=vision_config(_TILE, _PATCH),
        text_config=llama_text_config(len(tokenizer), ids[_PAD], ids[_BOS], ids[_EOS], rope_theta=500_000.0),
        image_token_id=ids[_IMAGE],
        scale_factor=_SCALE,
        pad_token_id=ids[_PAD],
    )
    save_model(
        Idefics3ForConditionalGeneration,
        config,
        out,
        seed,
        bos_token_id=ids[_BOS],
        eos_token_id=[ids[_EOS], ids[_END_OF_UTTERANCE]],
        pad_token_id=ids[_PAD],
    )
    processor.save_pretrained(out)
