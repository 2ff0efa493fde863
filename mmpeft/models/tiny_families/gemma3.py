"""Tiny Gemma 3: mimics google/gemma-3-4b-it (Gemma 3 text model, SigLIP tower, average-pooled projector).

Also the home of what PaliGemma (``paligemma.py``) shares with it: the Gemma tokenizer and the
Gemma text-model settings.

Every image is resized to one square (896 pixels in the real model, 32 here) and always gives
``mm_tokens_per_image`` tokens: SigLIP's (32 / 4)^2 = 64 patches are average-pooled 2x2 into 16
(the real 64x64 patches pooled 4x4 into 256). Pan-and-scan crops, which would add tokens for
elongated images, are off as in the real processor's defaults, so the count does not vary. In the
text, the template's ``<start_of_image>`` becomes ``\\n\\n<start_of_image>`` + ``<image_soft_token>``
x 16 + ``<end_of_image>\\n\\n``, and the processor returns ``token_type_ids`` (1 on the soft tokens),
which the model turns into bidirectional attention within each image.
"""

from __future__ import annotations

import pathlib
from typing import Any

from tokenizers import pre_tokenizers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GemmaTokenizer,
)
from transformers.image_utils import PILImageResampling

from mmpeft.models.tiny import (
    _MAX_POSITIONS,
    _TEXT_HEADS,
    _TEXT_HIDDEN,
    bpe_vocab,
    save_model,
    siglip_vision_config,
    text_sizes,
    token_ids,
)

# 32-pixel images cut into 8x8 patches of 4 pixels, pooled to 4x4 = 16 image tokens.
_IMAGE_SIZE = 32
_PATCH = 4
_MM_TOKENS = 16
# Sliding-window layers see 64 tokens: the real 1024 is 4 images' worth of tokens, as 64 is here.
_SLIDING_WINDOW = 64

# Every Gemma vocabulary starts <pad> <eos> <bos> <unk> <mask> (ids 0-4) and has the turn tokens
# (106, 107) and 256 byte-fallback tokens <0x00>..<0xFF> before its learned pieces.
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
_BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
# Gemma 3's image tokens: 255999, 256000 and, after the unused ids, 262144.
_BOI, _EOI, _IMAGE_SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"

# google/gemma-3-4b-it's template (processor and tokenizer). It writes <bos> itself, while the
# tokenizer adds one too; a system message becomes a prefix of the first user turn; roles must
# alternate; the assistant is "model"; text parts are trimmed.
_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def gemma_tokenizer(trailing: int, **kwargs: Any) -> GemmaTokenizer:
    """A ``GemmaTokenizer`` (BPE with byte fallback, spaces written as "▁", no prefix space) of
    about 1000 tokens, ``trailing`` of which the caller adds after the learned pieces.

    ``GemmaTokenizer`` rebuilds its pipeline from the vocabulary and merges on load, so the pieces
    are learned on the same "▁"-joined words it produces.
    """
    vocab, merges = bpe_vocab(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        [*GEMMA_SPECIALS, *GEMMA_TURN_TOKENS, *_BYTE_TOKENS],
        added_later=trailing,
    )
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=_MAX_POSITIONS,
        **kwargs,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(GEMMA_TURN_TOKENS)})
    return tokenizer


def gemma_text_config(vocab_size: int, sliding_window: int) -> dict[str, Any]:
    """Text-model settings common to Gemma 2 and Gemma 3: query scaling by head_dim, sliding-window
    layers alternating with global ones, <pad>/<eos>/<bos> at ids 0/1/2, tied embeddings."""
    head_dim = _TEXT_HIDDEN // _TEXT_HEADS
    return {
        **text_sizes(vocab_size=vocab_size),
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,  # 256 = head_dim in the real 2B/4B models
        "sliding_window": sliding_window,
        "layer_types": ["sliding_attention", "full_attention"],
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }


def build(out: pathlib.Path, seed: int) -> None:
    tokenizer = gemma_tokenizer(
        3,
        extra_special_tokens={"boi_token": _BOI, "eoi_token": _EOI, "image_token": _IMAGE_SOFT},
        chat_template=_CHAT_TEMPLATE,
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(
            size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
            resample=PILImageResampling.BILINEAR,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            image_seq_length=_MM_TOKENS,
        ),
        tokenizer=tokenizer,
        chat_template=_CHAT_TEMPLATE,
        image_seq_length=_MM_TOKENS,
    )
    ids = token_ids(tokenizer, (_BOI, _EOI, _IMAGE_SOFT, "<end_of_turn>"))
    config = Gemma3Config(
        text_config={
            **gemma_text_config(len(tokenizer), _SLIDING_WINDOW),
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        },
        vision_config=siglip_vision_config(_IMAGE_SIZE, _PATCH),
        mm_tokens_per_image=_MM_TOKENS,
        boi_token_index=ids[_BOI],
        eoi_token_index=ids[_EOI],
        image_token_index=ids[_IMAGE_SOFT],
    )
    # The real generation config also samples (do_sample, top_k=64, top_p=0.95); only the ids here.
    save_model(
        Gemma3ForConditionalGeneration,
        config,
        out,
        seed,
        bos_token_id=2,
        eos_token_id=[1, ids["<end_of_turn>"]],
        pad_token_id=0,
    )
    processor.save_pretrained(out)
