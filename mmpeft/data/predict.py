"""Prompts to generate from (``data.predict``): shards, or JSONL files of chat records with image paths.

A JSONL file holds the ``chat`` recipe's source records (docs/data.md), one per line, where the
assistant turn is optional: ``{"id", "task", "messages", "images"}``, image paths relative to the
file's folder. Whatever the input, a chat that ends with an assistant turn has that turn taken
out of the prompt and reported as the ``reference``.

Nothing is skipped: a prediction file must answer every prompt, so a sample that cannot be used
stops the run with a :class:`DataError` naming its shard and key, or its file, line and id. A
JSONL file is checked line by line when the data module is set up, before the model is loaded.

Work is dealt out in units, by rank then by dataloader worker: a whole shard, or ``batch_size``
consecutive records of a JSONL file (one batch; batches never span units). Every sample is
predicted once across ranks and workers; with one rank, JSONL records are predicted in their
order whatever the number of workers (the dataloader takes a batch from each worker in turn).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mmpeft.data.build import BadRecord
from mmpeft.data.chat import ChatPrompts
from mmpeft.data.encode import ChatEncoder
from mmpeft.data.sample import Sample, SampleError, parse_sample
from mmpeft.data.stream import Source, _rank_world, shard_problem
from mmpeft.errors import ConfigError, DataError


def is_prompt_file(spec: str) -> bool:
    """Whether a ``data.predict`` entry names a JSONL file of chat records (rather than shards)."""
    return spec.lower().endswith(".jsonl")


def open_prompt_file(path: str, what: str) -> ChatPrompts:
    """The records of the JSONL file ``path``, every one checked (images included); errors name the file and line."""
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"{what}: no such file {path!r}")
    prompts = ChatPrompts(src=str(Path(path).expanduser()))
    try:
        count = len(prompts)
    except ConfigError as exc:  # empty, or not JSONL at all
        raise ConfigError(f"{what}: {exc}") from exc
    for index in range(count):
        _record(prompts, index)
    return prompts


def _record(prompts: ChatPrompts, index: int) -> Any:
    try:
        return prompts.record(index)
    except BadRecord as exc:
        raise DataError(f"{_place(prompts, index)}: {exc}") from exc


def _place(prompts: ChatPrompts, index: int) -> str:
    place, record_id = prompts.record_place(index), prompts.record_id(index)
    return f"{prompts.src}, {place}" + (f" (id {record_id!r})" if record_id != place else "")


@dataclass(frozen=True)
class _Unit:
    """One piece of prediction work: a shard, or a run of records of a JSONL file."""

    shard: str | None = None
    prompts: ChatPrompts | None = None
    indices: range = range(0)


class PromptStream(IterableDataset):
    """Left-padded batches of prompts (:meth:`ChatEncoder.collate_prompts`) for one rank."""

    def __init__(
        self,
        inputs: list[Source | ChatPrompts],
        encoder: ChatEncoder,
        batch_size: int,
        rank: int | None = None,
        world: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.batch_size = encoder, batch_size
        if rank is None or world is None:
            rank, world = _rank_world()
        self.rank, self.world = rank, world
        self.units: list[_Unit] = []
        for source in inputs:
            if isinstance(source, Source):
                self.units += [_Unit(shard=shard.url) for shard in source.shards]
            else:
                n = len(source)
                self.units += [
                    _Unit(prompts=source, indices=range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)
                ]

    def _samples(self, unit: _Unit) -> Iterator[tuple[Sample, str]]:
        """The unit's samples, each with where it comes from (for errors)."""
        if unit.prompts is not None:
            for index in unit.indices:
                record = _record(unit.prompts, index)
                where = _place(unit.prompts, index)
                try:
                    sample = parse_sample(record.to_sample(), assistant_required=False)
                except SampleError as exc:
                    raise DataError(f"{where}: {exc}") from exc
                sample.key = record.id  # the record's own id, else its line
                yield sample, where
            return
        raws = iter(wds.tarfile_samples([{"url": unit.shard}]))
        while True:
            try:
                raw = next(raws)
            except StopIteration:
                return
            except Exception as exc:  # tar and I/O errors of many types
                raise DataError(f"shard {unit.shard} cannot be read: {shard_problem(exc, with_shard=False)}") from exc
            where = f"sample {raw.get('__key__')!r} in shard {unit.shard}"
            try:
                yield parse_sample(raw, assistant_required=False), where
            except SampleError as exc:
                raise DataError(f"{where}: {exc}") from exc

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for unit in self.units[self.rank :: self.world][worker::workers]:
            items = []
            for sample, where in self._samples(unit):
                try:
                    items.append(self.encoder.encode_prompt(sample))
                except SampleError as exc:
                    raise DataError(f"{where}: {exc}") from exc
                if len(items) == self.batch_size:
                    yield self.encoder.collate_prompts(items)
                    items = []
            if (
                items
            ):  # batches never span units: a JSONL unit is exactly one batch, so the workers' turns keep its order
                yield self.encoder.collate_prompts(items)
