"""Tiny Phi-4-multimodal, mimicking microsoft/Phi-4-multimodal-instruct in its transformers-native
form (`Phi4MultimodalForCausalLM`, `Phi4MultimodalProcessor`).

Not an image-text-to-text model for transformers: its config maps to `AutoModelForCausalLM`
(and `AutoModelForMultimodalLM`), not `AutoModelForImageTextToText`. The text model is Phi-3
style (fused `qkv_proj` and `gate_up_proj`, partial rotary, LongRoPE) and holds the SigLIP
vision tower and the Conformer audio tower itself (`model.embed_tokens_extend`), next to its
decoder layers (`model.layers`).

Image tokens cannot be made few: `Phi4MultimodalImageProcessor` counts 256 + 16 + 1 tokens for
the global view and 16 per crop row, as for 448-pixel crops of 14-pixel patches (a 32x32 patch
grid, 2x2 average-pooled). The tiny tower keeps that 32x32 grid with 64-pixel crops of 2-pixel
patches, so an image of at most 64x64 pixels is one crop and 385-545 image tokens (HD transform:
padded crop features, one separator per row, then the global view).

The image processor needs torchvision (there is no PIL variant), so without it neither the
processor nor its image processor can be instantiated: the processor settings are written as
`processor.save_pretrained` lays them out (processor_config.json with the image and audio
processors nested), with the tokenizer (and the chat template) saved beside them.
"""

from __future__ import annotations

import pathlib

from transformers import (
    GPT2Tokenizer,
    Phi4MultimodalAudioConfig,
    Phi4MultimodalConfig,
    Phi4MultimodalFeatureExtractor,
    Phi4MultimodalForCausalLM,
    Phi4MultimodalProcessor,
    Phi4MultimodalVisionConfig,
)

from mmpeft.models.tiny import (
    _MAX_POSITIONS,
    bpe_vocab,
    save_model,
    save_processor_parts,
    text_sizes,
    token_ids,
    vision_sizes,
)

# After the vocabulary, in the real order (199999 <|endoftext|>, 200010 <|image|>, 200011 <|audio|>,
# 200019 <|assistant|> ... 200028 <|tag|>); the real reserved tokens in between are left out.
_SPECIALS = (
    "<|endoftext|>",
    "<|image|>",
    "<|audio|>",
    "<|assistant|>",
    "<|end|>",
    "<|user|>",
    "<|system|>",
    "<|tool|>",
    "<|/tool|>",
    "<|tool_call|>",
    "<|/tool_call|>",
    "<|tool_response|>",
    "<|tag|>",
)

# A 64x64 crop (real: 448) of 2x2 patches (real: 14): the same 32x32 patch grid the image
# processor's token count assumes.
_CROP = 64
_PATCH = 2
_MAX_CROPS = 36  # dynamic_hd, as in the real processor
# head_dim 16 x partial_rotary_factor 0.75 = 12 rotary dims: 6 LongRoPE factors (real: 48 of 96).
_ROTARY_FACTORS = 6

# microsoft/Phi-4-multimodal-instruct's template (transformers-native processor): string or
# list content, no default system prompt, and without add_generation_prompt the rendering ends
# with eos_token (<|endoftext|>) after the last <|end|>. A system message with tools gets
# <|tool|>...<|/tool|><|end|> and then its own <|end|> too.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'audio' %}{{ '<|audio|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% endif %}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def _tokenizer() -> GPT2Tokenizer:
    # GPT2Tokenizer rebuilds a GPT-2 byte-level pre-tokenizer on load: bpe_vocab trains with the same.
    vocab, merges = bpe_vocab(trailing=_SPECIALS)
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"},
        padding_side="right",
        model_max_length=_MAX_POSITIONS,
        chat_template=_CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in _SPECIALS if t != "<|endoftext|>"]})
    return tokenizer


def build(out: pathlib.Path, seed: int) -> None:
    tokenizer = _tokenizer()
    ids = token_ids(tokenizer, _SPECIALS)
    end_of_text, end = ids["<|endoftext|>"], ids["<|end|>"]
    feature_extractor = Phi4MultimodalFeatureExtractor()  # the real settings: 80 mel bins, 8x compression
    config = Phi4MultimodalConfig(
        **text_sizes(vocab_size=len(tokenizer), original_max_position_embeddings=_MAX_POSITIONS),
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10_000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0] * _ROTARY_FACTORS,
            "long_factor": [1.0] * _ROTARY_FACTORS,
        },
        tie_word_embeddings=True,
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
        pad_token_id=end_of_text,
        vision_config=Phi4MultimodalVisionConfig(
            **vision_sizes(image_size=_CROP, patch_size=_PATCH),
            crop_size=_CROP,
            image_token_id=ids["<|image|>"],
            feature_layer=-2,
        ),
        # Minimal Conformer: one block, 32 channels; input_size and time_reduction must match the
        # feature extractor (80 mel bins, compression rate 8).
        audio_config=Phi4MultimodalAudioConfig(
            hidden_size=32,
            intermediate_size=64,
            num_blocks=1,
            num_attention_heads=2,
            ext_pw_out_channel=32,
            depthwise_separable_out_channel=32,
            nemo_conv_channels=32,
            input_size=feature_extractor.feature_size,
            time_reduction=feature_extractor.audio_compression_rate,
            audio_token_id=ids["<|audio|>"],
        ),
    )
    save_model(
        Phi4MultimodalForCausalLM,
        config,
        out,
        seed,
        bos_token_id=end_of_text,
        eos_token_id=[end, end_of_text],
        pad_token_id=end_of_text,
    )
    image_processor = {
        "image_processor_type": "Phi4MultimodalImageProcessor",
        "size": {"height": _CROP, "width": _CROP},
        "patch_size": _PATCH,
        "dynamic_hd": _MAX_CROPS,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
    }
    # No image processor to save: its settings go into processor_config.json.
    save_processor_parts(
        out,
        tokenizer,
        processor_config={
            "audio_processor": feature_extractor.to_dict(),
            "image_processor": image_processor,
            "processor_class": Phi4MultimodalProcessor.__name__,
        },
    )
