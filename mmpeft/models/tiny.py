"""Tiny, randomly initialised multimodal checkpoints of real transformers architectures.

`build_tiny_model` writes a folder that loads back through exactly the path a real
checkpoint takes (`AutoProcessor.from_pretrained` / `AutoModelForImageTextToText.from_pretrained`,
optionally 4-bit through bitsandbytes), so tests and smoke runs exercise the same code as
production without network access or model downloads.

Everything is created locally: a byte-level BPE tokenizer trained on a small built-in corpus,
the family's image processor sized for ~16 image tokens per small image, a chat template that
mimics the real checkpoint's, and a model with a few thousand parameters per layer.

LLaVA and Qwen2-VL are built here; every other family in ``tiny_families/<family>.py``, from the
sizes and helpers below that the families share (tokenizer training, text and vision tower sizes,
model and processor saving).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BaseImageProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from mmpeft.files import staged_dir

__all__ = ["FAMILIES", "MARKER_FILE", "build_tiny_model"]

# Families whose builder lives in mmpeft/models/tiny_families/<family>.py (a ``build(out, seed)``
# function, imported only when that family is built).
_FAMILY_MODULES = (
    "llava_next",
    "llava_onevision",
    "qwen2_5_vl",
    "qwen3_vl",
    "mllama",
    "idefics3",
    "smolvlm",
    "gemma3",
    "paligemma",
    "internvl",
    "mistral3",
    "phi4_multimodal",
)
FAMILIES = ("llava", "qwen2_vl", *_FAMILY_MODULES)

# Written last: its presence means every other file of the build is complete.
MARKER_FILE = ".mmpeft-tiny.json"
# Bump when the layout of a build changes so stale caches are rebuilt rather than reused.
_BUILD_VERSION = 3

# Shared text-model size (every family; Mllama adds a cross-attention layer).
_TEXT_HIDDEN = 64
_TEXT_LAYERS = 2
_TEXT_HEADS = 4
_TEXT_KV_HEADS = 2
_TEXT_INTERMEDIATE = 128
_MAX_POSITIONS = 4096
_TARGET_VOCAB = 1000
# A random frozen LM head with the usual std of 0.02 bounds every logit at about
# 0.02 * hidden * 1 = 1.3, so no adapter could push the loss far below ln(vocab). A wider
# init gives the frozen head the logit range a trained one has, and the demo's loss room to fall.
_TEXT_INIT_STD = 0.1
# Shared vision-tower size (the ViT-style towers; Mllama's and the Qwen families' name them differently).
_VISION_HIDDEN = 32
_VISION_LAYERS = 2
_VISION_HEADS = 2
_VISION_INTERMEDIATE = 64

# LLaVA: a 32x32 crop cut into 8x8 CLIP patches gives 16 patches (+ CLS, dropped by "default").
_LLAVA_IMAGE_SIZE = 32
_LLAVA_PATCH = 8
# Qwen2-VL: every image is resized to roughly 64x64 pixels (keeping its aspect ratio, sides
# rounded to 16), cut into 8x8 patches and 2x2-merged: a square image becomes 16 image tokens,
# others a few more, and, as in the real model, the count varies with the image.
_QWEN_PATCH = 8
_QWEN_MERGE = 2
_QWEN_TEMPORAL_PATCH = 2
_QWEN_PIXELS = 64 * 64
# Text head_dim is 16, so rotary uses 8 frequency pairs split over (temporal, height, width);
# same 1:1.5:1.5 proportions as the real [16, 24, 24] for head_dim 128.
_QWEN_MROPE_SECTION = [2, 3, 3]

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_SHAPES = ("circle", "square", "triangle")
_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_POSITIONS = ("left", "right", "top", "bottom")

_NOUNS = (
    "cat dog bird fish horse cow sheep tree flower house car bus train boat ship plane road river lake sea "
    "mountain hill city town street garden park school teacher student book pen paper table chair door "
    "window wall floor roof kitchen bread apple banana water milk tea coffee cake ball game music song "
    "picture photo camera phone computer friend family mother father child baby man woman person day "
    "night morning evening week year time world country forest field farm beach island bridge tower "
    "market shop store restaurant hospital office library museum station airport village sky cloud "
    "rain snow wind storm star moon sun grass leaf stone sand box bag cup plate bottle glass key clock lamp "
    "question answer story letter number colour shape line circle corner edge middle side front back "
    "jacket shoe hat umbrella blanket pillow mirror basket ladder bicycle wheel engine rocket robot"
)
_VERBS = (
    "sees likes wants finds makes takes gives shows holds draws paints reads writes opens closes carries "
    "moves follows watches helps builds cleans cooks brings buys sells keeps leaves meets visits "
    "throws catches pushes pulls fixes counts sorts compares describes remembers"
)
_ADJECTIVES = (
    "big small old new happy sad bright dark warm cold long short tall round flat soft hard quick slow "
    "quiet loud clean dirty empty full heavy light young early late simple beautiful strange friendly "
    "shiny wooden plastic golden careful curious gentle narrow wide"
)

_LLAVA_SPECIALS = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>", "image": "<image>"}
_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Same pre-tokenisation as transformers' Qwen2Tokenizer, which rebuilds its pipeline from
# vocab/merges on load: training with anything else would tokenize differently after a reload.
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Llama 3's pre-tokenisation (tiktoken's cl100k pattern: digits in groups of up to three), used
# by Idefics3 and Mllama.
_LLAMA3_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Like llava-hf/llava-1.5-7b-hf ("USER: <image>\n... ASSISTANT: ...</s>"), but also accepts
# string content and an optional leading system message.
_LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}"
    "{%- set parts = message['content'] -%}"
    "{%- endif -%}"
    "{%- set text = parts | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ text + ' ' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'USER: ' }}"
    "{%- for part in parts | selectattr('type', 'equalto', 'image') -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{{ text + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT: ' + text + '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Qwen/Qwen2-VL-2B-Instruct's template.
_QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(
    family: str, out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False
) -> pathlib.Path:
    """Build, save and return `out_dir` holding a tiny random checkpoint of `family`.

    A complete build of the same family and seed already in `out_dir` is reused untouched
    unless `overwrite` is set. The build happens in a temporary sibling folder that is renamed
    into place at the end, so an interrupted build never leaves a complete-looking folder.
    A non-empty `out_dir` that is not a tiny-model build is only replaced with `overwrite=True`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {', '.join(FAMILIES)}")
    out = pathlib.Path(out_dir)
    wanted = {"family": family, "seed": seed, "version": _BUILD_VERSION}
    if not overwrite and _read_marker(out) == wanted:
        return out
    if out.exists() and any(out.iterdir()) and _read_marker(out) is None and not overwrite:
        raise FileExistsError(f"{out} is not empty and holds no tiny model build; pass overwrite=True to replace it")

    with staged_dir(out) as staging:
        _builder(family)(staging, seed)
        write_json(staging / MARKER_FILE, wanted)
    return out


