"""A LightningDataModule that streams task-labelled image-text samples from tar shards.

Shards are split explicitly by node (rank) and by dataloader worker, so with DDP or
FSDP no sample is read twice in an epoch. Samples are decoded, rendered through the
processor's chat template and batched inside the workers; skipped samples are
counted by reason and the counts travel with each batch (see ``batch["skipped"]``).
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader

from mmpeft import registry
from mmpeft.data.build import INDEX, is_built
from mmpeft.data.encode import ChatEncoder
from mmpeft.errors import ConfigError
from mmpeft.models.backbone import load_processor


@dataclass
class RecipeRun:
    """Build shards with a registered data recipe before training, unless they are already built."""

    recipe: str
    """Name under the ``mmpeft.data_recipes`` entry-point group (e.g. ``synthetic``)."""

    out: str
    """Output directory; skipped when its index says it was built with the same arguments."""

    args: dict[str, Any] = field(default_factory=dict)
    """The recipe's own settings (its dataclass fields)."""

    def run(self) -> None:
        cls = registry.load(registry.DATA_RECIPES, self.recipe)
        recipe = registry.build_config(cls, self.args, f"data.prepare ({self.recipe}).args")
        if not is_built(self.out, recipe):
            recipe.build(self.out)


def _is_remote(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def resolve_shards(spec: str, what: str) -> list[str]:
    """Shard URLs for a directory (its index, else ``*.tar``), a brace pattern or a glob; error if none exist."""
    if _is_remote(spec):
        return list(braceexpand(spec))
    path = Path(spec).expanduser()
    missing: list[str] = []
    if path.is_dir():
        index = path / INDEX
        if index.is_file():
            urls = [str(path / shard["name"]) for shard in json.loads(index.read_text())["shards"]]
        else:
            urls = sorted(str(p) for p in path.glob("*.tar"))
    else:
        urls = []
        for pattern in braceexpand(spec):
            pattern = str(Path(pattern).expanduser())
            if glob.has_magic(pattern):
                urls += sorted(glob.glob(pattern))
            else:  # a named shard (from a brace range) must exist
                (urls if Path(pattern).is_file() else missing).append(pattern)
    missing += [u for u in urls if not Path(u).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"{what}: shard pattern {spec!r} names missing shards: {', '.join(missing[:3])}{more}")
    if not urls:
        raise ConfigError(f"{what}: shard pattern {spec!r} matches no file")
    return urls


def read_tasks(urls: list[str]) -> list[str] | None:
    """The task vocabulary from the ``dataset.json`` beside the first local shard, if there is one."""
    if not urls or _is_remote(urls[0]):
        return None
    index = Path(urls[0]).parent / INDEX
    return list(json.loads(index.read_text())["tasks"]) if index.is_file() else None


# Which splits each Lightning stage reads; the first is required.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class ShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        processor: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        tasks: list[str] | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        prepare: list[RecipeRun] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        """Stream shards for training and evaluation.

        Args:
            train: Training shards: a directory with ``dataset.json``, a brace pattern (``dir/train-{000000..000007}.tar``) or a glob.
            val: Validation shards, same forms.
            test: Test shards, same forms.
            processor: Checkpoint whose processor encodes the samples; by default the model's (``model.backbone.pretrained``).
            processor_kwargs: Extra arguments for the processor's ``from_pretrained``, e.g. ``{max_pixels: 401408}`` to cap Qwen2-VL's image tokens.
            tasks: Task vocabulary (task id = position). By default read from the training directory's ``dataset.json``, so ids stay stable.
            batch_size: Samples per batch and device.
            max_length: Longest sequence in tokens; longer samples are truncated, or skipped and counted when the cut would go through image tokens.
            num_workers: Dataloader worker processes; shards are split across them.
            shuffle_buffer: Samples held for shuffling in training (shard order is shuffled too).
            seed: Seed of the shard and sample shuffles.
            prepare: Recipes to run before training (once per node) to build missing shards, e.g. the demo's synthetic data.
            trust_remote_code: Allow processor code from the checkpoint's repository.
        """
        super().__init__()
        self.save_hyperparameters()
        # Under LightningCLI, hparams hold the config as parsed (dicts), not the instances.
        self.prepare_runs = list(prepare or [])
        self.urls: dict[str, list[str]] = {}
        """Resolved shard files per split, filled by ``setup``."""
        self.encoder: ChatEncoder | None = None

    def prepare_data(self) -> None:
        for run in self.prepare_runs:
            run.run()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        # Every shard pattern this stage reads must resolve before any model work starts.
        required = STAGE_SPLITS[stage][0]
        for split in STAGE_SPLITS[stage]:
            spec = getattr(hp, split)
            if spec is None and split == required:
                raise ConfigError(f"data.{split} is not set; `{stage}` needs it")
            if spec is not None and split not in self.urls:
                self.urls[split] = resolve_shards(spec, f"data.{split}")
        if self.encoder is not None:
            return
        if not hp.processor:
            raise ConfigError("data.processor is not set (it defaults to model.backbone.pretrained)")
        tasks = hp.tasks or next(filter(None, (read_tasks(urls) for urls in self.urls.values())), None)
        if not tasks:
            raise ConfigError("data.tasks is not set and no dataset.json with a task vocabulary lies beside the shards")
        self.tasks = list(tasks)
        processor = load_processor(hp.processor, hp.trust_remote_code, **(hp.processor_kwargs or {}))
        self.encoder = ChatEncoder(processor, self.tasks, hp.max_length)

    def _loader(self, split: str, train: bool) -> DataLoader:
        urls = self.urls[split]
        dataset = wds.WebDataset(
            urls,
            shardshuffle=len(urls) if train else False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,  # a rank or worker may get no shard when there are few
            seed=self.hparams.seed,
        )
        if train:
            dataset = dataset.shuffle(self.hparams.shuffle_buffer, seed=self.hparams.seed)
        dataset = dataset.map(self.encoder).batched(self.hparams.batch_size, collation_fn=self.encoder.collate)
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0 and train)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        # No validation shards means no validation loop (Lightning skips an empty list).
        return self._loader("val", train=False) if "val" in self.urls else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
