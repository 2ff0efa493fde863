"""Samples per second through decode, processor and collate: mmpeft's shard pipeline against a folder of JPEGs and JSON.

    python benchmarks/data_throughput.py [--family llava|qwen2_vl] [--samples N] [--image-size S] [--workers 0,1,2]
                                         [--rounds R] [--steps T] [--train-workers W] [--quick] [--check] [--out FILE]

Both pipelines read the same samples, written once and cached under ``.cache/mmpeft/bench-data-*``:
the synthetic recipe's conversations (tasks color, shape, count, caption; one image each), every
image rendered at ``--image-size`` (default 336, LLaVA-1.5's input size) and saved as a JPEG of
quality ``--quality`` (default 90), stored twice:

- ``shards/``: WebDataset tars in mmpeft's format (``<key>.json`` + ``<key>.img0.jpg``, ``dataset.json``),
  read by ``ShardDataModule`` exactly as training reads them (``setup("fit")``, ``train_dataloader()``:
  shards split over the workers and shuffled, a ``shuffle_buffer`` of samples, decode, ``ChatEncoder``,
  batching, all inside the workers);
- ``folder/``: the usual alternative, LLaVA's layout: ``annotations.json``, one JSON list of records
  (``id``, ``task``, ``messages``, ``images``), and ``images/<key>_<k>.jpg``, byte for byte the images
  in the tars. A map-style ``torch.utils.data.Dataset`` loads the list once in ``__init__``; its
  ``__getitem__`` opens the record's JPEG files with PIL and runs the same ``ChatEncoder.encode``
  (chat template, processor, label masking); ``DataLoader(batch_size, shuffle=True, num_workers,
  collate_fn=ChatEncoder.collate)``. No caching.

The processor is the demo's (the tiny LLaVA of ``configs/demo.yaml``, which resizes every image
to 32x32) with the demo's batch 8 and ``max_length`` 256, so both pipelines do the same work per
sample: ``--check`` verifies that they produce the same batches, tensor for tensor, for every
sample.

A loader measurement builds a fresh DataLoader and iterates one epoch. The wait for its first
batch, which includes starting the worker processes, is reported as ``first batch s``; the rate
is timed from the moment every worker has delivered its first batch to the end of the epoch (or
over ``--batches`` batches). Whole epochs make the comparison fair to the shard pipeline, whose
shuffle buffer reads two samples per sample it yields while it fills and none once the shards
are exhausted. Also measured: the CPU time of the whole measurement, the main process's and the
workers' together, per sample; other jobs on a shared machine stretch wall time far more than CPU
time. Each round measures every worker count's ``shards, folder`` pair, the pairs in rotated order
and each pair's order swapped every other round, so each ratio compares two measurements taken
seconds apart.

Then, in the same round, the demo's training step (tiny LLaVA in NF4, LoRA r=16, alpha 32 on every
linear layer of the language model, gradient checkpointing, AdamW: ``train_step`` of
``adapter_overhead.py``, which is ``MMPeftModule.training_step`` plus the optimizer step, without
Lightning's per-step overhead) is timed ``--steps`` steps at a time: ``cached, fed by A, fed by B,
cached``, where ``cached`` trains on 8 batches already in memory and ``fed by`` pulls every batch
from a fresh loader of one pipeline with the demo's ``--train-workers`` (default 1), after
``2 x workers + 1`` untimed steps. Reported:

- per pipeline and worker count: samples/s (median over rounds, min-max), ms per batch, the first
  batch's wait, CPU ms per sample; ``shards / folder``: per round the shard pipeline's rate (or
  CPU per sample) over the folder's, the median over rounds with a 95% bootstrap interval of that
  median, and the fastest measurement's rate over the fastest's;
- per training variant: seconds per step, the main process's CPU seconds per step, the time per
  step spent waiting for the next batch, and the step time over the mean of the two ``cached``
  measurements around it;
- targets: the shard pipeline at least as fast as the folder baseline at every worker count; and
  loading not the bottleneck of the demo: per round, the shard loader's seconds per batch with
  ``--train-workers`` workers over the cached training step's, below 1. ``yes`` / ``NO`` when the
  whole 95% interval lies on one side of the target, ``within noise`` when it straddles it;
- where a sample's time goes: each stage alone, serially in this process, in CPU ms per sample.

torch runs one thread in the main process by default (``--threads``), as in ``adapter_overhead.py``;
DataLoader workers always run one. The files are read from the page cache (they were just written
or read): this measures CPU work, not storage. On a network file system or a cold disk, reading
one tar sequentially instead of opening a file per image matters more.

``--profile shards`` (or ``folder``) prints, after the tables, a cProfile of one epoch of that
pipeline with 0 workers. ``python benchmarks/data_throughput.py --check`` builds 48 small samples in a temporary folder,
checks that both pipelines yield the same batches for every sample, and runs one short round.
"""

