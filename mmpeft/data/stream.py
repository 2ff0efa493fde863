"""The sample stream behind every dataloader.

Two modes, both reading tar shards with webdataset's own tar reader and doing the decoding,
encoding and batching inside the dataloader workers:

- **one pass** (default): the shards of all sources, shuffled per epoch with the same seed on
  every rank, are dealt out by rank and then by worker, so no sample is read twice in an
  epoch. With several ranks, every rank yields the same number of full batches (computed from
  the ``dataset.json`` sample counts, with no communication): a rank never waits in a
  collective for one that ran out, whatever the shard counts.
- **resampled** (``data.mixing``): sources, or tasks within them, are drawn with the weights of
  a :class:`Mixing` (explicit, or proportional to ``n ** (1 / temperature)``); shards are drawn
  with replacement, an epoch is ``epoch_steps`` batches per rank, and every (seed, rank, worker,
  epoch) has its own random stream.

In training, ``group_by_length`` (k >= 2) batches neighbours in length: each worker collects
``k`` batches' worth of encoded samples, sorts them by token length, cuts them into ``k``
batches and yields those in a random order (:func:`length_groups`), so that less of a batch is
padding. Which samples a pass yields, and how many batches, stay the same.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mmpeft.data.encode import ChatEncoder
from mmpeft.errors import ConfigError

log = logging.getLogger("mmpeft.data")


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None = None
    """From the index; ``None`` when the shard has no ``dataset.json`` entry."""
    tasks: tuple[tuple[str, int], ...] = ()
    """Samples per task, from the index."""
    damaged: str | None = None
    """Why the file does not match its index entry (its size differs: cut short by an interrupted copy, or
    changed), when the user allowed reading it anyway (``data.allow_damaged_shards``): the samples it lacks
    are counted as skipped (``damaged_shard``)."""


@dataclass(frozen=True)
class Source:
    """One entry of ``data.train`` (or ``val``, ``test``) after resolution."""

    spec: str
    shards: tuple[Shard, ...]
    metrics: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Generation metrics per task, as the indexes beside the shards choose them (docs/evaluation.md)."""

    def task_counts(self) -> Counter[str] | None:
        if any(s.samples is None for s in self.shards):
            return None
        counts: Counter[str] = Counter()
        for shard in self.shards:
            counts.update(dict(shard.tasks))
        return counts


@dataclass
class Mixing:
    """Weighted, resampled streaming over several sources or over the tasks in them."""

    by: Literal["source", "task"] = "source"
    """Mix whole sources (the entries of ``data.train``) or tasks (across all sources)."""
    weights: dict[str, float] | None = None
    """Relative weight of each source (keyed as written in ``data.train``) or task; every one must be listed.
    Default: by temperature."""
    temperature: float = 1.0
    """Without ``weights``: weight proportional to ``n ** (1 / temperature)`` for ``n`` samples (1: as in the data;
    large: towards uniform)."""
    epoch_steps: int | None = None
    """Batches per rank in an epoch. Default: as many as one pass over the data would give."""

    def check(self) -> None:
        """Raise :class:`ConfigError` naming a bad value (called by the data module, not at parse time,
        so the CLI reports it as one line rather than as a parser traceback)."""
        if self.temperature <= 0:
            raise ConfigError(f"data.mixing.temperature must be > 0, got {self.temperature}")
        if self.epoch_steps is not None and self.epoch_steps < 1:
            raise ConfigError(f"data.mixing.epoch_steps must be >= 1, got {self.epoch_steps}")
        bad = {k: w for k, w in (self.weights or {}).items() if not (w >= 0 and math.isfinite(w))}
        if bad or (self.weights is not None and not any(self.weights.values())):
            raise ConfigError(f"data.mixing.weights must be finite, >= 0 and not all 0, got {self.weights}")


