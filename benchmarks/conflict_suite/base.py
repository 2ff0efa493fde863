"""The suite's base model: a small LLaVA trained in full on general image-text skills, cached.

Adapters are meant to start from a model that already knows something, as a real MLLM does. The
tiny demo model (``mmpeft.models.tiny``) is random, so this module builds a slightly larger one
with the same tokenizer, processor and chat template (taken from ``build_tiny_model("llava")``):
text model hidden 128, MLP 256, 2 layers, 4 heads (2 key/value heads), vision tower (CLIP)
hidden 64, 2 layers; every width a multiple of 64 so NF4 quantizes it in whole blocks. It then
trains **every weight** (vision tower, projector and language model; float32, AdamW, warmup and
cosine decay, plain torch: this is the benchmark's set-up, not the product) on
:func:`benchmarks.conflict_suite.data.general_sample` questions, deterministically (seeded model
init and data), and saves model and processor with ``save_pretrained``, so it loads back through
``AutoModelForImageTextToText.from_pretrained`` / ``load_backbone`` exactly as a real checkpoint.

The folder is ``.cache/mmpeft/conflict_suite/base-<hash of the settings>/``, written atomically
(``mmpeft.files.staged_dir``); ``base.json`` in it holds the settings, the training time, the
final loss and the base's greedy exact-match accuracy on held-out general questions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.conflict_suite.data import general_samples
from mmpeft.data.encode import ChatEncoder
from mmpeft.files import read_json, staged_dir
from mmpeft.metrics import normalize_answer
from mmpeft.models.tiny import build_tiny_model
from mmpeft.objective import lm_loss

log = logging.getLogger("conflict_suite")

VERSION = 1
"""Bump when the build changes in a way the settings do not show, so stale caches are rebuilt."""


@dataclass(frozen=True)
class BaseSettings:
    text_hidden: int = 128
    text_intermediate: int = 256
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_layers: int = 2
    steps: int = 3000
    """AdamW steps of full training on general skills."""
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    pool: int = 16000
    """Distinct general samples encoded once and cycled through (steps * batch / pool epochs)."""
    held_out: int = 300
    """Held-out general samples the base's accuracy is measured on."""
    seed: int = 0

    def key(self) -> str:
        text = json.dumps({**asdict(self), "version": VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_dir(cache: Path, settings: BaseSettings) -> Path:
    return cache / f"base-{settings.key()}"


def ensure_base(cache: Path, settings: BaseSettings, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The cached base model folder for ``settings`` (built first if missing) and its ``base.json``."""
    out = base_dir(cache, settings)
    info = read_json(out / "base.json")
    if isinstance(info, dict) and info.get("settings") == asdict(settings) and (out / "config.json").is_file():
        return out, {**info, "cached": True}
    with staged_dir(out) as staging:
        info = _build(staging, settings, progress)
        (staging / "base.json").write_text(json.dumps(info, indent=2) + "\n")
    return out, {**info, "cached": False}


def _model_and_processor(settings: BaseSettings):
    from transformers import AutoProcessor, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_model("llava", Path(tmp) / "tiny")
        processor = AutoProcessor.from_pretrained(tiny)
        config = LlavaConfig.from_pretrained(tiny)
        generation = GenerationConfig.from_pretrained(tiny)
    s = settings
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = s.text_hidden, s.text_intermediate, s.text_layers
    text.num_attention_heads, text.num_key_value_heads = s.text_heads, s.text_kv_heads
    text.head_dim = s.text_hidden // s.text_heads
    text.initializer_range = (
        0.02  # trained in full here, so the usual init (the tiny demo's 0.1 is for a frozen random head)
    )
    vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers = (
        s.vision_hidden,
        s.vision_intermediate,
        s.vision_layers,
    )
    vision.projection_dim = s.vision_hidden
    torch.manual_seed(s.seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.generation_config = generation
    return model, processor


def _batches(items: list[dict[str, Any]], batch: int, steps: int, seed: int):
    rng = random.Random(f"batches:{seed}")
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            fresh = list(range(len(items)))
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:batch], order[batch:]
        yield [items[i] for i in chosen]


def _build(out: Path, s: BaseSettings, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    model, processor = _model_and_processor(s)
    encoder = ChatEncoder(processor, ["general"], max_length=96)
    samples = general_samples(s.pool + s.held_out, s.seed)
    items = [encoder.encode(sample) for sample in samples[: s.pool]]
    held_out = samples[s.pool :]
    encoded = time.perf_counter() - started

    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(1, s.steps - s.warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses: list[float] = []
    report = max(1, s.steps // 10)
    for step, chunk in enumerate(_batches(items, s.batch, s.steps, s.seed)):
        batch = encoder.collate(chunk)
        loss = lm_loss(model, batch["inputs"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress and ((step + 1) % report == 0 or step + 1 == s.steps):
            recent = losses[-report:]
            print(
                f"  base pretraining step {step + 1}/{s.steps}: loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    trained = time.perf_counter() - started

    accuracy = general_accuracy(model, encoder, held_out)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tail = losses[-max(1, s.steps // 20) :]
    return {
        "settings": asdict(s),
        "version": VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained": "every weight (vision tower, projector, language model), float32, AdamW",
        "encode_s": round(encoded, 1),
        "build_s": round(time.perf_counter() - started, 1),
        "train_s": round(trained - encoded, 1),
        "final_loss": round(sum(tail) / len(tail), 4),
        "held_out_general_exact_match": round(accuracy, 4),
    }


@torch.no_grad()
def general_accuracy(model: torch.nn.Module, encoder: ChatEncoder, samples: list, batch: int = 50) -> float:
    """Greedy exact match (normalised) of ``model`` on general-skill ``samples`` (float32, no quantization)."""
    model.eval()
    right = 0
    for i in range(0, len(samples), batch):
        items = [encoder.encode_prompt(sample) for sample in samples[i : i + batch]]
        inputs = encoder.collate_prompts(items)["inputs"]
        tokens = model.generate(**inputs, max_new_tokens=24, do_sample=False, num_beams=1)
        answers = encoder.tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        right += sum(normalize_answer(a) == normalize_answer(item["reference"]) for a, item in zip(answers, items))
    model.train()
    return right / max(1, len(samples))
