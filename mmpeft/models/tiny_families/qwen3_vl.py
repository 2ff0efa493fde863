"""Tiny Qwen3-VL, mimicking Qwen/Qwen3-VL-2B-Instruct (`Qwen3VLForConditionalGeneration`).

Qwen3-VL differs from Qwen2/2.5-VL in ways the tiny model keeps: 16-pixel patches (2x2-merged)
over a learned position embedding that is interpolated to each image's grid, DeepStack (the
features of intermediate vision layers, each through its own merger, are added to the hidden
states of the first text layers at the image positions), interleaved mRoPE, a text model with
q/k norms and an explicit head_dim, tied embeddings, the Qwen3 tokenizer (Qwen2.5's plus
<tool_response>/<think> tokens) and a chat template with no default system prompt.
"""

from __future__ import annotations

import pathlib

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from mmpeft.models.tiny import (
    _TEXT_HEADS,
    _TEXT_HIDDEN,
    build_qwen_vl,
    qwen_image_processor,
    qwen_text_config,
    qwen_tokenizer,
    qwen_vision_config,
)
from mmpeft.models.tiny_families.qwen2_5_vl import QWEN2_5_ADDED_TOKENS, QWEN2_5_NOT_SPECIAL

_QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")  # 151665-151668, not special

# The real patch size; the pixel budget is scaled down instead: every image is resized to about
# 128x128 pixels (sides rounded to 32), 8x8 patches, 2x2-merged into 16 image tokens for a square
# image and a few more or fewer for others.
_PATCH = 16
_PIXELS = 128 * 128
# The learned position embedding covers an 8x8 patch grid (real: 2304 = 48x48), bilinearly
# interpolated to other grids.
_POSITION_EMBEDDINGS = (128 // _PATCH) ** 2
# head_dim 16 gives 8 rotary frequencies; interleaved mRoPE gives H the ones at 1, 4 and W those at
# 2, 5 (mrope_section[d] * 3 bounds each), T the rest: as the real [24, 20, 20] does for 64.
_MROPE_SECTION = [4, 2, 2]

# Qwen/Qwen3-VL-2B-Instruct's template (same in every Qwen3-VL Instruct checkpoint). It writes the
# system message's text the same way with and without tools, and a tool message's content as a
# user message's (text, plus a vision block per image or video): each fragment is written once here.
_SYSTEM_TEXT = r"""        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
"""
_CONTENT = r"""        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
"""
_CHAT_TEMPLATE = (
    r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
"""
    + _SYSTEM_TEXT
    + r"""        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
"""  # noqa: E501  the template's own lines, kept as is
    + _SYSTEM_TEXT
    + r"""        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
"""
    + _CONTENT
    + r"""        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
"""
    + _CONTENT
    + r"""        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
)


def build(out: pathlib.Path, seed: int) -> None:
    tokenizer = qwen_tokenizer(
        QWEN2_5_ADDED_TOKENS + _QWEN3_EXTRA_TOKENS,
        not_special=QWEN2_5_NOT_SPECIAL | frozenset(_QWEN3_EXTRA_TOKENS),
        chat_template=_CHAT_TEMPLATE,
    )
    image_processor = qwen_image_processor(
        patch_size=_PATCH, min_pixels=_PIXELS, max_pixels=_PIXELS, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    build_qwen_vl(
        out,
        seed,
        Qwen3VLForConditionalGeneration,
        Qwen3VLConfig,
        tokenizer,
        image_processor,
        text_config=qwen_text_config(
            tokenizer,
            head_dim=_TEXT_HIDDEN // _TEXT_HEADS,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": _MROPE_SECTION,
                "mrope_interleaved": True,
            },
            tie_word_embeddings=True,
        ),
        vision_config=qwen_vision_config(
            _PATCH,
            num_position_embeddings=_POSITION_EMBEDDINGS,
            # real: [5, 11, 17] of 24 blocks; here block 0's output feeds the first text layer
            deepstack_visual_indexes=[0],
        ),
        tie_word_embeddings=True,
    )