@dataclass(frozen=True)
class MixPlan:
    """How a resampled stream realises a mixture: pick a source, then accept a sample by its task."""

    source_probs: tuple[float, ...]
    """Probability of drawing from each source."""
    accept: tuple[dict[str, float], ...]
    """Per source: probability of keeping a sample of each task (rejection sampling, max 1)."""
    target: dict[str, float]
    """The resulting share of each task in the stream."""


def plan_mixture(mixing: Mixing, sources: list[Source], where: str) -> MixPlan:
    """The source and per-task acceptance probabilities that give the mixture ``mixing`` asks for."""
    mixing.check()
    counts = []
    for source in sources:
        c = source.task_counts()
        if c is None:
            raise ConfigError(
                f"{where}: data.mixing needs the sample counts of a dataset.json index; {source.spec!r} has none"
            )
        counts.append(c)
    if mixing.by == "source":
        units = {s.spec: [(i, t, n) for t, n in counts[i].items()] for i, s in enumerate(sources)}
    else:
        units = {}
        for i, c in enumerate(counts):
            for t, n in c.items():
                units.setdefault(t, []).append((i, t, n))
    if mixing.weights is not None:
        unknown = sorted(set(mixing.weights) - set(units))
        missing = sorted(set(units) - set(mixing.weights))
        if unknown or missing:
            raise ConfigError(
                f"data.mixing.weights (by {mixing.by}): "
                + (f"unknown {mixing.by}(s) {', '.join(map(repr, unknown))}; " if unknown else "")
                + (f"no weight for {', '.join(map(repr, missing))}; " if missing else "")
                + f"the {mixing.by}s are {', '.join(map(repr, sorted(units)))}"
            )
        weights = dict(mixing.weights)
    else:
        weights = {u: sum(n for _, _, n in cells) ** (1.0 / mixing.temperature) for u, cells in units.items()}
    total_weight = sum(weights.values())
    # p[i][t]: the share of (source i, task t) in the mixture; within a unit, cells keep their natural proportions.
    p: list[dict[str, float]] = [{} for _ in sources]
    for unit, cells in units.items():
        size = sum(n for _, _, n in cells)
        for i, t, n in cells:
            p[i][t] = p[i].get(t, 0.0) + (weights[unit] / total_weight) * (n / size if size else 0.0)
    source_probs = [sum(cell.values()) for cell in p]
    accept = []
    for i, cell in enumerate(p):
        n_i = sum(counts[i].values())
        # Within source i, task t must appear with share p[i][t] / P_i instead of its natural n_it / n_i.
        ratio = {
            t: (cell[t] / source_probs[i]) / (counts[i][t] / n_i) if source_probs[i] > 0 and counts[i][t] else 0.0
            for t in cell
        }
        top = max(ratio.values(), default=0.0)
        accept.append({t: r / top if top > 0 else 0.0 for t, r in ratio.items()})
    target: Counter[str] = Counter()
    for cell in p:
        target.update(cell)
    return MixPlan(tuple(source_probs), tuple(accept), {t: target[t] for t in sorted(target)})


