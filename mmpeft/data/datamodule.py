"""A LightningDataModule that streams task-labelled image-text samples from tar shards.

Shards are split explicitly by node (rank) and by dataloader worker, so with DDP or
FSDP no sample is read twice in an epoch. Samples are decoded, rendered through the
processor's chat template and batched inside the workers; skipped samples are
counted by reason and the counts travel with each batch (see ``batch["skipped"]``).
"""

from __future__ import annotations

import dataclasses
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
from mmpeft.data.encode import ChatEncoder
from mmpeft.errors import ConfigError
from mmpeft.models.backbone import load_processor

INDEX = "dataset.json"
"""Each shard directory's index: shard list and sizes, samples per task, the task vocabulary."""


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
        wanted = json.loads(json.dumps(dataclasses.asdict(recipe)))
        index = Path(self.out) / INDEX
        if index.is_file() and json.loads(index.read_text()).get("args") == wanted:
            return
        recipe.build(self.out)


def _is_remote(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def resolve_shards(spec: str, what: str) -> list[str]:
    """Shard URLs for a directory (its index, else ``*.tar``), a brace pattern or a glob; error if none exist."""
    if _is_remote(spec):
        return list(braceexpand(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        index = path / INDEX
        if index.is_file():
            urls = [str(path / shard["name"]) for shard in json.loads(index.read_text())["shards"]]
        else:
            urls = sorted(str(p) for p in path.glob("*.tar"))
    else:
        urls = [p for pattern in braceexpand(spec) for p in sorted(glob.glob(str(Path(pattern).expanduser())))]
    missing = [u for u in urls if not Path(u).is_file()]
    if not urls or missing:
        detail = f"missing: {', '.join(missing[:3])}" if missing else "no file matches"
        raise ConfigError(f"{what}: shard pattern {spec!r} matches no usable shards ({detail})")
    return urls


def read_tasks(spec: str) -> list[str] | None:
    """The task vocabulary from a shard directory's index, if there is one."""
    index = Path(spec).expanduser() / INDEX
    return list(json.loads(index.read_text())["tasks"]) if index.is_file() else None


class ShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        processor: str | None = None,
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
        self.encoder: ChatEncoder | None = None

    def prepare_data(self) -> None:
        for run in self.hparams.prepare or []:
            run.run()

    def setup(self, stage: str) -> None:
        if self.encoder is not None:
            return
        hp = self.hparams
        if not hp.processor:
            raise ConfigError("data.processor is not set (it defaults to model.backbone.pretrained)")
        tasks = hp.tasks or (read_tasks(hp.train) if hp.train else None) or (read_tasks(hp.val) if hp.val else None)
        if not tasks:
            raise ConfigError("data.tasks is not set and no dataset.json with a task vocabulary was found")
        self.tasks = list(tasks)
        processor = load_processor(hp.processor, hp.trust_remote_code)
        self.encoder = ChatEncoder(processor, self.tasks, hp.max_length)

    def _loader(self, spec: str | None, what: str, train: bool) -> DataLoader:
        if spec is None:
            raise ConfigError(f"data.{what} is not set")
        urls = resolve_shards(spec, f"data.{what}")
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
        return self._loader(self.hparams.train, "train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        # No validation shards means no validation loop (Lightning skips an empty list).
        return self._loader(self.hparams.val, "val", train=False) if self.hparams.val else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.test, "test", train=False)