def _read_marker(out: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: pathlib.Path, values: dict[str, Any]) -> None:
    """Write ``values`` as the hub's JSON files are: indented by 2, keys sorted, a final newline."""
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _corpus() -> list[str]:
    """A few hundred lines of simple English covering the synthetic data's vocabulary."""
    lines = [
        "Describe the image in one sentence.",
        "What is in the picture? Please answer the question with a short answer.",
        "You are a helpful assistant.",
        "USER: What do you see? ASSISTANT: I see a picture.",
        "system\nuser\nassistant\nThe system asks the user, and the assistant answers the user.",
        "Yes, that is right. No, that is not correct.",
        "The answer is yes. The answer is no.",
        "Count the objects and tell me the number.",
        "The image shows a simple scene with a few objects.",
        "0 1 2 3 4 5 6 7 8 9 10",
    ]
    for colour in _COLOURS:
        for shape in _SHAPES:
            lines += [
                f"There is a {colour} {shape} in the image.",
                f"What color is the {shape}? The {shape} is {colour}.",
                f"What shape is the {colour} object? It is a {shape}.",
                f"Is there a {colour} {shape} in the image? yes",
                f"Is there an {colour} {shape} on the left? no",
                # Chat-template words, so USER/ASSISTANT/user/assistant become single tokens.
                f"USER: What color is the {shape}? ASSISTANT: {colour}",
                f"user\nWhat shape is {colour}?\nassistant\nA {shape}.",
            ]
            for position in _POSITIONS:
                lines.append(f"The {colour} {shape} is on the {position} of the image.")
    for number, word in enumerate(_NUMBER_WORDS, start=1):
        lines += [
            f"How many shapes are there? There are {word} shapes.",
            f"How many shapes are there in the image? {number}",
            f"I can count {word} ({number}) shapes in the image.",
        ]
    # Everyday sentences built by striding through small word lists (co-prime strides give
    # varied combinations) so the tokenizer also learns ordinary English words.
    nouns, verbs, adjectives = _NOUNS.split(), _VERBS.split(), _ADJECTIVES.split()
    for i, noun in enumerate(nouns):
        adjective, verb = adjectives[i % len(adjectives)], verbs[i % len(verbs)]
        other, place = nouns[(i * 7 + 3) % len(nouns)], nouns[(i * 11 + 5) % len(nouns)]
        lines += [
            f"The {adjective} {noun} {verb} a {adjectives[(i * 5 + 1) % len(adjectives)]} {other} near the {place}.",
            f"Where is the {noun}? It is in the {place}, next to the {other}.",
            f"My friend said that the {noun} was very {adjective} today, and I agree.",
        ]
    return lines