def batch_quotas(shards: list[Shard], world: int, workers: int, batch_size: int) -> list[list[int]]:
    """Full batches each (rank, worker) yields so that every rank yields the same number.

    Shards are dealt ``shards[rank::world][worker::workers]``. Each rank keeps the smallest
    rank's count of full batches, taking the surplus from its fullest workers first.
    """
    quotas = [
        [sum(s.samples or 0 for s in shards[r::world][w::workers]) // batch_size for w in range(workers)]
        for r in range(world)
    ]
    target = min(sum(row) for row in quotas)
    for row in quotas:
        for _ in range(sum(row) - target):
            row[row.index(max(row))] -= 1
    return quotas


def length_groups(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """The indices of ``lengths`` cut into batches of neighbours in length, in a random order.

    The indices are sorted by length (ties by index) and cut into runs of ``batch_size``; the
    last run, holding the longest, is shorter when ``batch_size`` does not divide the count.
    ``rng`` only orders the batches. Every index is in exactly one batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_padding(lengths: Sequence[int], batches: list[list[int]]) -> int:
    """Pad positions of ``batches`` (indices into ``lengths``), each padded to its longest."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches if b)


@dataclass
class StreamPosition:
    """How far one rank's training stream got, counted from the batches that were trained on.

    Every batch carries its epoch, the worker that made it, how many samples that worker had
    taken out of its shuffled stream, and how many batches it had yielded. The position is the
    latest of these per worker; a pass resumed from it skips each worker's ``drawn`` samples
    without decoding them, so it yields exactly the batches that the interrupted run would have
    yielded next.

    With length grouping, a worker draws a whole pool of samples before it yields the pool's
    batches: ``drawn`` is then the count at the start of the pool and ``pooled`` the batches of
    the pool already yielded; the resumed pass rebuilds the pool (deterministically) and drops
    those. After the last batch of a pool, ``drawn`` is the count at its end and ``pooled`` 0.
    """

    epoch: int = 0
    workers: int = 1
    """Dataloader workers of the run (a resume with another number restarts the epoch)."""
    drawn: dict[int, int] = field(default_factory=dict)
    batches: dict[int, int] = field(default_factory=dict)
    next_worker: int = 0
    """The worker whose batch the dataloader would have asked for next (they take turns)."""
    pooled: dict[int, int] = field(default_factory=dict)
    """Per worker, batches of its current length-grouping pool already yielded (0: at a pool boundary)."""
    group: int = 1
    """Batches per length-grouping pool (1: no grouping); a resume with another value restarts the epoch."""

    def update(self, tag: dict[str, int], workers: int) -> None:
        """Record a trained batch's ``stream`` tag."""
        group = tag.get("group", 1)
        if tag["epoch"] != self.epoch or workers != self.workers or group != self.group:
            self.epoch, self.workers, self.group, self.drawn, self.batches, self.pooled = (
                tag["epoch"],
                workers,
                group,
                {},
                {},
                {},
            )
        self.drawn[tag["worker"]] = tag["drawn"]
        self.batches[tag["worker"]] = tag["batches"]
        self.pooled[tag["worker"]] = tag.get("pooled", 0)
        self.next_worker = (tag["worker"] + 1) % workers

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "workers": self.workers,
            "drawn": dict(self.drawn),
            "batches": dict(self.batches),
            "next_worker": self.next_worker,
            "pooled": dict(self.pooled),
            "group": self.group,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamPosition:
        """Also reads positions saved before length grouping existed (no ``pooled``, no ``group``: ungrouped)."""
        as_ints = lambda d: {int(k): int(v) for k, v in d.items()}  # noqa: E731
        return cls(
            int(data["epoch"]),
            int(data["workers"]),
            as_ints(data["drawn"]),
            as_ints(data["batches"]),
            int(data.get("next_worker", 0)),
            as_ints(data.get("pooled") or {}),
            int(data.get("group", 1)),
        )


_AT_STREAM = re.compile(r" @ <[^>]*>$")


def shard_problem(exc: BaseException, with_shard: bool = True) -> str:
    """A shard webdataset could not read, as one line: ``<shard>: <what is wrong>`` (without ``with_shard``: what
    is wrong).

    webdataset appends the open stream and the shard's URL to the exception's ``args`` (and the
    stream's repr to its message), which ``str(exc)`` would show as a Python tuple.
    """
    args = exc.args if isinstance(exc.args, tuple) else ()
    url = next((a for a in reversed(args[1:]) if isinstance(a, str)), None)
    if isinstance(exc, OSError) and exc.strerror:
        what = exc.strerror
    else:
        what = _AT_STREAM.sub("", str(args[0])) if args else ""
        if isinstance(exc, tarfile.TarError):
            what = f"not a tar file, or a damaged one ({what or type(exc).__name__})"
        elif not what or not isinstance(exc, ValueError):
            what = f"{type(exc).__name__}: {what}" if what else type(exc).__name__
    return f"{url}: {what}" if url and with_shard else what


class _LossCount:
    """Counts the samples read from each shard and, once a damaged one is done, counts the ones it lacks as skipped."""

    def __init__(self, stream: ShardStream, shards: Sequence[Shard]) -> None:
        self.stream = stream
        self.expected = {s.url: s.samples for s in shards if s.damaged is not None and s.samples is not None}
        self.read: Counter[str] = Counter()

    def opened(self, urls: Iterator[str]) -> Iterator[dict[str, str]]:
        # webdataset asks for the next shard only once every sample of the previous one was taken.
        previous = None
        for url in urls:
            self.done(previous)
            previous = url
            self.read[url] = 0
            yield {"url": url}
        self.done(previous)

    def samples(self, urls: Iterator[str]) -> Iterator[dict[str, Any]]:
        for raw in wds.tarfile_samples(self.opened(urls), handler=self.stream._bad_shard):
            self.read[str(raw.get("__url__"))] += 1
            yield raw

    def done(self, url: str | None) -> None:
        lost = self.expected.get(url, 0) - self.read[url] if url is not None else 0
        if lost <= 0:
            return
        encoder = self.stream.encoder
        for counter in (encoder.skipped, encoder.skipped_total):
            counter["damaged_shard"] += lost
        encoder.skipped_by_shard[url] += lost
        encoder.seen_by_shard[url] += lost
        encoder.seen += lost
        log.warning(
            "damaged shard %s: %d of the %d samples its index records could not be read, "
            "counted as skipped (damaged_shard)",
            url,
            lost,
            self.expected[url],
        )
        encoder.check_skip_limit()


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(IterableDataset):
    """Batches of encoded samples for one rank; see the module docstring for the two modes."""

    def __init__(
        self,
        sources: list[Source],
        encoder: ChatEncoder,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        shuffle_buffer: int,
        rank: int | None = None,
        world: int | None = None,
        plan: MixPlan | None = None,
        epoch_steps: int | None = None,
        prompts: bool = False,
        group_by_length: int = 0,
    ) -> None:
        super().__init__()
        self.sources, self.encoder, self.batch_size = sources, encoder, batch_size
        self.prompts = prompts
        """Also encode each sample's prompt for generation (evaluation: ``ChatEncoder.__call__``'s ``prompt``)."""
        self.train, self.seed, self.shuffle_buffer = train, seed, shuffle_buffer
        if rank is None or world is None:
            rank, world = _rank_world()
        self.rank, self.world = rank, world
        self.plan, self.epoch_steps = plan, epoch_steps
        self.group = max(1, group_by_length) if train else 1
        """Batches per length-grouping pool in this stream (1: batches in stream order; evaluation is never grouped)."""
        self.epoch = 0
        """Passes started by this copy of the stream (each worker holds its own copy)."""
        self.resume: StreamPosition | None = None
        """Where the first pass starts instead of its beginning (set before the workers start; see
        :meth:`resume_at`)."""
        self._drawn = 0
        self.shards = [shard for source in sources for shard in source.shards]
        if plan is None and world > 1 and any(s.samples is None for s in self.shards):
            unindexed = next(s.url for s in self.shards if s.samples is None)
            raise ConfigError(
                f"with {world} ranks every rank must yield the same number of batches, which needs the sample "
                f"counts of a dataset.json index; {unindexed} has none (or use data.mixing, which resamples)"
            )

    # -- reading ------------------------------------------------------------------------------
    def _bad_shard(self, exc: Exception) -> bool:
        """webdataset's exception handler: a shard that cannot be read is counted and skipped."""
        self.encoder.skipped["bad_shard"] += 1
        log.warning("skipped the rest of a shard that could not be read: %s", shard_problem(exc))
        return True

    def _samples(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        if any(s.damaged is not None for s in self.shards):
            return _LossCount(self, self.shards).samples(iter(urls))
        return wds.tarfile_samples(({"url": u} for u in urls), handler=self._bad_shard)

    def _batch(
        self,
        items_in: Iterator[dict[str, Any]],
        limit: int | None,
        epoch: int,
        worker: int,
        done: int = 0,
        pooled: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Batches of encoded samples; stop after ``limit`` full batches, else end with a partial one.

        Samples are taken in pools of ``self.group`` batches (one batch without grouping), cut into
        batches by :func:`length_groups` when grouping. ``done`` batches were yielded before this
        pass resumed, all of them before the pool it resumes in, of which it drops the first
        ``pooled`` batches (yielded too). With a ``limit`` the last pool is cut to the batches still
        due, so a pass takes exactly the samples it would take without grouping.

        Each batch carries ``stream``: the epoch, the worker, how far that worker had read and how
        many batches it had yielded (see :class:`StreamPosition`).
        """
        items_in = iter(items_in)
        pool_number = done // self.group  # every pool before this one gave ``group`` full batches
        while limit is None or done < limit:
            size = self.group if limit is None else min(self.group, limit - done)
            start = self._drawn
            pool = list(itertools.islice(items_in, size * self.batch_size))
            if limit is not None:
                pool = pool[: len(pool) - len(pool) % self.batch_size]  # only full batches count towards a limit
            if not pool:
                return
            if self.group > 1:
                rng = random.Random(f"{self.seed}:{self.rank}:{worker}:{epoch}:pool{pool_number}")
                groups = length_groups([item["tokens"]["input_ids"].numel() for item in pool], self.batch_size, rng)
            else:
                groups = [list(range(len(pool)))]
            dropped, pooled = pooled, 0
            if (
                dropped
            ):  # resumed inside this pool: its first batches were yielded, their skip counts reported with them
                done += dropped
                self.encoder.skipped.clear()
            pool_number += 1
            for i in range(dropped, len(groups)):
                done += 1
                last = i == len(groups) - 1
                batch = self.encoder.collate([pool[j] for j in groups[i]])
                # After a pool's last batch the worker resumes after the pool, else at its start.
                batch["stream"] = {
                    "epoch": epoch,
                    "worker": worker,
                    "batches": done,
                    "group": self.group,
                    "drawn": self._drawn if last else start,
                    "pooled": 0 if last else i + 1,
                }
                yield batch
            if len(pool) < size * self.batch_size:
                return

    def _encoded(self, raws: Iterator[dict[str, Any]], rng: random.Random, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Shuffled (training) and encoded samples; the skipped ones are counted by the encoder.

        The first ``skip`` samples out of the shuffle (counted over the whole pass, see
        :meth:`_refill`) are dropped unread: a resumed pass consumes exactly what the interrupted
        one did, so everything after them (and every random draw) is the same.
        """
        if self.train and self.shuffle_buffer > 1:
            # webdataset's public stage (``wds.shuffle``): curried, then applied to the stream.
            shuffle = wds.shuffle(bufsize=self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)
            raws = shuffle(raws)
        for raw in raws:
            self._drawn += 1
            if self._drawn <= skip:
                continue
            item = self.encoder(raw, prompt=self.prompts)
            if item is not None:
                yield item
        self.encoder.check_skip_limit(final=True)

    def _refill(
        self, mine: list[Shard], quota: int, rng: random.Random, skip: int = 0, done: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Encoded samples of this worker's shards; read again only if skipped samples left its quota short."""
        need = (quota - done) * self.batch_size
        for passes in range(1000):
            if passes:
                log.warning(
                    "rank %d re-reads its shards (pass %d) to fill its %d batches after skipped samples; "
                    "ranks stay in step, at the cost of repeating a few samples",
                    self.rank,
                    passes + 1,
                    quota,
                )
            kept = 0
            for item in self._encoded(self._samples([s.url for s in mine]), rng, skip):
                kept += 1
                yield item
            need -= kept
            if need <= 0 or not kept:  # enough, or nothing usable at all: stop rather than loop
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, self.epoch = self.epoch, self.epoch + 1
        worker, skip, done, pooled = self._resume_point(epoch, worker, workers)
        rng = random.Random(f"{self.seed}:{self.rank}:{worker}:{epoch}")
        self._drawn = 0
        batches = lambda items, limit: self._batch(items, limit, epoch, worker, done, pooled)  # noqa: E731
        if self.plan is not None:
            steps = self.epoch_steps or 1
            yield from batches(
                self._encoded(self._resampled(rng), rng, skip), steps // workers + (worker < steps % workers)
            )
            return
        shards = list(self.shards)
        if self.train:  # the same order on every rank: the seed and epoch only
            random.Random(f"{self.seed}:shards:{epoch}").shuffle(shards)
        mine = shards[self.rank :: self.world][worker::workers]
        if self.world == 1:
            yield from batches(self._encoded(self._samples([s.url for s in mine]), rng, skip), None)
            return
        quota = batch_quotas(shards, self.world, workers, self.batch_size)[self.rank][worker]
        if quota:
            yield from batches(self._refill(mine, quota, rng, skip, done), quota)

    # -- resuming ---------------------------------------------------------------------------------
    def resume_at(self, position: StreamPosition) -> None:
        """Start the next pass where ``position`` left off (call before the dataloader's workers start)."""
        self.epoch = position.epoch
        self.resume = position

    def _resume_point(self, epoch: int, worker: int, workers: int) -> tuple[int, int, int, int]:
        """``(worker id, samples to skip, batches yielded before the pool to resume in, batches of that pool
        yielded)`` for this worker's pass of ``epoch``.

        Unless this pass resumes an interrupted one, that is ``(worker, 0, 0, 0)``. When it does, the
        worker ids are rotated for this pass so that the dataloader, which always asks worker 0
        first, continues the interrupted run's round-robin order with the worker that was next.
        """
        position, self.resume = self.resume, None
        if position is None or position.epoch != epoch:
            return worker, 0, 0, 0
        changed, restore = [], []
        if position.workers != workers:
            changed.append(f"{workers} dataloader workers where the checkpoint had {position.workers}")
            restore.append(f"data.num_workers={position.workers}")
        if position.group != self.group:
            off = lambda group: group if group > 1 else 0  # noqa: E731  (as data.group_by_length spells it)
            changed.append(f"data.group_by_length={off(self.group)} where the checkpoint had {off(position.group)}")
            restore.append(f"data.group_by_length={off(position.group)}")
        if changed:
            log.warning(
                "resuming with %s: epoch %d restarts from its beginning (set %s to continue exactly where it stopped)",
                " and ".join(changed),
                epoch,
                " and ".join(restore),
            )
            return worker, 0, 0, 0
        worker = (worker + position.next_worker) % workers
        pooled = position.pooled.get(worker, 0)
        return worker, position.drawn.get(worker, 0), position.batches.get(worker, 0) - pooled, pooled

    def _resampled(self, rng: random.Random) -> Iterator[dict[str, Any]]:
        """An endless stream drawn from the mixture: a source by its probability, a sample kept by its task's
        acceptance."""
        plan = self.plan
        streams: dict[int, Iterator[dict[str, Any]]] = {}

        def draw_shards(i: int) -> Iterator[str]:
            shards = self.sources[i].shards
            weights = [s.samples or 1 for s in shards]
            while True:
                yield rng.choices(shards, weights)[0].url

        live = [i for i, p in enumerate(plan.source_probs) if p > 0]
        probs = [plan.source_probs[i] for i in live]
        while True:
            i = rng.choices(live, probs)[0]
            if i not in streams:
                streams[i] = iter(_LossCount(self, self.sources[i].shards).samples(draw_shards(i)))
            for raw in streams[i]:
                try:
                    task = json.loads(raw["json"])["task"]
                except Exception:  # malformed: let the encoder count it
                    yield raw
                    break
                if rng.random() < plan.accept[i].get(task, 0.0):
                    yield raw
                    break