from __future__ import annotations

import argparse
import gc
import io
import itertools
import json
import math
import os
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # adapter_overhead.py, also when imported from elsewhere

from adapter_overhead import Variant, build_runner, environment, loadavg, median_ci, train_step, verdict  # noqa: E402

from data_recipes.synthetic import SyntheticRecipe  # noqa: E402
from mmpeft.adapters.routing import RoutingLosses  # noqa: E402
from mmpeft.data.build import INDEX, Record, ShardRecipe, is_built  # noqa: E402
from mmpeft.data.datamodule import ShardDataModule  # noqa: E402
from mmpeft.data.encode import ChatEncoder  # noqa: E402
from mmpeft.data.sample import Sample, parse_sample  # noqa: E402
from mmpeft.models.backbone import load_processor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "mmpeft"
ANNOTATIONS = "annotations.json"
PIPELINES = ("shards", "folder")

# The demo's adapter (configs/demo.yaml): LoRA r=16, alpha 32, no dropout, on all linear layers.
DEMO_LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0}


# -- the data, written once in both layouts ---------------------------------------------------


@dataclass(kw_only=True)
class JpegSynthetic(ShardRecipe):
    """The synthetic recipe's samples with every image re-encoded as a JPEG (benchmark only, not registered)."""

    name: ClassVar[str] = "bench-jpeg-synthetic"

    samples: int = 800
    samples_per_shard: int = 100
    image_size: int = 336
    quality: int = 90
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._source = SyntheticRecipe(samples=self.samples, image_size=self.image_size, seed=self.seed)

    def __len__(self) -> int:
        return self.samples

    def record(self, index: int) -> Record:
        record = self._source.record(index)
        record.images = [(jpeg(data, self.quality), "jpg") for data, _ in record.images]
        return record


