"""Tiny Mistral 3, mimicking mistralai/Mistral-Small-3.1-24B-Instruct-2503.

Pixtral vision tower, 2x2 patch merger, Mistral text model, Tekken-style vocabulary (Mistral's
control tokens first). The Pixtral image processor keeps each image's aspect ratio, scaling it
down to fit ``longest_edge`` and rounding its sides up to the merged-patch size, so the
processor writes one [IMG] per merged patch, an [IMG_BREAK] after each row and [IMG_END] in
place of the last break: the token count varies with the image (here 2 to 20 per image).

transformers' PixtralProcessor module imports torchvision, so the processor is saved part by
part (as in the hub repo) rather than built here.
"""

from __future__ import annotations

import pathlib

from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessorPil,
    PixtralVisionConfig,
)

from mmpeft.models.tiny import (
    byte_level_tokenizer,
    regex_byte_level,
    save_model,
    save_processor_parts,
    text_sizes,
    token_ids,
    vision_sizes,
)

# 8x8 patches merged 2x2: one image token per 16x16 pixels, images fitted into 64x64, so at most
# 4x4 [IMG] tokens (real: 14x14 patches, merged 2x2, longest edge 1540: 55x55).
_PATCH = 8
_MERGE = 2
_LONGEST_EDGE = 64

# Mistral's control tokens with their real ids 0-19 ([IMG] = 10, <pad> = 11, ...); the real
# vocabulary also reserves <SPECIAL_20> to <SPECIAL_999> before the learned tokens.
_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)
_IMAGE_TOKENS = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
# Tekken's pre-tokenisation (tiktoken style; case-aware words, single digits).
_PRETOKENIZE_REGEX = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"""
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# mistralai/Mistral-Small-3.1-24B-Instruct-2503's chat_template.json, as is. Its quirks: it
# writes <s> itself (and the tokenizer adds another one unless add_special_tokens=False); without
# a system message it inserts a default one holding today's date (strftime_now); images become
# [IMG] in place; the answer follows "[/INST]" directly and ends with </s>; there is no
# generation prompt (add_generation_prompt changes nothing); only the first text part of a
# system or assistant message is kept.
_CHAT_TEMPLATE = """{%- set today = strftime_now("%Y-%m-%d") %}
{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.\\nYour knowledge base was last updated on 2023-10-01. The current date is " + today + ".\\n\\nWhen you're not sure about some information, you say that you don't have the information and don't make up anything.\\nIf the user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. \\"What are some good restaurants around me?\\" => \\"Where are you?\\" or \\"When is the next flight to Tokyo\\" => \\"Where do you travel from?\\")" %}

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content'] %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text'] %}
    {%- endif %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST]' }}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] in ['image', 'image_url'] %}
                    {{- '[IMG]' }}
                {%- else %}
                    {{- raise_exception('Only text and image blocks are supported in message content!') }}
                {%- endif %}
            {%- endfor %}
            {{- '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'system' %}
        {%- if message['content'] is string %}
            {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
        {%- else %}
            {{- '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'] is string %}
            {{- message['content'] + eos_token }}
        {%- else %}
            {{- message['content'][0]['text'] + eos_token }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""  # noqa: E501  the template's own lines, kept as is


def build(out: pathlib.Path, seed: int) -> None:
    tokenizer = byte_level_tokenizer(
        _SPECIALS,
        [],
        regex_byte_level(_PRETOKENIZE_REGEX),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        chat_template=_CHAT_TEMPLATE,
    )
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": _LONGEST_EDGE}, patch_size={"height": _PATCH, "width": _PATCH}
    )
    ids = token_ids(tokenizer, _SPECIALS)
    special_ids = {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]}
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(**vision_sizes(head_dim=16, image_size=_LONGEST_EDGE, patch_size=_PATCH)),
        text_config=MistralConfig(
            **text_sizes(vocab_size=len(tokenizer), **special_ids),
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000_000.0},
            tie_word_embeddings=False,
        ),
        image_token_index=ids["[IMG]"],
        spatial_merge_size=_MERGE,
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
    )
    save_model(Mistral3ForConditionalGeneration, config, out, seed, **special_ids)
    save_processor_parts(
        out,
        tokenizer,
        image_processor,
        {"processor_class": "PixtralProcessor", "patch_size": _PATCH, "spatial_merge_size": _MERGE, **_IMAGE_TOKENS},
    )