def _train_bpe(
    pre_tokenizer: pre_tokenizers.PreTokenizer | None, special_tokens: Iterable[str], vocab_size: int
) -> Tokenizer:
    """Train a byte-level BPE; the 256-byte initial alphabet lets any text round-trip. The
    ``special_tokens`` take the first ids; ``pre_tokenizer`` defaults to GPT-2's byte-level one."""
    tokenizer = Tokenizer(models.BPE())
    if pre_tokenizer is None:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def regex_byte_level(regex: str) -> pre_tokenizers.PreTokenizer:
    """Split on a tiktoken-style ``regex``, then map to bytes (without GPT-2's own split): the
    pre-tokenisation of the Qwen2, Llama 3 and Tekken (Mistral) vocabularies."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def byte_level_tokenizer(
    leading: Iterable[str],
    trailing: Iterable[str],
    pre_tokenizer: pre_tokenizers.PreTokenizer | None = None,
    **kwargs: Any,
) -> PreTrainedTokenizerFast:
    """A ~1000-token byte-level BPE: ``leading`` special tokens take the first ids (as <unk>, <s>,
    </s> in Llama/Mistral vocabularies), ``trailing`` ones follow the learned vocabulary (as
    LLaVA's <image> or Llama 3's <|...|> tokens). ``pre_tokenizer`` defaults to GPT-2's byte-level
    one; ``kwargs`` go to PreTrainedTokenizerFast."""
    trailing = list(trailing)
    backend = _train_bpe(pre_tokenizer, leading, _TARGET_VOCAB - len(trailing))
    backend.add_special_tokens(trailing)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=_MAX_POSITIONS, **kwargs)


def bpe_vocab(
    pre_tokenizer: pre_tokenizers.PreTokenizer | None = None,
    leading: Iterable[str] = (),
    trailing: Iterable[str] = (),
    *,
    added_later: int = 0,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of a ~1000-token BPE, for the tokenizer classes that rebuild their
    pipeline from them on load (``Qwen2Tokenizer``, ``GPT2Tokenizer``, ``GemmaTokenizer``), so the
    pieces must be learned with the same ``pre_tokenizer`` they rebuild (default: GPT-2's
    byte-level one).

    ``leading`` tokens take the first ids; ``trailing`` ones follow the learned pieces in the order
    given, so their ids do not depend on the order in which a tokenizer class registers them;
    ``added_later`` ids are left for tokens the caller adds to the tokenizer itself.
    """
    trailing = list(trailing)
    backend = _train_bpe(pre_tokenizer, leading, _TARGET_VOCAB - len(trailing) - added_later)
    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab.update({token: len(model["vocab"]) + i for i, token in enumerate(trailing)})
    return vocab, [tuple(merge) for merge in model["merges"]]


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    found = tokenizer.get_vocab().get(token)
    if found is None:
        raise RuntimeError(f"tokenizer has no id for special token {token!r}")
    return found


