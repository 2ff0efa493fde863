"""Tiny Mllama, mimicking meta-llama/Llama-3.2-11B-Vision-Instruct.

Images do not become tokens in the text: each image is one ``<|image|>`` token, and the text
model attends to the image's tiles through cross-attention layers, masked per token by
``cross_attention_mask`` (batch, text length, images, tiles) that the processor builds. An image
is resized onto the best canvas of up to 4 square tiles (1x1, 1x2, 2x1, 2x2, 1x3, ...), so its
tile count varies with its size and shape, as in the real model; ``aspect_ratio_ids`` and
``aspect_ratio_mask`` tell the vision model which arrangement each image took.
"""

from __future__ import annotations

import math
import pathlib

from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaVisionConfig,
    PreTrainedModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mmpeft.models.tiny import (
    _VISION_HEADS,
    _VISION_HIDDEN,
    _VISION_INTERMEDIATE,
    _VISION_LAYERS,
    llama3_tokenizer,
    save_model,
    text_sizes,
    token_ids,
)

# Tiles of 32x32 pixels cut into 8x8 patches: 16 patches + CLS per tile (real: 560 / 14 = 40x40 + 1).
_TILE = 32
_PATCH = 8
_MAX_TILES = 4
# Local-encoder layers whose outputs join the last hidden state (real: [3, 7, 15, 23, 30] of 32).
_INTERMEDIATE_LAYERS = [0, 1]
# Two self-attention layers (the shared text size) with a cross-attention layer between them
# (real: 40 layers, cross-attention at [3, 8, 13, 18, 23, 28, 33, 38]).
_TEXT_LAYERS = 3
_CROSS_ATTENTION_LAYERS = [1]

# The tanh gates of the cross-attention layers, the vision model's global layers and its
# position/tile embeddings: a trained model's are open, a fresh one's are (near) 0, which would cut
# the images off and leave the cross-attention layers without gradients. Opened to pi/4 (tanh =
# 0.66), the value MllamaVisionEncoderLayer itself starts its gates at.
_GATE_SUFFIXES = ("cross_attn_attn_gate", "cross_attn_mlp_gate", ".gate", ".gate_attn", ".gate_ffn")
_GATE_VALUE = math.pi / 4

# Llama 3's special tokens in their order (128000-128010 in the real vocabulary), then <|image|>
# (128256), which lies past the text model's vocab_size: the embedding table has 8 extra rows
# for it, the LM head none.
_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
# meta-llama/Llama-3.2-11B-Vision-Instruct's chat template, as is. Its quirks: it writes
# <|begin_of_text|> itself (and the tokenizer adds another one unless add_special_tokens=False);
# a chat without images gets a system block with "Cutting Knowledge Date" and today's date
# (strftime_now), a chat with images gets none and refuses a system message; content may be a
# string or a list of parts, each image part becoming <|image|> in place; every turn ends with
# <|eot_id|>; tools go into the first user message.
_CHAT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}      
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\\n" }}
    {{- "Today Date: " + date_string + "\\n\\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\\n\\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\\n\\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501  the template's own lines, kept as is


def build(out: pathlib.Path, seed: int) -> None:
    tokenizer = llama3_tokenizer(
        _SPECIALS, eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>", chat_template=_CHAT_TEMPLATE
    )
    image_processor = MllamaImageProcessorPil(
        size={"height": _TILE, "width": _TILE},
        max_image_tiles=_MAX_TILES,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=_CHAT_TEMPLATE)
    ids = token_ids(tokenizer, _SPECIALS)
    bos, pad, image = ids["<|begin_of_text|>"], ids["<|finetune_right_pad_id|>"], ids["<|image|>"]
    stop = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    config = MllamaConfig(
        vision_config=MllamaVisionConfig(
            hidden_size=_VISION_HIDDEN,
            intermediate_size=_VISION_INTERMEDIATE,
            num_hidden_layers=_VISION_LAYERS,
            num_global_layers=1,
            attention_heads=_VISION_HEADS,
            image_size=_TILE,
            patch_size=_PATCH,
            max_num_tiles=_MAX_TILES,
            intermediate_layers_indices=_INTERMEDIATE_LAYERS,
            vision_output_dim=_VISION_HIDDEN * (1 + len(_INTERMEDIATE_LAYERS)),
        ),
        text_config=MllamaTextConfig(
            **text_sizes(num_hidden_layers=_TEXT_LAYERS),
            cross_attention_layers=_CROSS_ATTENTION_LAYERS,
            vocab_size=image,  # <|image|> is the last token
            # Llama 3.1's rope scaling; the real original length is 8192 of 131072 positions, but it
            # must stay below the tiny max_position_embeddings.
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
            bos_token_id=bos,
            eos_token_id=stop[0],
            pad_token_id=pad,
        ),
        image_token_index=image,
    )
    # The real generation_config.json samples by default.
    save_model(
        MllamaForConditionalGeneration,
        config,
        out,
        seed,
        adjust=_open_gates,
        bos_token_id=bos,
        eos_token_id=stop,
        pad_token_id=pad,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    processor.save_pretrained(out)


def _open_gates(model: PreTrainedModel) -> None:
    for name, parameter in model.named_parameters():
        if name.endswith(_GATE_SUFFIXES):
            parameter.fill_(_GATE_VALUE)