def jpeg(data: bytes, quality: int) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_data(root: Path, recipe: JpegSynthetic) -> tuple[Path, Path]:
    """``root/shards`` (WebDataset) and ``root/folder`` (annotations.json + images/), the same JPEG bytes in both."""
    shards, folder = root / "shards", root / "folder"
    if not is_built(shards, recipe):
        (folder / ANNOTATIONS).unlink(missing_ok=True)
        recipe.build(shards, progress=False)
    if not (folder / ANNOTATIONS).is_file():
        # The folder is written from the tars as read back, so its files are byte for byte the shards' images.
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "images").mkdir(parents=True)
        urls = [str(shards / s["name"]) for s in json.loads((shards / INDEX).read_text())["shards"]]
        records = []
        for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            key, meta = raw["__key__"], json.loads(raw["json"])
            images = []
            for k in range(sum(1 for name in raw if name.startswith("img"))):
                rel = f"images/{key}_{k}.jpg"
                (folder / rel).write_bytes(raw[f"img{k}.jpg"])
                images.append(rel)
            records.append(
                {"id": meta.get("id", key), "task": meta["task"], "messages": meta["messages"], "images": images}
            )
        tmp = folder / (ANNOTATIONS + ".tmp")
        tmp.write_text(json.dumps(records, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, folder / ANNOTATIONS)  # written last: its presence means the folder is complete
    return shards, folder


# -- the folder baseline ----------------------------------------------------------------------


class FolderDataset(Dataset):
    """The usual map-style dataset: a JSON list of records loaded once, image files opened per item."""

    def __init__(self, root: str | os.PathLike, encoder: ChatEncoder) -> None:
        self.root = Path(root)
        self.records = json.loads((self.root / ANNOTATIONS).read_text(encoding="utf-8"))
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        images = []
        for rel in record["images"]:
            with Image.open(self.root / rel) as image:
                images.append(image.convert("RGB"))  # decodes the file
        return self.encoder.encode(
            Sample(key=record["id"], task=record["task"], messages=record["messages"], images=images)
        )


def folder_loader(dataset: FolderDataset, batch: int, workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=dataset.encoder.collate,
        generator=torch.Generator().manual_seed(seed),
    )


# -- both pipelines ---------------------------------------------------------------------------


@dataclass
class Pipelines:
    shards: Path
    folder: Path
    model_dir: Path
    batch: int
    max_length: int
    shuffle_buffer: int
    seed: int
    encoder: ChatEncoder = field(init=False)
    folder_dataset: FolderDataset = field(init=False)
    modules: dict[int, ShardDataModule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tasks = json.loads((self.shards / INDEX).read_text())["tasks"]
        self.encoder = ChatEncoder(load_processor(str(self.model_dir)), tasks, self.max_length)
        self.folder_dataset = FolderDataset(self.folder, self.encoder)

    def loader(self, pipeline: str, workers: int) -> DataLoader:
        """A fresh DataLoader of ``pipeline`` (its worker processes start when it is iterated)."""
        if pipeline == "folder":
            return folder_loader(self.folder_dataset, self.batch, workers, self.seed)
        if workers not in self.modules:  # setup once per worker count, as a training run does once
            module = ShardDataModule(
                train=str(self.shards),
                processor=str(self.model_dir),
                batch_size=self.batch,
                max_length=self.max_length,
                num_workers=workers,
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed,
            )
            module.setup("fit")
            self.modules[workers] = module
        return self.modules[workers].train_dataloader()


def close(iterator: Any) -> None:
    """Stop a DataLoader iterator's worker processes now rather than whenever it is collected."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def children_cpu() -> float:
    """CPU seconds of this process's child processes that have ended and been waited for (DataLoader workers, once
    shut down)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_loader(make: Callable[[], DataLoader], skip: int, batches: int) -> dict[str, float]:
    """Time ``batches`` batches (0: the rest of the epoch) after the first batch and ``skip`` more, untimed.

    Also the CPU time of the whole measurement, first batch included, of this process and of the
    workers together (contention on a shared machine stretches wall time far more than CPU time).
    """
    gc.collect()
    loader = make()
    cpu, child = time.process_time(), children_cpu()
    start = time.perf_counter()
    iterator = iter(loader)
    total = 0
    try:
        total += len(next(iterator)["keys"])
        first = time.perf_counter() - start
        for _ in range(skip):
            total += len(next(iterator)["keys"])
        samples = timed = 0
        start = time.perf_counter()
        for batch in iterator:
            samples += len(batch["keys"])
            timed += 1
            if timed == batches:
                break
        seconds = time.perf_counter() - start
    except StopIteration:
        raise SystemExit(
            "a loader ran out of samples inside a measurement: raise --samples or lower --batches"
        ) from None
    finally:
        close(iterator)
    if timed < batches:
        raise SystemExit(f"a loader ended after {timed} of {batches} timed batches: raise --samples or lower --batches")
    total += samples
    cpu_s = time.process_time() - cpu + children_cpu() - child
    return {
        "samples": samples,
        "batches": timed,
        "seconds": seconds,
        "first_batch_s": first,
        "cpu_s": cpu_s,
        "cpu_samples": total,
    }


# -- the demo's training step -----------------------------------------------------------------


def step_batch(batch: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": batch["inputs"], "labels": batch["labels"], "task_ids": batch["task_ids"]}


def measure_cached(
    runner: Any, batches: list[dict[str, Any]], steps: int, coefficients: RoutingLosses
) -> dict[str, float]:
    gc.collect()
    cpu, start = time.process_time(), time.perf_counter()
    for i in range(steps):
        train_step(runner, batches[i % len(batches)], coefficients)
    return {"steps": steps, "seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "wait_s": 0.0}


def measure_fed(
    runner: Any, make: Callable[[], DataLoader], warmup: int, steps: int, coefficients: RoutingLosses
) -> dict[str, float]:
    """``steps`` timed steps, each pulling its batch from a fresh loader, after ``warmup`` untimed ones."""
    gc.collect()
    loader = make()
    iterator = iter(loader)
    try:
        for _ in range(warmup):
            train_step(runner, step_batch(next(iterator)), coefficients)
        wait = 0.0
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(steps):
            before = time.perf_counter()
            batch = next(iterator)
            wait += time.perf_counter() - before
            train_step(runner, step_batch(batch), coefficients)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    except StopIteration:
        raise SystemExit("a loader ran out of samples inside a measurement: raise --samples or lower --steps") from None
    finally:
        close(iterator)
    return {"steps": steps, "seconds": seconds, "cpu_s": cpu, "wait_s": wait}


# -- correctness: the same batches from both --------------------------------------------------


def check_same_batches(pipes: Pipelines) -> int:
    """Every sample comes once out of the shard pipeline, in a batch equal to the folder dataset's collate of the same
    keys."""
    by_key = {record["id"]: i for i, record in enumerate(pipes.folder_dataset.records)}
    seen: list[str] = []
    iterator = iter(pipes.loader("shards", 0))
    for batch in iterator:
        ours = pipes.encoder.collate([pipes.folder_dataset[by_key[key]] for key in batch["keys"]])
        for name in ("inputs", "labels", "task_ids"):
            a, b = batch[name], ours[name]
            if isinstance(a, dict):
                if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                    raise AssertionError(f"batch {batch['keys']}: {name} differ between the shard and folder pipelines")
            elif not torch.equal(a, b):
                raise AssertionError(f"batch {batch['keys']}: {name} differ between the shard and folder pipelines")
        seen += batch["keys"]
    if sorted(seen) != sorted(by_key):
        raise AssertionError(
            f"the shard pipeline yielded {len(seen)} samples ({len(set(seen))} distinct), "
            f"the folder holds {len(by_key)}"
        )
    return len(seen)


# -- where a sample's time goes ---------------------------------------------------------------


def breakdown(pipes: Pipelines, limit: int, repeats: int = 3) -> list[dict[str, Any]]:
    """Each stage alone over the first ``limit`` samples, serially in this process: CPU ms per sample.

    Every stage runs over all the samples ``repeats`` times, the stages in rotated order, and the
    least total is kept (CPU time, so preemption by other jobs does not count).
    """
    urls = [str(pipes.shards / s["name"]) for s in json.loads((pipes.shards / INDEX).read_text())["shards"]]
    encoder, processor = pipes.encoder, pipes.encoder.processor
    raws = list(itertools.islice(wds.WebDataset(urls, shardshuffle=False, empty_check=False), limit))
    samples = [parse_sample(raw) for raw in raws]
    records = {r["id"]: r for r in pipes.folder_dataset.records}
    folder_items = [records[sample.key] for sample in samples]
    encoded = [encoder.encode(sample) for sample in samples]

    # Every stage drops its outputs as it goes, as the pipelines do: holding 200 decoded images
    # would charge one stage with growing the heap.
    def read_tars() -> None:
        for _ in itertools.islice(wds.WebDataset(urls, shardshuffle=False, empty_check=False), limit):
            pass

    def each(fn: Callable[[Any], Any], items: list[Any]) -> Callable[[], None]:
        def run() -> None:
            for item in items:
                fn(item)

        return run

    def open_images(record: dict[str, Any]) -> None:
        for rel in record["images"]:
            with Image.open(pipes.folder / rel) as image:
                image.convert("RGB")

    batches = [encoded[i : i + pipes.batch] for i in range(0, len(encoded), pipes.batch)]
    stages: dict[str, Callable[[], None]] = {
        "shards: read the tars (webdataset, no decode)": read_tars,
        "shards: parse JSON + decode JPEG (parse_sample)": each(parse_sample, raws),
        "folder: open + decode the JPEG files": each(open_images, folder_items),
        "chat template alone (ChatEncoder.render)": each(lambda s: encoder.render(s.messages), samples),
        "image processor alone": each(lambda s: processor.image_processor(s.images, return_tensors="pt"), samples),
        "ChatEncoder.encode, all": each(encoder.encode, samples),
        "collate (per sample)": each(encoder.collate, batches),
    }
    names = list(stages)
    best = dict.fromkeys(names, math.inf)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            start = time.process_time()
            stages[name]()
            best[name] = min(best[name], time.process_time() - start)
    ms = {name: 1000 * best[name] / limit for name in names}
    rows = [{"stage": name, "cpu_ms_per_sample": value} for name, value in ms.items()]
    rest = ms["ChatEncoder.encode, all"] - ms["chat template alone (ChatEncoder.render)"] - ms["image processor alone"]
    rows.insert(
        names.index("ChatEncoder.encode, all") + 1,
        {
            "stage": (
                "ChatEncoder.encode minus the two above "
                "(processor text and image tokens, tokenizer offsets, label mask)"
            ),
            "cpu_ms_per_sample": rest,
        },
    )
    common = ms["ChatEncoder.encode, all"] + ms["collate (per sample)"]
    rows.append(
        {
            "stage": "sum for the shard pipeline (read, parse_sample, encode, collate)",
            "cpu_ms_per_sample": ms["shards: read the tars (webdataset, no decode)"]
            + ms["shards: parse JSON + decode JPEG (parse_sample)"]
            + common,
        }
    )
    rows.append(
        {
            "stage": "sum for the folder baseline (open + decode, encode, collate)",
            "cpu_ms_per_sample": ms["folder: open + decode the JPEG files"] + common,
        }
    )
    return rows


def profile_epoch(pipes: Pipelines, pipeline: str, rows: int = 15) -> str:
    import cProfile
    import pstats

    loader = pipes.loader(pipeline, 0)
    gc.collect()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in loader:
        pass
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    text = out.getvalue()
    return text[text.index("   Ordered by") :].rstrip() if "   Ordered by" in text else text.rstrip()


# -- schedule and reporting -------------------------------------------------------------------


def schedule(workers: list[int], round_index: int) -> list[tuple[str, int]]:
    """One round's loader measurements: a ``shards, folder`` pair per worker count, pairs rotated, pair order swapped
    every other round."""
    groups = [[("shards", w), ("folder", w)] for w in workers]
    shift = round_index % len(groups)
    sequence: list[tuple[str, int]] = []
    for group in groups[shift:] + groups[:shift]:
        sequence += group[::-1] if round_index % 2 else group
    return sequence


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def ci(values: list[float], digits: int = 3, suffix: str = "x") -> str:
    low, high = median_ci(values)
    return f"{statistics.median(values):.{digits}f}{suffix} [{low:.{digits}f}-{high:.{digits}f}]"


def header(*columns: str) -> list[str]:
    """A markdown table's first two lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def loader_table(results: dict[str, list[dict[str, float]]], workers: list[int]) -> tuple[str, list[dict[str, Any]]]:
    lines = header(
        "pipeline",
        "workers",
        "samples/s median (min-max)",
        "ms / batch median",
        "first batch s median",
        "CPU ms / sample median",
        "samples/s shards / folder median [95% CI]",
        "samples/s shards / folder, fastest",
        "CPU / sample shards / folder median [95% CI]",
    )
    rows = []
    for w in workers:
        rates = {p: [r["samples"] / r["seconds"] for r in results[f"{p}-{w}"]] for p in PIPELINES}
        ratios = [a / b for a, b in zip(rates["shards"], rates["folder"])]
        cpu = {p: [1000 * r["cpu_s"] / r["cpu_samples"] for r in results[f"{p}-{w}"]] for p in PIPELINES}
        cpu_ratios = [a / b for a, b in zip(cpu["shards"], cpu["folder"])]
        for pipeline in PIPELINES:
            runs = results[f"{pipeline}-{w}"]
            per_batch = [1000 * r["seconds"] / r["batches"] for r in runs]
            first = [r["first_batch_s"] for r in runs]
            row = {
                "pipeline": pipeline,
                "workers": w,
                "samples_per_s_median": statistics.median(rates[pipeline]),
                "samples_per_s_min": min(rates[pipeline]),
                "samples_per_s_max": max(rates[pipeline]),
                "ms_per_batch_median": statistics.median(per_batch),
                "first_batch_s_median": statistics.median(first),
                "cpu_ms_per_sample_median": statistics.median(cpu[pipeline]),
                "runs": runs,
            }
            ratio = fastest = cpu_ratio = "-"
            if pipeline == "shards":
                best = max(rates["shards"]) / max(rates["folder"])
                row.update(
                    shards_over_folder_median=statistics.median(ratios),
                    shards_over_folder_ci95=median_ci(ratios),
                    shards_over_folder_fastest=best,
                    shards_over_folder_all=ratios,
                    cpu_shards_over_folder_median=statistics.median(cpu_ratios),
                    cpu_shards_over_folder_ci95=median_ci(cpu_ratios),
                    cpu_shards_over_folder_all=cpu_ratios,
                )
                ratio, fastest, cpu_ratio = ci(ratios), f"{best:.3f}x", ci(cpu_ratios)
            rows.append(row)
            lines.append(
                f"| {pipeline} | {w} | {spread(rates[pipeline], '.1f')} | {statistics.median(per_batch):.1f} | "
                f"{statistics.median(first):.2f} | {statistics.median(cpu[pipeline]):.2f} | "
                f"{ratio} | {fastest} | {cpu_ratio} |"
            )
    return "\n".join(lines), rows


def train_table(train: dict[str, list[dict[str, float]]], names: list[str]) -> tuple[str, list[dict[str, Any]]]:
    lines = header(
        "training step",
        "s / step median (min-max)",
        "main process CPU s / step median",
        "waiting for the loader ms / step median",
        "x cached median [95% CI]",
        "x cached, fastest",
    )
    rows = []
    cached_pairs = list(zip(train["cached"][0::2], train["cached"][1::2]))
    best_cached = min(r["seconds"] / r["steps"] for r in train["cached"])
    for name in names:
        runs = train[name]
        per_step = [r["seconds"] / r["steps"] for r in runs]
        cpu = [r["cpu_s"] / r["steps"] for r in runs]
        wait = [1000 * r["wait_s"] / r["steps"] for r in runs]
        row: dict[str, Any] = {
            "variant": name,
            "s_per_step_median": statistics.median(per_step),
            "s_per_step_min": min(per_step),
            "s_per_step_max": max(per_step),
            "cpu_s_per_step_median": statistics.median(cpu),
            "wait_ms_per_step_median": statistics.median(wait),
            "runs": runs,
        }
        ratio = fastest = "-"
        if name != "cached":
            x = [
                r["seconds"] / r["steps"] / statistics.fmean([a["seconds"] / a["steps"], b["seconds"] / b["steps"]])
                for r, (a, b) in zip(runs, cached_pairs)
            ]
            row.update(
                x_cached_median=statistics.median(x),
                x_cached_ci95=median_ci(x),
                x_cached_fastest=min(per_step) / best_cached,
                x_cached_all=x,
            )
            ratio, fastest = ci(x), f"{min(per_step) / best_cached:.3f}x"
        rows.append(row)
        lines.append(
            f"| {name} | {spread(per_step, '.4f')} | {statistics.median(cpu):.4f} | {statistics.median(wait):.1f} | "
            f"{ratio} | {fastest} |"
        )
    return "\n".join(lines), rows


def judge(low: float, high: float, limit: float, at_most: bool, rounds: int) -> str:
    """``verdict`` of adapter_overhead.py, withheld when too few rounds make the interval meaningless."""
    return verdict(low, high, limit, at_most) if rounds >= 3 else f"n/a ({rounds} round{'s' if rounds != 1 else ''})"


def n_workers(workers: int) -> str:
    return f"{workers} worker{'s' if workers != 1 else ''}"


def label(pipeline: str, workers: int) -> str:
    return f"fed by {pipeline}, {n_workers(workers)}"


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/data_throughput.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--family",
        choices=["llava", "qwen2_vl"],
        default="llava",
        help="tiny model whose processor encodes (and which trains)",
    )
    p.add_argument("--samples", type=int, default=800, help="samples written; every loader measurement reads them all")
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=100,
        help="8 shards by default, as the demo's 2000 samples in shards of 250",
    )
    p.add_argument("--image-size", type=int, default=336, help="side of the rendered square images, in pixels")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="ShardDataModule's shuffle_buffer (its default)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument(
        "--batches", type=int, default=0, help="timed batches per loader measurement (0: the rest of the epoch)"
    )
    p.add_argument("--steps", type=int, default=20, help="timed training steps per measurement (0: no training step)")
    p.add_argument(
        "--train-workers",
        type=int,
        default=1,
        help="workers of the loaders that feed training (the demo's num_workers)",
    )
    p.add_argument("--breakdown", type=int, default=200, help="samples in the serial per-stage breakdown (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process (0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache", default=None, help=f"where the data is written (default {CACHE.relative_to(ROOT)}/bench-data-...)"
    )
    p.add_argument(
        "--profile",
        choices=PIPELINES,
        default=None,
        help="after timing, print a cProfile of one epoch of this pipeline with 0 workers",
    )
    p.add_argument(
        "--quick", action="store_true", help="a short run: 480 samples in 8 shards, 3 rounds, 10 training steps"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="a tiny run in a temporary folder that also checks both pipelines yield the same batches",
    )
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.samples_per_shard, args.rounds, args.steps, args.breakdown = 480, 60, 3, 10, 100
    if args.check:
        args.samples, args.samples_per_shard, args.image_size, args.batch = 48, 12, 64, 4
        args.workers, args.rounds, args.batches, args.steps, args.breakdown = "0,1", 1, 0, 2, 8
    args.worker_counts = sorted({int(w) for w in args.workers.split(",")})
    return args


def plan(args: argparse.Namespace) -> dict[str, int]:
    """Timed batches per worker count (whole worker cycles, 0 for the rest of the epoch); refuses settings that would
    run a loader dry."""
    n_shards = math.ceil(args.samples / args.samples_per_shard)
    sizes = [min(args.samples_per_shard, args.samples - j * args.samples_per_shard) for j in range(n_shards)]
    timed = {}
    for w in sorted(set(args.worker_counts) | ({args.train_workers} if args.steps else set())):
        if w > n_shards:
            raise SystemExit(f"{w} workers need at least {w} shards; there are {n_shards} (lower --samples-per-shard)")
        k = max(w, 1)
        timed[w] = math.ceil(args.batches / k) * k
        taken = max(1 + w + max(timed[w], 1), 2 * w + 1 + args.steps)
        # Worker i reads shards i, i + k, ...; the loader takes one batch from each worker in turn, so
        # it yields full batches only as long as the worker with the fewest has some left.
        full = k * min(sum(sizes[i::k]) // args.batch for i in range(k))
        if taken > full:
            raise SystemExit(
                f"with {w} workers a measurement takes {taken} batches of {args.batch}; "
                f"{args.samples} samples give {full}: raise --samples"
            )
    return timed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/data_throughput.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    timed = plan(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    import PIL
    import transformers  # noqa: F401

    env = environment(torch.device("cpu"))
    env.update(
        {
            "webdataset": wds.__version__,
            "pillow": PIL.__version__,
            "start_method": torch.multiprocessing.get_start_method(),
        }
    )
    print(f"command: {command}")
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"load average at start: {loadavg()}")
    started = time.perf_counter()

    scratch = tempfile.TemporaryDirectory(prefix="mmpeft-bench-data-") if args.check else None
    try:
        from mmpeft.models.tiny import build_tiny_model

        base = Path(scratch.name) if scratch else (Path(args.cache) if args.cache else CACHE)
        model_dir = build_tiny_model(args.family, base / f"tiny-{args.family}")
        recipe = JpegSynthetic(
            samples=args.samples,
            samples_per_shard=args.samples_per_shard,
            image_size=args.image_size,
            quality=args.quality,
            seed=args.seed,
        )
        data_root = (
            base
            / f"bench-data-n{args.samples}-p{args.samples_per_shard}-i{args.image_size}-q{args.quality}-s{args.seed}"
        )
        built = time.perf_counter()
        shards, folder = build_data(data_root, recipe)
        index = json.loads((shards / INDEX).read_text())
        image_files = sorted((folder / "images").iterdir())
        jpeg_bytes = [p.stat().st_size for p in image_files]
        pipes = Pipelines(shards, folder, model_dir, args.batch, args.max_length, args.shuffle_buffer, args.seed)
        shown = lambda p: str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)  # noqa: E731
        setup = {
            "family": args.family,
            "model": shown(model_dir),
            "data": shown(data_root),
            "samples": index["samples"],
            "shards": len(index["shards"]),
            "tasks": index["tasks"],
            "images": len(image_files),
            "image_size": args.image_size,
            "jpeg_quality": args.quality,
            "jpeg_kb_mean": round(statistics.fmean(jpeg_bytes) / 1000, 1),
            "batch": args.batch,
            "max_length": args.max_length,
            "shuffle_buffer": args.shuffle_buffer,
            "workers": args.worker_counts,
            "rounds": args.rounds,
            "timed_batches": {str(w): timed[w] or "rest of epoch" for w in args.worker_counts},
            "train_steps": args.steps,
            "train_workers": args.train_workers,
            "data_ready_s": round(time.perf_counter() - built, 1),
        }
        print("setup: " + ", ".join(f"{k} {v}" for k, v in setup.items()))

        if args.check:
            n = check_same_batches(pipes)
            print(f"the shard and folder pipelines yield the same batches for all {n} samples")

        runner, coefficients, cached = None, RoutingLosses(), []
        train_names = ["cached", *(label(p, args.train_workers) for p in PIPELINES)] if args.steps else []
        if args.steps:
            runner = build_runner(Variant("lora", "lora", DEMO_LORA), model_dir, torch.device("cpu"), True, args.seed)
            iterator = iter(pipes.loader("shards", 0))
            cached = [step_batch(next(iterator)) for _ in range(8)]
            close(iterator)
            for batch in cached[:2]:  # warm-up: AdamW's state, first-call costs
                train_step(runner, batch, coefficients)

        # Warm-up: one untimed measurement of every loader (imports, first calls, page cache).
        for pipeline in PIPELINES:
            for w in args.worker_counts:
                measure_loader(lambda p=pipeline, w=w: pipes.loader(p, w), 0, 1)

        loaders: dict[str, list[dict[str, float]]] = {f"{p}-{w}": [] for w in args.worker_counts for p in PIPELINES}
        train: dict[str, list[dict[str, float]]] = {name: [] for name in train_names}
        bottleneck: list[float] = []
        for round_index in range(args.rounds):
            for pipeline, w in schedule(args.worker_counts, round_index):
                loaders[f"{pipeline}-{w}"].append(
                    measure_loader(lambda p=pipeline, w=w: pipes.loader(p, w), w, timed[w])
                )
            if args.steps:
                w = args.train_workers
                fed = list(PIPELINES)[:: -1 if round_index % 2 else 1]
                train["cached"].append(measure_cached(runner, cached, args.steps, coefficients))
                for pipeline in fed:
                    train[label(pipeline, w)].append(
                        measure_fed(
                            runner, lambda p=pipeline, w=w: pipes.loader(p, w), 2 * w + 1, args.steps, coefficients
                        )
                    )
                train["cached"].append(measure_cached(runner, cached, args.steps, coefficients))
                if w in args.worker_counts:
                    load = loaders[f"shards-{w}"][-1]
                    step = statistics.fmean(r["seconds"] / r["steps"] for r in train["cached"][-2:])
                    bottleneck.append(load["seconds"] / load["batches"] / step)
            print(
                f"round {round_index + 1}/{args.rounds} done "
                f"({time.perf_counter() - started:.0f} s, load average {loadavg()})",
                flush=True,
            )

        stages = breakdown(pipes, min(args.breakdown, index["samples"])) if args.breakdown else []
        elapsed = time.perf_counter() - started
        profile = profile_epoch(pipes, args.profile) if args.profile else None
    finally:
        if scratch is not None:
            scratch.cleanup()

    print()
    text, rows = loader_table(loaders, args.worker_counts)
    print(text)
    train_rows: list[dict[str, Any]] = []
    if args.steps:
        print()
        text, train_rows = train_table(train, train_names)
        print(text)
    targets = []
    for row in rows:
        if row["pipeline"] == "shards":
            low, high = row["shards_over_folder_ci95"]
            targets.append(
                {
                    "target": f"shards >= folder, {n_workers(row['workers'])}",
                    "median": row["shards_over_folder_median"],
                    "ci95": [low, high],
                    "met": judge(low, high, 1.0, False, args.rounds),
                    "fastest": row["shards_over_folder_fastest"],
                }
            )
    if bottleneck:
        low, high = median_ci(bottleneck)
        w = args.train_workers
        best = min(r["seconds"] / r["batches"] for r in loaders[f"shards-{w}"]) / min(
            r["seconds"] / r["steps"] for r in train["cached"]
        )
        targets.append(
            {
                "target": f"shard loading ({n_workers(w)}) s / batch < training step s",
                "median": statistics.median(bottleneck),
                "ci95": [low, high],
                "met": judge(low, high, 1.0, True, args.rounds),
                "fastest": best,
                "all": bottleneck,
            }
        )
    print()
    print("\n".join(header("target", "median [95% CI]", "met", "fastest")))
    for t in targets:
        print(
            f"| {t['target']} | {t['median']:.3f}x [{t['ci95'][0]:.3f}-{t['ci95'][1]:.3f}] | "
            f"{t['met']} | {t['fastest']:.3f}x |"
        )
    if stages:
        print()
        print(
            "where a sample's time goes (each stage alone, serially in this process, "
            f"over {min(args.breakdown, setup['samples'])} samples; least of 3 passes):"
        )
        print()
        print("\n".join(header("stage", "CPU ms / sample")))
        for stage in stages:
            print(f"| {stage['stage']} | {stage['cpu_ms_per_sample']:.2f} |")
    print()
    print(f"total {elapsed:.0f} s; load average at end: {loadavg()}")
    if profile:
        print(
            f"\nprofile of one epoch of the {args.profile} pipeline, 0 workers "
            f"(cProfile, 15 functions with the most own time):\n{profile}"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": command,
                    "environment": env,
                    "setup": setup,
                    "loaders": rows,
                    "training": train_rows,
                    "targets": targets,
                    "breakdown": stages,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
