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

import difflib
import inspect
import logging
from collections import Counter
from typing import Any

import torch

from mmpeft.data.sample import Sample, SampleError, parse_sample
from mmpeft.errors import ConfigError, DataError
from mmpeft.objective import IGNORE_INDEX
from mmpeft.packing import PACKED_IMAGES, PACKING, Layout, layout, packed_order

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


def chat_template(processor: Any) -> str | None:
    """The processor's chat template, else its tokenizer's."""
    return getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)


def is_prefix_lm(processor: Any) -> bool:
    """A processor that has no chat template and encodes the answer as a ``suffix`` (PaliGemma's prefix-LM way)."""
    return not chat_template(processor) and "suffix" in inspect.signature(processor.__call__).parameters


def image_token_ids(processor: Any) -> set[int]:
    """The ids of the processor's image tokens: every ``*image*_token`` it names (placeholder, soft token, begin and
    end)."""
    ids = {image_token_id(processor)}
    vocab = processor.tokenizer.get_added_vocab()
    for name in dir(processor):
        if "image" in name and name.endswith("_token") and not name.startswith("_"):
            token = getattr(processor, name, None)
            if isinstance(token, str) and token in vocab:
                ids.add(vocab[token])
    return ids


class ChatEncoder:
    """Callable for a WebDataset pipeline: raw sample -> encoded sample, or ``None`` when skipped (and counted)."""

    def __init__(
        self,
        processor: Any,
        tasks: list[str],
        max_length: int,
        max_skip_fraction: float = 1.0,
        skip_check_after: int = SKIP_CHECK_AFTER,
        packing: bool = False,
        pack_length: int | None = None,
    ) -> None:
        self.processor = processor
        self.packing = packing
        """Collate batches packed (:mod:`mmpeft.packing`) rather than padded."""
        self.pack_length = pack_length
        """The longest packed row in tokens; ``None``: each batch's longest sample."""
        self.tokenizer = processor.tokenizer
        self.set_tasks(tasks)
        self.max_length = max_length
        self.image_token_id = image_token_id(processor)
        self.prefix_lm = is_prefix_lm(processor)
        """A processor without a chat template that takes the answer as ``suffix`` (PaliGemma):
        see :meth:`_encode_prefix_lm`."""
        if not self.prefix_lm and not chat_template(processor):
            raise ConfigError(
                f"the processor {type(processor).__name__} "
                f"of {getattr(processor, 'name_or_path', None) or self.tokenizer.name_or_path!r} "
                "has no chat template; give the checkpoint one (chat_template.jinja) or use a processor that has one"
            )
        self.image_token_ids = torch.tensor(sorted(image_token_ids(processor)))
        """Every token id the processor uses for images (placeholders, soft tokens, wrappers)."""
        # Longest first, so that an end-of-turn token is never taken for a shorter one it starts with.
        self._special_tokens = sorted(
            set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab()), key=len, reverse=True
        )
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.skipped: Counter[str] = Counter()
        """Skips since the last batch was collated, by reason (shipped with the batch, so counts survive worker
        processes)."""
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
        """The encoded sample; with ``prompt`` (evaluation) also its prompt for generation (:meth:`encode_prompt`), as
        ``item["prompt"]``."""
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
        if (
            not skipped
            or skipped <= self.max_skip_fraction * self.seen
            or (self.seen < self.skip_check_after and not final)
        ):
            return
        shard, bad = self.skipped_by_shard.most_common(1)[0]
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped_total.items(), key=lambda rn: (-rn[1], rn[0])))
        raise DataError(
            f"{skipped} of {self.seen} samples skipped ({reasons}), more than data.max_skip_fraction="
            f"{self.max_skip_fraction}; most in shard {shard} ({bad} of its {self.seen_by_shard[shard]} samples "
            f"read so far). See the warnings above for keys, or run: python -m mmpeft data inspect {shard}"
        )

    def render(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The chat as text and the character span of every assistant turn's answer in it.

        A span is the turn's text as the template wrote it, and the end-of-turn token right after
        it when the template writes one (``</s>``, ``<|im_end|>``, ``<end_of_turn>``, ...), never
        the role header before it nor the newline after; where the generation prompt is a prefix of
        the chat, the span starts where that prompt ends, so what the template writes between it and
        the answer (a space) is trained too: generation has to write it. It is found by searching each turn's
        text in the rendered chat, in order, from where the turn's own rendering starts: the
        chat up to the turn with the generation prompt where that is a prefix of the whole
        (most templates), else the chat before the turn (templates such as LLaVA-OneVision's,
        whose generation prompt differs from a finished turn's header), else where the previous
        turn ended (templates that render earlier turns differently).
        """
        apply = self.processor.apply_chat_template
        text = apply(messages, tokenize=False)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, generated = cursor, False
            for generation, prefix in (
                (True, apply(messages[:i], tokenize=False, add_generation_prompt=True)),
                (False, apply(messages[:i], tokenize=False) if i else ""),
            ):
                if text.startswith(prefix) and len(prefix) >= cursor:
                    start, generated = len(prefix), generation
                    break
            answer = message_text(message).strip()
            begin = text.find(answer, start) if answer else -1
            if begin < 0:
                raise SampleError(
                    "template_changes_answer",
                    f"assistant turn {len(spans) + 1}'s text is not in the chat as its template renders it",
                )
            end = begin + len(answer)
            # Generation continues from the generation prompt: what the template writes between it and the answer
            # (LLaVA's space after "ASSISTANT:") is the model's to write too, and a tokenizer that keeps that space
            # a token of its own (before "jaune", before digits) would otherwise never learn to write it.
            spans.append((start if generated else begin, end + len(self._end_of_turn(text, end))))
            cursor = spans[-1][1]
        return text, spans

    def _end_of_turn(self, text: str, at: int) -> str:
        """The special token the template writes right at ``at`` (the end of an answer), or ``""``."""
        return next((token for token in self._special_tokens if text.startswith(token, at)), "")

    def adds_special_tokens(self, text: str) -> bool:
        """Whether the tokenizer should add its special tokens (BOS) to ``text``: not when the template wrote BOS
        itself."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def _process(self, text: str, images: list[Any]) -> tuple[dict[str, Any], bool]:
        """The processor's encoding of one rendered chat, and whether special tokens (BOS) were added."""
        add_special = self.adds_special_tokens(text)
        enc = self._call_processor(
            text=[text], images=[images] if images else None, return_tensors="pt", add_special_tokens=add_special
        )
        return enc, add_special

    def _call_processor(self, **kwargs: Any) -> dict[str, Any]:
        """The processor's output; a sample it refuses (PaliGemma without an image, ...) is skipped as
        ``processor_refused``."""
        try:
            return self.processor(**kwargs)
        except (ValueError, TypeError, IndexError) as exc:
            raise SampleError("processor_refused", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc

    @staticmethod
    def _split_inputs(enc: dict[str, Any], length: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The processor's outputs as per-token inputs (cut to ``length``) and image inputs.

        Per-token inputs are those whose second axis runs along the sequence: ``input_ids``,
        ``attention_mask``, ``token_type_ids``, ``mm_token_type_ids``, Mllama's
        ``cross_attention_mask`` ``(1, seq, images, tiles)``; everything else (pixel values, grid
        sizes, ...) is an image input.
        """
        seq = enc["input_ids"].shape[1]
        tokens, images = {}, {}
        for name, value in enc.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() >= 2 and value.shape[:2] == (1, seq):
                tokens[name] = value[0, :length]  # (seq, ...)
            else:
                images[name] = value
        return tokens, images

    def _token_map(self, text: str, add_special: bool, ids: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """Where each token of the plain tokenization of ``text`` is in the processor's ``ids``.

        Returns the plain tokens' character offsets and a ``(n,)`` tensor of their positions in
        ``ids`` (-1 where the processor changed the token: image placeholders expanded, wrapper
        tokens, an inserted BOS). The two token sequences are aligned by their longest common
        runs, so it holds for any way a processor expands images.
        """
        plain = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        position = torch.full((len(plain["input_ids"]),), -1, dtype=torch.long)
        matcher = difflib.SequenceMatcher(None, plain["input_ids"], ids.tolist(), autojunk=False)
        for a, b, size in matcher.get_matching_blocks():
            position[a : a + size] = torch.arange(b, b + size)
        return [tuple(o) for o in plain["offset_mapping"]], position

    def encode(self, sample: Sample) -> dict[str, Any]:
        if sample.task not in self.task_ids:
            raise SampleError("unknown_task", f"task {sample.task!r} is not in the task vocabulary")
        text, enc, target, from_text = (self._encode_prefix_lm if self.prefix_lm else self._encode_chat)(sample)
        ids = enc["input_ids"][0]
        # Image tokens: what the processor inserted (expansions, wrappers) and the placeholders themselves.
        is_image = ~from_text | torch.isin(ids, self.image_token_ids)

        length = ids.numel()
        exc = None
        if length > self.max_length and is_image[self.max_length :].any():
            exc = SampleError(
                "cuts_image_tokens",
                f"{length} tokens and cutting to max_length={self.max_length} would cut image tokens",
            )
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
            # the rendered chat and its images: a batch needing the processor's padding is processed again
            "text": text,
            "pictures": sample.images,
            "labels": labels,
            "length": ids.numel(),  # before truncation (data inspect reports these)
        }

    def _encode_chat(self, sample: Sample) -> tuple[str, dict[str, Any], torch.Tensor, torch.Tensor]:
        """A chat through its template: the text, the processor's encoding, the ``(L,)`` mask of assistant tokens
        and the ``(L,)`` mask of tokens that come from the text itself (not inserted by the processor)."""
        text, spans = self.render(sample.messages)
        enc, add_special = self._process(text, sample.images)
        ids = enc["input_ids"][0]  # (L,) as the processor made it: images expanded
        offsets, position = self._token_map(text, add_special, ids)
        target = torch.zeros_like(ids, dtype=torch.bool)  # (L,)
        for turn, (a, b) in enumerate(spans, start=1):
            # The tokens that overlap the answer: the first may carry a space of the template.
            hits = [i for i, (start, end) in enumerate(offsets) if end > start and start < b and end > a]
            where = position[hits]
            if not hits or (where < 0).any():
                raise SampleError(
                    "tokenization_mismatch",
                    f"the processor's tokens of assistant turn {turn} differ from the tokenizer's",
                )
            target[where] = True
        from_text = torch.zeros_like(target)
        from_text[position[position >= 0]] = True
        return text, enc, target, from_text

    def _encode_prefix_lm(self, sample: Sample) -> tuple[str, dict[str, Any], torch.Tensor, torch.Tensor]:
        """A processor without a chat template that takes the answer as ``suffix`` (PaliGemma).

        The prompt (:meth:`prefix`) is the model's bidirectional prefix and the chat's last answer
        its suffix; the processor marks the suffix in ``token_type_ids`` (its causal part) and
        returns its labels, which are the targets: the answer and the EOS it appends. Its image
        tokens are told apart by their ids alone.
        """
        messages, answer = split_reference(sample.messages)
        prefix = self.prefix(messages)
        enc = self._call_processor(
            text=[prefix], images=[sample.images] if sample.images else None, suffix=[answer or ""], return_tensors="pt"
        )
        labels = enc.pop("labels")[0]
        return prefix, enc, labels != IGNORE_INDEX, torch.ones_like(labels, dtype=torch.bool)

    def prefix(self, messages: list[dict[str, Any]]) -> str:
        """The prompt of a prefix-LM processor: an image placeholder per image, then the text of every turn, a line
        each."""
        images = sum(p["type"] == "image" for m in messages for p in m["content"])
        lines = [message_text(m) for m in messages if message_text(m)]
        return self.processor.image_token * images + "\n".join(lines)

    def encode_prompt(self, sample: Sample) -> dict[str, Any]:
        """A chat to generate the next assistant turn of: the prompt's model inputs, and what a prediction file reports.

        A final assistant turn is the ``reference`` answer and is left out of the prompt; the rest is
        rendered with the template's generation prompt (``add_generation_prompt=True``), or as the
        prefix of a prefix-LM processor. ``prompt`` is the text of the last user turn.
        ``references``, what evaluation scores the answer against, are the sample's own
        ``references`` if it has them, else the ``reference`` (if any). Prompts are never cut: one
        longer than ``max_length`` is refused (``too_long``). The task is not looked up: generation
        does not use task ids.
        """
        messages, reference = split_reference(sample.messages)
        n_images = sum(p["type"] == "image" for m in messages for p in m["content"])
        if self.prefix_lm:
            text = self.prefix(messages)
        else:
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc, _ = self._process(text, sample.images[:n_images])
        enc.pop("labels", None)
        length = enc["input_ids"].shape[1]
        if length > self.max_length:
            exc = SampleError("too_long", f"the prompt has {length} tokens, more than max_length={self.max_length}")
            exc.length = length
            raise exc
        tokens, images = self._split_inputs(enc, length)
        # What instance routers pool: the tokens before the first answer, as in training (objective.routing_masks);
        # a prompt holding earlier answers (a multi-turn chat) pools only what precedes the first of them.
        routing = torch.ones(length, dtype=torch.bool)  # (seq,)
        if not self.prefix_lm and any(m["role"] == "assistant" for m in messages):
            history = Sample(sample.key, sample.task, messages, sample.images[:n_images])
            _, _, answered, _ = self._encode_chat(history)
            if answered.any():
                routing[int(answered.nonzero()[0]) :] = False

        return {
            "key": sample.key,
            "task": sample.task,
            "prompt": last_user_text(messages),
            "reference": reference,
            "references": sample.references or ([reference] if reference is not None else []),
            "tokens": tokens,
            "images": images,
            "text": text,
            "pictures": sample.images[:n_images],
            "routing_mask": routing,
        }

    # -- a batch ----------------------------------------------------------------------------
    def _pad(self, items: list[dict[str, Any]], left: bool = False) -> dict[str, torch.Tensor]:
        """The inputs of ``items`` batched as their processor batches them.

        Per-token inputs are padded to the longest sequence (on the left for generation):
        ``input_ids`` with the pad token, the rest (masks, token types, cross-attention masks)
        with 0. Image inputs: :meth:`_images`.
        """
        longest = max(item["tokens"]["input_ids"].shape[0] for item in items)
        inputs = {
            name: _stack_padded(rows, longest, self._fill(name), left)  # (batch, seq, ...)
            for name, rows in self._token_rows(items).items()
        }
        return inputs | self._images(items)

    def _fill(self, name: str) -> int:
        return self.pad_token_id if name == "input_ids" else 0

    @staticmethod
    def _token_rows(items: list[dict[str, Any]]) -> dict[str, list[torch.Tensor]]:
        """Each per-token input of ``items`` as a list of ``(seq_i, ...)`` tensors, one per item."""
        out: dict[str, list[torch.Tensor]] = {}
        for name in dict.fromkeys(name for item in items for name in item["tokens"]):
            like = next(item["tokens"][name] for item in items if name in item["tokens"])
            # A sample may lack one (no cross-attention mask without images): zeros, as the processor pads it.
            out[name] = [
                item["tokens"].get(
                    name, like.new_zeros((item["tokens"]["input_ids"].shape[0],) + (0,) * (like.dim() - 1))
                )
                for item in items
            ]
        return out

    def _images(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The image inputs of ``items``, in their order.

        Image inputs whose shapes agree past the first axis are concatenated along it, which is all
        a processor does with them. Where they differ (patch or tile counts, image sizes, images per
        sample) or some samples have none, padding them is the processor's own business (Mllama
        marks the first tile of a padding image, Idefics3 pads with empty images): the batch's
        images go through the processor together, and its image inputs are taken. The tests check
        the result against the processor's own batch for every family.
        """
        names = list(dict.fromkeys(name for item in items for name in item["images"]))
        simple = all(
            all(name in item["images"] for item in items)
            and len({item["images"][name].shape[1:] for item in items}) == 1
            for name in names
        )
        if simple:
            return {name: torch.cat([item["images"][name] for item in items]) for name in names}
        if not names:
            return {}
        text = [item["text"] for item in items]
        enc = self.processor(
            text=text,
            images=[item["pictures"] for item in items],
            padding=True,
            return_tensors="pt",
            add_special_tokens=self.adds_special_tokens(text[0]),
        )
        # Only its image inputs: its per-token ones are padded on the processor's side and uncut.
        tokens = enc["input_ids"].shape  # (batch, seq)
        return {name: value for name, value in enc.items() if name in names and value.shape[:2] != tokens}

    def _packed(self, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """``items`` reordered as :func:`~mmpeft.packing.plan_rows` lays them in rows, and their inputs, labels and
        :class:`~mmpeft.packing.Layout` packed (see :mod:`mmpeft.packing`)."""
        lengths = [item["tokens"]["input_ids"].shape[0] for item in items]
        order, rows, packed = packed_order(lengths, self.pack_length or max(lengths))
        items = [items[i] for i in order]
        width = packed.shape[1]
        tokens = self._token_rows(items)
        tokens.pop("attention_mask", None)  # boundaries come from the position ids (see mmpeft.packing)
        images = self._images(items)
        batch: dict[str, Any] = {}
        over_images = [name for name, values in tokens.items() if values[0].dim() >= 2]
        if over_images:
            images, slots = self._row_images(tokens, images, over_images, rows)
            batch[PACKED_IMAGES] = slots.to_dict()
        inputs = {
            name: _stack_padded(
                [torch.cat([values[i] for i in row]) for row in rows], width, self._fill(name), left=False
            )  # (rows, width, ...)
            for name, values in tokens.items()
        }
        first = [item["labels"].clone() for item in items]
        for label in first:
            label[:1] = IGNORE_INDEX  # never predicted in a padded batch: the previous sample's last token must not
        labels = _stack_padded([torch.cat([first[i] for i in row]) for row in rows], width, IGNORE_INDEX, left=False)
        return items, batch | {"inputs": inputs | images, "labels": labels, PACKING: packed.to_dict()}

    @staticmethod
    def _row_images(
        tokens: dict[str, list[torch.Tensor]],
        images: dict[str, torch.Tensor],
        over_images: list[str],
        rows: list[list[int]],
    ) -> tuple[dict[str, torch.Tensor], Layout]:
        """Image inputs in slots per row, for models whose per-token inputs run over the sample's images (Mllama's
        cross-attention mask ``(seq, images, tiles)``): cross-attention reads the images of its own row.

        Each sample keeps the padded batch's ``slots`` image slots (its images, then the processor's padding
        images), so every sample's cross-attention reads exactly what it reads padded. A row's slots are its
        samples' in order, then copies of its first sample's to the widest row's count (no token reads them).
        ``tokens[name]`` for ``over_images`` are moved to their sample's slots in place; returns the image inputs
        ``(rows, width, ...)`` and the slots' :class:`~mmpeft.packing.Layout` (a sample of ``slots`` per sample).
        """
        slots = max(value.shape[1] for name in over_images for value in tokens[name])
        n = len(tokens[over_images[0]])
        laid = layout(rows, [slots] * n)
        width = laid.shape[1]
        for name in over_images:
            values = tokens[name]
            trailing = [max(value.shape[d] for value in values) for d in range(2, values[0].dim())]
            for row in rows:
                for place, i in enumerate(row):
                    moved = values[i].new_zeros((values[i].shape[0], width, *trailing))  # (seq_i, width, ...)
                    at = (slice(None), slice(place * slots, place * slots + values[i].shape[1]))
                    moved[at + tuple(slice(0, size) for size in values[i].shape[2:])] = values[i]
                    values[i] = moved
        out = {}
        for name, value in images.items():
            if value.dim() < 2 or tuple(value.shape[:2]) != (n, slots):
                raise DataError(
                    f"data.packing: image input {name!r} of shape {tuple(value.shape)} is not one per image slot "
                    f"({n}, {slots}, ...), so it cannot follow its samples into rows; set data.packing: false"
                )
            filled = [
                torch.cat([value[i] for i in row] + [value[row[0]]] * (width // slots - len(row))) for row in rows
            ]
            out[name] = torch.stack(filled)  # (rows, width, ...)
        return out, laid

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Right-pad the token inputs and concatenate the image inputs of ``items``; with :attr:`packing`, lay the
        samples in rows instead (:meth:`_packed`, in the rows' sample order).

        Items encoded with their prompt (evaluation) add ``prompt_inputs``, the prompts padded on
        the left for generation, and ``references``, each sample's list of reference answers.
        """
        if self.packing:
            items, batch = self._packed(items)
        else:
            inputs = self._pad(items)
            labels = torch.full(inputs["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
            for row, item in enumerate(items):
                labels[row, : item["labels"].numel()] = item["labels"]
            batch = {"inputs": inputs, "labels": labels}
        skipped, self.skipped = dict(self.skipped), Counter()
        batch |= {
            "task_ids": torch.tensor([item["task_id"] for item in items]),  # (batch,)
            "keys": [item["key"] for item in items],
            "skipped": skipped,
        }
        if "prompt" in items[0]:
            prompts = [item["prompt"] for item in items]
            batch["prompt_inputs"] = self._pad(prompts, left=True)
            batch["prompt_routing_mask"] = self.routing_masks(prompts, batch["prompt_inputs"])
            batch["references"] = [item["prompt"]["references"] for item in items]
        return batch

    @staticmethod
    def routing_masks(prompts: list[dict[str, Any]], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The prompts' ``routing_mask`` padded on the left as ``inputs`` are: ``(batch, prompt_len)`` bool."""
        length = inputs["input_ids"].shape[1]
        return _stack_padded([item["routing_mask"] for item in prompts], length, False, left=True)

    def collate_prompts(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch of :meth:`encode_prompt` items: token inputs padded on the left (generation appends on the right),
        and the tokens instance routers pool (``routing_mask``, for :meth:`RoutingContext.generate`)."""
        inputs = self._pad(items, left=True)
        return {
            "inputs": inputs,
            "routing_mask": self.routing_masks(items, inputs),
            "keys": [item["key"] for item in items],
            "tasks": [item["task"] for item in items],
            "prompts": [item["prompt"] for item in items],
            "reference": [item["reference"] for item in items],
        }


def _pad_to(value: torch.Tensor, shape: tuple[int, ...], fill: float, left: bool = False) -> torch.Tensor:
    """``value`` padded with ``fill`` at the end of every axis (at the start of the first with ``left``) to
    ``shape``."""
    out = torch.full(shape, fill, dtype=value.dtype)
    first = slice(shape[0] - value.shape[0], None) if left else slice(0, value.shape[0])
    out[(first, *(slice(0, n) for n in value.shape[1:]))] = value
    return out


def _stack_padded(rows: list[torch.Tensor], length: int, fill: float, left: bool) -> torch.Tensor:
    """Per-token inputs ``(seq_i, ...)`` as one ``(batch, length, ...)`` tensor."""
    shape = (length, *(max(row.shape[d] for row in rows) for d in range(1, rows[0].dim())))
    return torch.stack([_pad_to(row, shape, fill, left) for row in rows])


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
