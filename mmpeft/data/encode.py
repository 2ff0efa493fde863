"""Turn a parsed sample into model inputs with its processor, and batch them.

Label masking works for any chat template without special markers: each assistant
turn's characters are found by rendering the conversation up to the turn with and
without it (templates render prefixes stably), tokens are mapped to characters with
the fast tokenizer's offsets, and the processor's image-token expansion is aligned
back by dropping image tokens on both sides. Only assistant tokens (their end-of-turn
token included) are trained on; prompts, images and padding are ``-100``.

For generation (``predict``, and the scores of validation and test), :meth:`ChatEncoder.encode_prompt`
encodes a chat without its final assistant turn, with the template's generation prompt, and
:meth:`ChatEncoder.collate_prompts` pads a batch of them on the left.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch

from mmpeft.data.sample import Sample, SampleError, parse_sample
from mmpeft.errors import DataError

IGNORE_INDEX = -100
REPORT_FIRST = 5
"""How many skipped samples per reason are reported with their shard and key."""
SKIP_CHECK_AFTER = 100
"""Samples seen before the skipped fraction is compared with its limit (always at the end of a pass)."""

log = logging.getLogger("mmpeft.data")


def image_token_id(processor: Any) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int(token_id)


class ChatEncoder:
    """Callable for a WebDataset pipeline: raw sample -> encoded sample, or ``None`` when skipped (and counted)."""

    def __init__(
        self, processor: Any, tasks: list[str], max_length: int, max_skip_fraction: float = 1.0, skip_check_after: int = SKIP_CHECK_AFTER
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.set_tasks(tasks)
        self.max_length = max_length
        self.image_token_id = image_token_id(processor)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.skipped: Counter[str] = Counter()
        """Skips since the last batch was collated, by reason (shipped with the batch, so counts survive worker processes)."""
        self._reported: Counter[str] = Counter()
        self.max_skip_fraction = max_skip_fraction
        self.skip_check_after = skip_check_after
        self.seen = 0
        """Samples this encoder (one per worker) has been given."""
        self.kept = 0
        self.skipped_total: Counter[str] = Counter()
        self.skipped_by_shard: Counter[str] = Counter()
        self.seen_by_shard: Counter[str] = Counter()

    def set_tasks(self, tasks: list[str]) -> None:
        self.task_ids = {task: i for i, task in enumerate(tasks)}

    # -- one sample -------------------------------------------------------------------------
    def __call__(self, raw: dict[str, Any], prompt: bool = False) -> dict[str, Any] | None:
        """The encoded sample; with ``prompt`` (evaluation) also its prompt for generation (:meth:`encode_prompt`), as ``item["prompt"]``."""
        shard = str(raw.get("__url__", "?"))
        self.seen += 1
        self.seen_by_shard[shard] += 1
        try:
            sample = parse_sample(raw)
            item = self.encode(sample)
            if prompt:
                item["prompt"] = self.encode_prompt(sample)
        except SampleError as exc:
            self.skipped[exc.reason] += 1
            self.skipped_total[exc.reason] += 1
            self.skipped_by_shard[shard] += 1
            self._reported[exc.reason] += 1
            if self._reported[exc.reason] <= REPORT_FIRST:
                log.warning("skipped sample %s in %s: %s", raw.get("__key__"), shard, exc)
            self.check_skip_limit()
            return None
        self.kept += 1
        return item

    def check_skip_limit(self, final: bool = False) -> None:
        """Stop with :class:`DataError` once more than ``max_skip_fraction`` of the samples were skipped.

        Checked from ``skip_check_after`` samples on, and at the end of a pass whatever the count.
        """
        skipped = sum(self.skipped_total.values())
        if not skipped or skipped <= self.max_skip_fraction * self.seen or (self.seen < self.skip_check_after and not final):
            return
        shard, bad = self.skipped_by_shard.most_common(1)[0]
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped_total.items(), key=lambda rn: (-rn[1], rn[0])))
        raise DataError(
            f"{skipped} of {self.seen} samples skipped ({reasons}), more than data.max_skip_fraction="
            f"{self.max_skip_fraction}; most in shard {shard} ({bad} of its {self.seen_by_shard[shard]} samples "
            f"read so far). See the warnings above for keys, or run: python -m mmpeft data inspect {shard}"
        )

    def render(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The chat as text and the character span of every assistant turn in it."""
        apply = self.processor.apply_chat_template
        text = apply(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = apply(messages[:i], tokenize=False, add_generation_prompt=True)
            upto = apply(messages[: i + 1], tokenize=False)
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise SampleError("template_not_prefix_stable", "the chat template renders prefixes differently")
            spans.append((len(prompt), len(upto)))
        return text, spans

    def _process(self, text: str, images: list[Any]) -> tuple[dict[str, Any], bool]:
        """The processor's encoding of one rendered chat, and whether special tokens (BOS) were added."""
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))  # templates that write BOS themselves get no second one
        enc = self.processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=add_special)
        return enc, add_special

    @staticmethod
    def _split_inputs(enc: dict[str, Any], length: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The processor's outputs as per-token inputs (cut to ``length``) and image inputs."""
        seq = enc["input_ids"].shape[1]
        tokens, images = {}, {}
        for name, value in enc.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() == 2 and value.shape == (1, seq):
                tokens[name] = value[0, :length]  # per-token inputs: input_ids, attention_mask, ...
            else:
                images[name] = value  # pixel_values, image_grid_thw, image_sizes, ...: concatenated across a batch
        return tokens, images

    def encode(self, sample: Sample) -> dict[str, Any]:
        if sample.task not in self.task_ids:
            raise SampleError("unknown_task", f"task {sample.task!r} is not in the task vocabulary")
        text, spans = self.render(sample.messages)
        enc, add_special = self._process(text, sample.images)
        ids = enc["input_ids"][0]  # (L,) with image placeholders expanded
        plain = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        plain_ids = torch.tensor(plain["input_ids"])  # (n,) one token per image placeholder
        offsets = torch.tensor(plain["offset_mapping"]).reshape(-1, 2)  # (n, 2) character spans
        start, end = offsets[:, 0], offsets[:, 1]
        plain_target = torch.zeros_like(plain_ids, dtype=torch.bool)
        for a, b in spans:
            plain_target |= (start >= a) & (start < b) & (end > start)

        is_image = ids == self.image_token_id
        plain_is_image = plain_ids == self.image_token_id
        if not torch.equal(ids[~is_image], plain_ids[~plain_is_image]):
            raise SampleError("tokenization_mismatch", "processor and tokenizer disagree outside image tokens")
        target = torch.zeros_like(ids, dtype=torch.bool)
        target[~is_image] = plain_target[~plain_is_image]

        length = ids.numel()
        exc = None
        if length > self.max_length and is_image[self.max_length :].any():
            exc = SampleError("too_long", f"{length} tokens and cutting to max_length={self.max_length} would cut image tokens")
        elif not target[: self.max_length].any():
            exc = SampleError("no_target_tokens", f"no assistant token left within max_length={self.max_length}")
        if exc is not None:
            exc.length = length
            raise exc
        length = min(length, self.max_length)

        labels = torch.where(target, ids, IGNORE_INDEX)[:length]
        tokens, images = self._split_inputs(enc, length)
        return {
            "key": sample.key,
            "task_id": self.task_ids[sample.task],
            "tokens": tokens,
            "images": images,
            "labels": labels,
            "length": ids.numel(),  # before truncation (data inspect reports these)
        }

    def encode_prompt(self, sample: Sample) -> dict[str, Any]:
        """A chat to generate the next assistant turn of: the prompt's model inputs, and what a prediction file reports.

        A final assistant turn is the ``reference`` answer and is left out of the prompt; the rest is
        rendered with the template's generation prompt (``add_generation_prompt=True``). ``prompt``
        is the text of the last user turn. ``references``, what evaluation scores the answer against,
        are the sample's own ``references`` if it has them, else the ``reference`` (if any). Prompts are never cut: one longer than ``max_length`` is
        refused (``too_long``). The task is not looked up: generation does not use task ids.
        """
        messages, reference = split_reference(sample.messages)
        n_images = sum(p["type"] == "image" for m in messages for p in m["content"])
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc, _ = self._process(text, sample.images[:n_images])
        length = enc["input_ids"].shape[1]
        if length > self.max_length:
            exc = SampleError("too_long", f"the prompt has {length} tokens, more than max_length={self.max_length}")
            exc.length = length
            raise exc
        tokens, images = self._split_inputs(enc, length)
        return {
            "key": sample.key,
            "task": sample.task,
            "prompt": last_user_text(messages),
            "reference": reference,
            "references": sample.references or ([reference] if reference is not None else []),
            "tokens": tokens,
            "images": images,
        }

    # -- a batch ----------------------------------------------------------------------------
    def _pad(self, items: list[dict[str, Any]], left: bool = False) -> dict[str, torch.Tensor]:
        """The token inputs of ``items`` padded to the longest (on the left for generation) and their image inputs concatenated."""
        longest = max(item["tokens"]["input_ids"].numel() for item in items)
        inputs: dict[str, torch.Tensor] = {}
        for name in items[0]["tokens"]:
            fill = self.pad_token_id if name == "input_ids" else 0
            inputs[name] = torch.full((len(items), longest), fill, dtype=items[0]["tokens"][name].dtype)  # (batch, seq)
        for row, item in enumerate(items):
            for name, value in item["tokens"].items():
                n = value.numel()
                span = slice(longest - n, None) if left else slice(0, n)
                inputs[name][row, span] = value
        for name in {name for item in items for name in item["images"]}:
            inputs[name] = torch.cat([item["images"][name] for item in items if name in item["images"]])
        return inputs

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Right-pad the token inputs and concatenate the image inputs of ``items``.

        Items encoded with their prompt (evaluation) add ``prompt_inputs``, the prompts padded on
        the left for generation, and ``references``, each sample's list of reference answers.
        """
        inputs = self._pad(items)
        labels = torch.full(inputs["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
        for row, item in enumerate(items):
            labels[row, : item["labels"].numel()] = item["labels"]
        skipped, self.skipped = dict(self.skipped), Counter()
        batch = {
            "inputs": inputs,
            "labels": labels,
            "task_ids": torch.tensor([item["task_id"] for item in items]),  # (batch,)
            "keys": [item["key"] for item in items],
            "skipped": skipped,
        }
        if "prompt" in items[0]:
            batch["prompt_inputs"] = self._pad([item["prompt"] for item in items], left=True)
            batch["references"] = [item["prompt"]["references"] for item in items]
        return batch

    def collate_prompts(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch of :meth:`encode_prompt` items: token inputs padded on the left (generation appends on the right)."""
        return {
            "inputs": self._pad(items, left=True),
            "keys": [item["key"] for item in items],
            "tasks": [item["task"] for item in items],
            "prompts": [item["prompt"] for item in items],
            "reference": [item["reference"] for item in items],
        }


def split_reference(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """The chat to generate from and, when the chat ends with an assistant turn, that turn's text (the reference)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], message_text(messages[-1])
    return messages, None


def message_text(message: dict[str, Any]) -> str:
    """The text parts of a (normalised) message, joined by newlines."""
    return "\n".join(p["text"] for p in message["content"] if p["type"] == "text")


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the chat's last user turn (empty when there is none)."""
    return next((message_text(m) for m in reversed(messages) if m["role"] == "user"), "")
