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

The second mixture's base (``BaseSettings(vocabulary="format")``, what ``run.py --mixture format`` uses) is the
same build on general data that also answers in that mixture's words (French colours and counts, spelled colours,
grid rows and columns; ``data.general_sample``), so none of its answer tokens is new to the base.

The folder is ``.cache/mmpeft/conflict_suite/base-<hash of the settings and library versions>/``,
written atomically (``mmpeft.files.staged_dir``); ``base.json`` in it holds the settings, the
training time, the final loss, the base's greedy exact-match accuracy on held-out general questions
(overall and per skill) and its **fingerprint**: the SHA-256 of the saved weights, which every
result of the suite quotes.

**Reproducible.** The build runs with one torch thread (a CPU reduction's order depends on the thread
count, and float sums in another order give other bits), deterministic algorithms, seeded model
init and seeded data, so the same settings and the same torch and transformers versions give the
same weights to the bit (``tests/test_benchmarks.py`` builds the smoke base twice, under different
thread settings, and compares fingerprints). The library versions are part of the cache key:
another transformers may initialise the same config differently (an earlier rebuild under
another version scored 0.507 where the documented base scored 0.553).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.conflict_suite.data import VOCABULARIES, general_samples
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
    vision_feature_layer: int = -2
    """Which vision layer's output the projector reads (LLaVA's default, -2, leaves the last of 2 layers unused)."""
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
    vocabulary: str = "general"
    """What the general answers use (``data.VOCABULARIES``): ``general``, the skills' own words; ``format``, also the
    second mixture's answer words (French, spelled colours, grid rows and columns) under their own instructions."""

    def __post_init__(self) -> None:
        if self.vocabulary not in VOCABULARIES:
            raise ValueError(
                f"BaseSettings.vocabulary: unknown vocabulary {self.vocabulary!r} (known: {', '.join(VOCABULARIES)})"
            )

    def as_dict(self) -> dict[str, Any]:
        """The settings as the key and ``base.json`` hold them. ``vocabulary`` only when it is not ``general``, so
        the bases built before the field existed keep their key, their cache folder and their fingerprint."""
        settings = asdict(self)
        if self.vocabulary == "general":
            del settings["vocabulary"]
        return settings

    def key(self) -> str:
        text = json.dumps({**self.as_dict(), "version": VERSION, **library_versions()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def library_versions() -> dict[str, str]:
    """The versions the weights depend on (initialisation and kernels)."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def fingerprint(folder: Path) -> str:
    """SHA-256 (first 16 hex digits) of a saved model's weight files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """One torch thread and deterministic algorithms for the block; the caller's settings restored after."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


def base_dir(cache: Path, settings: BaseSettings) -> Path:
    return cache / f"base-{settings.key()}"


def ensure_base(cache: Path, settings: BaseSettings, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The cached base model folder for ``settings`` (built first if missing) and its ``base.json``."""
    out = base_dir(cache, settings)
    info = read_json(out / "base.json")
    if isinstance(info, dict) and info.get("settings") == settings.as_dict() and (out / "config.json").is_file():
        return out, {**info, "cached": True}
    with staged_dir(out) as staging:
        with deterministic():
            info = _build(staging, settings, progress)
        info["fingerprint"] = fingerprint(staging)
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
    config.vision_feature_layer = s.vision_feature_layer
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
    samples = general_samples(s.pool + s.held_out, s.seed, s.vocabulary)
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

    accuracy, per_skill = general_accuracy(model, encoder, held_out)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tail = losses[-max(1, s.steps // 20) :]
    return {
        "settings": s.as_dict(),
        "version": VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained": "every weight (vision tower, projector, language model), float32, AdamW",
        "encode_s": round(encoded, 1),
        "build_s": round(time.perf_counter() - started, 1),
        "train_s": round(trained - encoded, 1),
        "final_loss": round(sum(tail) / len(tail), 4),
        "held_out_general_exact_match": round(accuracy, 4),
        "held_out_by_skill": {skill: round(value, 4) for skill, value in per_skill.items()},
        **library_versions(),
    }


SKILLS = (
    ("Say in French what", "colour in French"),
    ("Say in French how", "count in French"),
    ("Spell", "spelled colour"),
    ("Give the row", "row/column"),
    ("What color is the shape on", "left/right colour"),
    ("What shape is on", "left/right shape"),
    ("What color", "colour"),
    ("What shape", "shape"),
    ("How many", "count"),
    ("Where", "corner"),
    ("Describe", "describe"),
)
"""The general questions' skills, by the question's first words (first match)."""


def skill_of(question: str) -> str:
    return next((skill for start, skill in SKILLS if question.startswith(start)), "other")


@torch.no_grad()
def general_accuracy(
    model: torch.nn.Module, encoder: ChatEncoder, samples: list, batch: int = 50
) -> tuple[float, dict[str, float]]:
    """Greedy exact match (normalised) of ``model`` on general-skill ``samples`` (float32, no quantization), overall
    and per skill (:data:`SKILLS`)."""
    model.eval()
    right: dict[str, list[bool]] = {}
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        items = [encoder.encode_prompt(sample) for sample in chunk]
        inputs = encoder.collate_prompts(items)["inputs"]
        tokens = model.generate(**inputs, max_new_tokens=24, do_sample=False, num_beams=1)
        answers = encoder.tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for sample, answer, item in zip(chunk, answers, items):
            question = next(part["text"] for part in sample.messages[0]["content"] if part["type"] == "text")
            ok = normalize_answer(answer) == normalize_answer(item["reference"])
            right.setdefault(skill_of(question), []).append(ok)
    model.train()
    every = [ok for oks in right.values() for ok in oks]
    return sum(every) / max(1, len(every)), {skill: sum(oks) / len(oks) for skill, oks in sorted(right.items())}