def token_ids(tokenizer: PreTrainedTokenizerBase, tokens: Iterable[str]) -> dict[str, int]:
    """``{token: id}`` for each of ``tokens``."""
    return {token: token_id(tokenizer, token) for token in tokens}


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


def vision_sizes(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of the shared tiny vision-tower size, for ViT-style vision configs
    (CLIP, SigLIP, InternViT, Pixtral, Phi-4's SigLIP); ``overrides`` add the image and patch sizes."""
    return {
        "hidden_size": _VISION_HIDDEN,
        "intermediate_size": _VISION_INTERMEDIATE,
        "num_hidden_layers": _VISION_LAYERS,
        "num_attention_heads": _VISION_HEADS,
        **overrides,
    }


def siglip_vision_config(image_size: int, patch: int) -> dict[str, Any]:
    """A tiny SigLIP tower without the pooling head (Gemma 3, PaliGemma, LLaVA-OneVision; the
    real one: hidden 1152, 27 layers, 14-pixel patches)."""
    return {
        "model_type": "siglip_vision_model",
        **vision_sizes(image_size=image_size, patch_size=patch, vision_use_head=False),
    }


def pinpoints(view: int, grids: tuple[tuple[int, int], ...]) -> list[list[int]]:
    """``image_grid_pinpoints`` (height, width in pixels) of anyres grids of ``view``-pixel crops."""
    return [[rows * view, cols * view] for rows, cols in grids]


def save_model(
    model_class: type[PreTrainedModel],
    config: PreTrainedConfig,
    out: pathlib.Path,
    seed: int,
    *,
    adjust: Callable[[PreTrainedModel], None] | None = None,
    **generation: Any,
) -> None:
    """Save a ``model_class(config)`` initialised from ``seed`` (float32, safetensors) to ``out``,
    with a generation config of ``generation`` (token ids, and the real checkpoint's sampling
    settings where it samples). ``adjust`` may change its fresh weights in place before saving."""
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    if adjust is not None:
        with torch.no_grad():
            adjust(model)
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(out)


def save_processor_parts(
    out: pathlib.Path,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: BaseImageProcessor | None = None,
    processor_config: dict[str, Any] | None = None,
) -> None:
    """Save a processor that cannot be built here part by part, as its hub repo lays it out: the
    tokenizer files (with the chat template the tokenizer holds), the image processor's
    preprocessor_config.json and, where given, ``processor_config`` (the processor's class and its
    own settings) as processor_config.json. For processors whose class needs torchvision (its
    video processor, or its module): ``AutoProcessor`` rebuilds them from these files where
    torchvision is installed."""
    tokenizer.save_pretrained(out)
    if image_processor is not None:
        image_processor.save_pretrained(out)
    if processor_config is not None:
        write_json(out / "processor_config.json", processor_config)


def llava_tokenizer(**kwargs: Any) -> PreTrainedTokenizerFast:
    """The Llama/Mistral tokenizer of LLaVA and LLaVA-NeXT: <unk>, <s>, </s> take ids 0-2 as in
    Llama; <image> then <pad> follow the vocabulary as in the llava-hf checkpoints (32000, 32001).
    ``kwargs`` (padding side, chat template) go to PreTrainedTokenizerFast."""
    specials = _LLAVA_SPECIALS
    return byte_level_tokenizer(
        [specials["unk"], specials["bos"], specials["eos"]],
        [specials["image"], specials["pad"]],
        bos_token=specials["bos"],
        eos_token=specials["eos"],
        unk_token=specials["unk"],
        pad_token=specials["pad"],
        extra_special_tokens={"image_token": specials["image"]},
        add_bos_token=True,  # Llama tokenizers prepend <s>; the chat templates do not
        add_eos_token=False,
        **kwargs,
    )


def llava_special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The bos/eos/pad token ids of ``llava_tokenizer``, as LLaVA's text and generation configs take them."""
    return {f"{name}_token_id": token_id(tokenizer, _LLAVA_SPECIALS[name]) for name in ("bos", "eos", "pad")}


def llama3_tokenizer(trailing: Iterable[str], **kwargs: Any) -> PreTrainedTokenizerFast:
    """A Llama 3 tokenizer (Idefics3, Mllama): its pre-tokenisation, the learned vocabulary, then
    the ``trailing`` special tokens; the post-processor prepends <|begin_of_text|>. ``kwargs`` go
    to PreTrainedTokenizerFast."""
    return byte_level_tokenizer(
        [],
        trailing,
        regex_byte_level(_LLAMA3_PRETOKENIZE_REGEX),
        bos_token="<|begin_of_text|>",
        add_bos_token=True,
        add_eos_token=False,
        **kwargs,
    )


def _build_llava(out: pathlib.Path, seed: int) -> None:
    tokenizer = llava_tokenizer(padding_side="right", chat_template=_LLAVA_CHAT_TEMPLATE)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _LLAVA_IMAGE_SIZE},
        crop_size={"height": _LLAVA_IMAGE_SIZE, "width": _LLAVA_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=_LLAVA_CHAT_TEMPLATE,
    )
    special_ids = llava_special_ids(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            **vision_sizes(image_size=_LLAVA_IMAGE_SIZE, patch_size=_LLAVA_PATCH, projection_dim=32)
        ),
        text_config=LlamaConfig(**text_sizes(vocab_size=len(tokenizer), **special_ids)),
        image_token_index=token_id(tokenizer, _LLAVA_SPECIALS["image"]),
        image_seq_length=(_LLAVA_IMAGE_SIZE // _LLAVA_PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    save_model(LlavaForConditionalGeneration, config, out, seed, **special_ids)
    processor.save_pretrained(out)


def qwen_tokenizer(
    added: tuple[str, ...] = _QWEN_SPECIALS,
    *,
    not_special: frozenset[str] = frozenset(),
    chat_template: str = _QWEN_CHAT_TEMPLATE,
    **kwargs: Any,
) -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE whose `added` tokens follow the vocabulary in the order given (the
    real checkpoint's, <|endoftext|> first).

    Every added token is special except those in `not_special` (single tokens that decoding
    keeps, like Qwen2.5's ``<tool_call>``); `kwargs` go to `Qwen2Tokenizer`.
    """
    vocab, merges = bpe_vocab(regex_byte_level(_QWEN_PRETOKENIZE_REGEX), trailing=added)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",  # as in Qwen2-VL-*-Instruct
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=_MAX_POSITIONS,
        chat_template=chat_template,
        **kwargs,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in added if t not in not_special]})
    if not_special:
        tokenizer.add_tokens([t for t in added if t in not_special])
    return tokenizer


def qwen_ids(tokenizer: Qwen2Tokenizer) -> tuple[int, int]:
    """The ids of <|endoftext|> (BOS and padding of the Qwen text models) and <|im_end|> (their
    EOS, as in the Instruct checkpoints)."""
    return token_id(tokenizer, "<|endoftext|>"), token_id(tokenizer, "<|im_end|>")


def qwen_generation(tokenizer: Qwen2Tokenizer) -> dict[str, Any]:
    """The generation config of the Qwen-VL checkpoints (and LLaVA-OneVision's): stop at
    <|im_end|> or <|endoftext|>."""
    end_of_text, im_end = qwen_ids(tokenizer)
    return {"bos_token_id": end_of_text, "eos_token_id": [im_end, end_of_text], "pad_token_id": end_of_text}


def _build_qwen2_vl(out: pathlib.Path, seed: int) -> None:
    tokenizer = qwen_tokenizer()
    build_qwen_vl(
        out,
        seed,
        Qwen2VLForConditionalGeneration,
        Qwen2VLConfig,
        tokenizer,
        qwen_image_processor(),
        text_config=qwen2_vl_text_config(tokenizer),
        vision_config={
            "depth": _VISION_LAYERS,
            "embed_dim": _VISION_HIDDEN,
            "hidden_size": _TEXT_HIDDEN,  # the merger projects straight into the text model
            "mlp_ratio": _VISION_INTERMEDIATE // _VISION_HIDDEN,
            "num_heads": _VISION_HEADS,
            "patch_size": _QWEN_PATCH,
            "spatial_merge_size": _QWEN_MERGE,
            "temporal_patch_size": _QWEN_TEMPORAL_PATCH,
        },
    )


def qwen_image_processor(**kwargs: Any) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's image processor at ~16 image tokens per image (`kwargs` override)."""
    settings = {
        "min_pixels": _QWEN_PIXELS,
        "max_pixels": _QWEN_PIXELS,
        "patch_size": _QWEN_PATCH,
        "temporal_patch_size": _QWEN_TEMPORAL_PATCH,
        "merge_size": _QWEN_MERGE,
    }
    return Qwen2VLImageProcessorPil(**{**settings, **kwargs})


def qwen_text_config(tokenizer: Qwen2Tokenizer, **kwargs: Any) -> dict[str, Any]:
    """The tiny text model of the Qwen families (`kwargs` add or override keys)."""
    end_of_text, im_end = qwen_ids(tokenizer)
    ids = {"bos_token_id": end_of_text, "eos_token_id": im_end, "pad_token_id": end_of_text}
    return {**text_sizes(vocab_size=len(tokenizer), **ids), **kwargs}


def qwen2_vl_text_config(tokenizer: Qwen2Tokenizer) -> dict[str, Any]:
    """The text model of Qwen2-VL, which Qwen2.5-VL kept: every layer full attention, mRoPE."""
    return qwen_text_config(
        tokenizer,
        max_window_layers=_TEXT_LAYERS,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": _QWEN_MROPE_SECTION},
    )


def qwen_vision_config(patch_size: int, **kwargs: Any) -> dict[str, Any]:
    """The tiny vision tower of Qwen2.5-VL and Qwen3-VL with ``patch_size``-pixel patches, 2x2
    merged (`kwargs` add the family's own keys)."""
    return {
        "depth": _VISION_LAYERS,
        "hidden_size": _VISION_HIDDEN,
        "intermediate_size": _VISION_INTERMEDIATE,
        "num_heads": _VISION_HEADS,
        "out_hidden_size": _TEXT_HIDDEN,  # the merger(s) project straight into the text model
        "patch_size": patch_size,
        "spatial_merge_size": _QWEN_MERGE,
        "temporal_patch_size": _QWEN_TEMPORAL_PATCH,
        **kwargs,
    }


def build_qwen_vl(
    out: pathlib.Path,
    seed: int,
    model_class: type[PreTrainedModel],
    config_class: type[PreTrainedConfig],
    tokenizer: Qwen2Tokenizer,
    image_processor: Qwen2VLImageProcessorPil,
    **config_kwargs: Any,
) -> None:
    """Save a Qwen-VL family checkpoint (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): `config_kwargs` hold
    at least `text_config` and `vision_config`; the vision token ids come from `tokenizer`."""
    config = config_class(
        image_token_id=token_id(tokenizer, "<|image_pad|>"),
        video_token_id=token_id(tokenizer, "<|video_pad|>"),
        vision_start_token_id=token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=token_id(tokenizer, "<|vision_end|>"),
        **config_kwargs,
    )
    save_model(model_class, config, out, seed, **qwen_generation(tokenizer))
    # The layout of Qwen/Qwen2-VL-2B-Instruct (preprocessor_config.json plus tokenizer files):
    # building a Qwen2VLProcessor needs its video processor, which needs torchvision.
    # AutoProcessor rebuilds the processor from these files, and the video processor from
    # preprocessor_config.json, where torchvision is installed.
    save_processor_parts(out, tokenizer, image_processor)


_BUILDERS = {"llava": _build_llava, "qwen2_vl": _build_qwen2_vl}


def _builder(family: str):
    """The function that writes a tiny checkpoint of ``family`` into a folder: ``build(out, seed)``."""
    if family in _BUILDERS:
        return _BUILDERS[family]
    return importlib.import_module(f"mmpeft.models.tiny_families.{family}").build
