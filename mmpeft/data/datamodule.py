"""A LightningDataModule that streams task-labelled image-text samples from tar shards.

Shards are split explicitly by node (rank) and by dataloader worker, so with DDP or
FSDP no sample is read twice in an epoch. Samples are decoded, rendered through the
processor's chat template and batched inside the workers; skipped samples are
counted by reason and the counts travel with each batch (see ``batch["skipped"]``).
"""

from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from braceexpand import braceexpand
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from mmpeft import registry
from mmpeft.data.build import INDEX, OutputInUse, is_built
from mmpeft.data.encode import ChatEncoder
from mmpeft.data.filled import FilledBatches
from mmpeft.data.predict import PromptStream, is_prompt_file, open_prompt_file
from mmpeft.data.stream import Mixing, MixPlan, Shard, ShardStream, Source, StreamPosition, plan_mixture
from mmpeft.errors import ConfigError, DataError
from mmpeft.metrics import check_metric_names
from mmpeft.models.backbone import load_processor
from mmpeft.models.images import resolution_kwargs

log = logging.getLogger("mmpeft.data")


@dataclass
class RecipeRun:
    """Build shards with a registered data recipe before training, unless they are already built."""

    recipe: str
    """Name under the ``mmpeft.data_recipes`` entry-point group (e.g. ``synthetic``)."""

    out: str
    """Output directory; skipped when its index says it was built with the same arguments, rebuilt when with others."""

    args: dict[str, Any] = field(default_factory=dict)
    """The recipe's own settings (its dataclass fields)."""

    overwrite: bool = False
    """Replace another data set in ``out`` (another recipe's index, ``*.tar`` files the build did not write); without
    it such a folder is an error. An earlier build of the same recipe with other arguments is rebuilt either way."""

    def run(self) -> None:
        cls = registry.load(registry.DATA_RECIPES, self.recipe)
        recipe = registry.build_config(cls, self.args, f"data.prepare ({self.recipe}).args")
        if not is_built(self.out, recipe):
            try:
                recipe.build(self.out, overwrite=self.overwrite, replace_own_recipe=True)
            except OutputInUse as exc:
                raise ConfigError(
                    f"data.prepare ({self.recipe}): {exc.out} already holds {exc.found}; "
                    "use another out folder, or set overwrite: true in this data.prepare entry to replace them"
                ) from exc


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


def _index(directory: Path, cache: dict[Path, dict | None]) -> dict | None:
    if directory not in cache:
        path = directory / INDEX
        try:
            cache[directory] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return cache[directory]


def _index_metrics(directory: Path, index: dict) -> dict[str, tuple[str, ...]]:
    """The generation metrics an index chooses per task, checked (an unknown name is an error naming the file)."""
    metrics = index.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ConfigError(
            f"{directory / INDEX}: 'metrics' must map task names to lists of metric names, got {metrics!r:.120}"
        )
    return {
        task: tuple(check_metric_names(names, f"{directory / INDEX}: metrics[{task!r}]"))
        for task, names in metrics.items()
    }


def _size_problem(url: str, entry: dict) -> str | None:
    """How a local shard's file size differs from the one its index entry records (``None``: it does not, or none is
    recorded)."""
    recorded = entry.get("bytes")
    if not isinstance(recorded, int) or isinstance(recorded, bool):
        return None
    size = Path(url).stat().st_size
    if size == recorded:
        return None
    return f"shard {url} is {size} bytes, but {Path(url).parent / INDEX} records {recorded} bytes"


def resolve_source(spec: str, what: str, allow_damaged: bool = False) -> tuple[Source, list[str] | None]:
    """The shards of ``spec`` with their sample counts and their index's metrics, and the task vocabulary of the index
    beside them.

    A local shard whose size differs from the one its index records (cut short by an interrupted
    copy, or changed since it was built) is a :class:`DataError` naming it and both sizes; with
    ``allow_damaged`` it is kept, marked :attr:`Shard.damaged`.
    """
    urls = resolve_shards(spec, what)
    cache: dict[Path, dict | None] = {}
    shards, tasks, metrics, read, damaged = [], None, {}, set(), []
    for url in urls:
        entry, index = None, None
        if not _is_remote(url):
            index = _index(Path(url).parent, cache)
            if index is not None:
                entry = next((e for e in index.get("shards", []) if e.get("name") == Path(url).name), None)
                tasks = tasks or index.get("tasks")
                if Path(url).parent not in read:
                    read.add(Path(url).parent)
                    metrics = {
                        **_index_metrics(Path(url).parent, index),
                        **metrics,
                    }  # the first index naming a task wins
        if entry is None:
            shards.append(Shard(url))
        else:
            problem = _size_problem(url, entry)
            if problem is not None:
                damaged.append(problem)
            shards.append(Shard(url, int(entry["samples"]), tuple(sorted(entry.get("tasks", {}).items())), problem))
    if damaged and not allow_damaged:
        more = f" (and {len(damaged) - 1} more damaged shard(s))" if len(damaged) > 1 else ""
        allow = (
            "; to read what is left, set data.allow_damaged_shards: true (the lost samples are counted as skipped)"
            if what.startswith("data.")
            else ""
        )
        raise DataError(
            f"{what}: {damaged[0]}{more}: cut short by an interrupted copy, or changed since it was built; "
            f"copy or build it again{allow}"
        )
    return Source(spec, tuple(shards), tuple(sorted(metrics.items()))), (list(tasks) if tasks else None)


def _warn_damaged(sources: list[Source], what: str) -> None:
    for shard in (shard for source in sources for shard in source.shards if shard.damaged is not None):
        log.warning(
            "%s: %s; reading what is left (data.allow_damaged_shards), "
            "the lost samples are counted as skipped (damaged_shard)",
            what,
            shard.damaged,
        )


# Which splits each Lightning stage reads; the first is required.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


Spec = str | list[str] | None
"""One shard spec, or several sources (mixed by ``data.mixing``, else read one after the other)."""


class ShardDataModule(L.LightningDataModule):
    """
    Mixed-task WebDataset shards, encoded by the model's processor; implements :class:`mmpeft.data.contract.TaskData`.
    """

    def __init__(
        self,
        train: Spec = None,
        val: Spec = None,
        test: Spec = None,
        predict: Spec = None,
        processor: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        image_resolution: int | None = None,
        tasks: list[str] | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        mixing: Mixing | None = None,
        max_skip_fraction: float = 0.1,
        group_by_length: int = 0,
        packing: bool = False,
        pack_length: int | None = None,
        prepare: list[RecipeRun] | None = None,
        trust_remote_code: bool = False,
        allow_damaged_shards: bool = False,
    ) -> None:
        """Stream shards for training and evaluation.

        Args:
            train: Training shards: a directory with ``dataset.json``, a brace pattern
                (``dir/train-{000000..000007}.tar``) or a glob; or a list of such sources.
            val: Validation shards, same forms.
            test: Test shards, same forms.
            predict: What ``predict`` generates answers for: shards in the same forms, or a JSONL file of chat records
                with image paths (a ``.jsonl`` name; see docs/predict.md); or a list of these.
            processor: Checkpoint whose processor encodes the samples; by default the model's
                (``model.backbone.pretrained``).
            processor_kwargs: Extra arguments for the processor's ``from_pretrained``, e.g. ``{max_pixels: 401408}`` to
                cap Qwen2-VL's image tokens.
            image_resolution: Images are read at no more than ``image_resolution**2`` pixels, through the setting
                the family's processor has for it (Qwen-VL: ``max_pixels``; Idefics3, SmolVLM, Pixtral:
                ``size.longest_edge``; InternVL: ``max_patches``), so fewer image tokens trade detail for memory
                (docs/data.md, "Image resolution"). A pixel budget (the side of a square) rather than a longest side,
                because Qwen-VL and InternVL bound an image's area, not its side: a square image is read at the same
                size in every family. Refused (ConfigError) where the input size is fixed by the model (LLaVA,
                LLaVA-NeXT, LLaVA-OneVision, Gemma 3, PaliGemma, Mllama). A key it sets that ``processor_kwargs``
                also sets must agree. Default: the processor's own settings.
            tasks: Task vocabulary (task id = position). By default the sorted union of the indexes' vocabularies; a
                resumed run keeps its checkpoint's.
            batch_size: Samples per batch and device.
            max_length: Longest sequence in tokens; longer samples are truncated, or skipped and counted when the cut
                would go through image tokens.
            num_workers: Dataloader worker processes; shards are split across them.
            shuffle_buffer: Samples held for shuffling in training (shard order is shuffled too).
            seed: Seed of the shard order, the sample shuffle and the mixture draws.
            mixing: Weighted, resampled training stream over the sources or tasks (see docs/data.md). Default: one pass
                over the data per epoch.
            max_skip_fraction: Stop with an error naming the shard when more than this fraction of the samples is
                skipped (checked from 100 samples on, and at the end of each pass).
            group_by_length: Training only: with k >= 2, each dataloader worker sorts pools of k batches' worth of
                samples by token length and yields them as k batches of neighbours, in a random order, so less of each
                batch is padding; 0 or 1: off. The pass's samples and batch counts stay the same; batches become
                correlated with length (and so with task, see docs/data.md).
            packing: Lay each batch's samples end to end in as few rows as hold them (whole samples, each attending only
                to itself; see mmpeft/packing.py and docs/speed.md) instead of padding every sample to the longest.
                The batch keeps its samples, so steps, losses and gradients are those of the padded batch, for every
                family (Mllama's images and Gemma 3's masks follow their samples; mmpeft/packing.py says how).
            pack_length: The longest packed row in tokens. ``None``: each batch's longest sample, so no row is wider
                than the padded batch's and attention never costs more than padding's (sdpa and eager compute a row's
                whole square; docs/speed.md measures wider rows costing more time on a CPU). Length-grouped batches
                need about twice their longest sample to pack (under 5% padding on the benchmark at 2x).
            prepare: Recipes to run before training (once per node) to build missing shards, e.g. the demo's synthetic
                data.
            trust_remote_code: Allow processor code from the checkpoint's repository.
            allow_damaged_shards: Read a shard whose file size differs from the one its ``dataset.json`` records (cut
                short by an interrupted copy, say) instead of stopping with an error naming it; a warning names it, and
                the samples it lacks are counted as skipped (``damaged_shard``).
        """
        super().__init__()
        self.save_hyperparameters()
        # Under LightningCLI, hparams hold the config as parsed (dicts), not the instances.
        self.prepare_runs = list(prepare or [])
        self.mixing = Mixing(**mixing) if isinstance(mixing, dict) else mixing
        if self.mixing is not None:
            self.mixing.check()
        if not 0 <= max_skip_fraction <= 1:
            raise ConfigError(f"data.max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        if pack_length is not None and pack_length < 1:
            raise ConfigError(
                f"data.pack_length must be >= 1 (or null: each batch's longest sample), got {pack_length}"
            )
        if group_by_length < 0:
            raise ConfigError(
                f"data.group_by_length must be >= 0 (0 or 1: off; k >= 2: pools of k batches), got {group_by_length}"
            )
        self.sources: dict[str, list[Source]] = {}
        """Resolved sources per split, filled by ``setup``."""
        self.prompt_inputs: list[Any] = []
        """``data.predict`` resolved: a :class:`Source` per shard spec, the checked records of each JSONL file."""
        self.index_tasks: list[str] = []
        self.index_metrics: dict[str, list[str]] = {}
        """Generation metrics per task chosen by the ``dataset.json`` indexes of this stage's splits
        (docs/evaluation.md)."""
        self.tasks: list[str] | None = None
        """The task vocabulary (task id = position), set by ``setup``."""
        self.eval_prompts = True
        """Whether validation and test batches also carry each prompt for generation (``prompt_inputs``,
        ``references``); the module turns it off through :meth:`carry_prompts` when it generates nothing."""
        self.plan: MixPlan | None = None
        self.encoder: ChatEncoder | None = None
        self.position = StreamPosition()
        """How far this rank's training stream got, from the batches trained on (saved in checkpoints)."""
        self._resume: StreamPosition | None = None

    # -- the module/data-module contract (mmpeft.data.contract.TaskData) --------------------------
    def batches(self, images: int = 1, image_side: int | None = None) -> FilledBatches:
        """Worst-case batches of this data's settings for the memory plan (mmpeft/data/filled.py)."""
        hp = self.hparams
        if not hp.processor:
            raise ConfigError("data.processor is not set (it defaults to model.backbone.pretrained)")
        return FilledBatches(
            hp.processor,
            batch_size=hp.batch_size,
            max_length=hp.max_length,
            images=images,
            image_side=image_side,
            image_resolution=hp.get("image_resolution"),
            processor_kwargs=hp.processor_kwargs,
            trust_remote_code=hp.trust_remote_code,
        )

    def carry_prompts(self, on: bool) -> None:
        """Whether validation and test batches also carry each prompt to generate an answer from."""
        self.eval_prompts = on

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the processor that encodes the batches; ``None`` before ``setup``."""
        return self.encoder.tokenizer if self.encoder is not None else None

    @property
    def urls(self) -> dict[str, list[str]]:
        """Resolved shard files per split."""
        return {
            split: [shard.url for source in sources for shard in source.shards]
            for split, sources in self.sources.items()
        }

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
                raise ConfigError(
                    f"data.{split} is not set; `{getattr(stage, 'value', stage)}` needs it"
                )  # `fit`, not `TrainerFn.FITTING`
            if spec is not None and split not in self.sources:
                specs = [spec] if isinstance(spec, str) else list(spec)
                if not specs:
                    raise ConfigError(f"data.{split} is an empty list")
                what = [f"data.{split}" + (f"[{i}]" if len(specs) > 1 else "") for i in range(len(specs))]
                allow = hp.get("allow_damaged_shards", False)
                if split == "predict":
                    self.prompt_inputs = [
                        open_prompt_file(s, w) if is_prompt_file(s) else resolve_source(s, w, allow)[0]
                        for s, w in zip(specs, what)
                    ]
                    self.sources[split] = [source for source in self.prompt_inputs if isinstance(source, Source)]
                    _warn_damaged(self.sources[split], f"data.{split}")
                    continue
                resolved = [resolve_source(s, w, allow) for s, w in zip(specs, what)]
                self.sources[split] = [source for source, _ in resolved]
                _warn_damaged(self.sources[split], f"data.{split}")
                self.index_tasks = sorted(set(self.index_tasks).union(*(t or () for _, t in resolved)))
                for source, _ in resolved:
                    self.index_metrics = {**{task: list(names) for task, names in source.metrics}, **self.index_metrics}
        if self.mixing is not None and "train" in self.sources and self.plan is None:
            self.plan = plan_mixture(self.mixing, self.sources["train"], "data.train")
            shares = ", ".join(f"{t} {p:.3f}" for t, p in self.plan.target.items())
            log.info("training mixture (resampled, by %s): %s", self.mixing.by, shares)
        if self.encoder is not None:
            return
        if not hp.processor:
            raise ConfigError("data.processor is not set (it defaults to model.backbone.pretrained)")
        tasks = self.tasks or hp.tasks or self.index_tasks
        if not tasks and stage != "predict":  # generation does not use task ids
            raise ConfigError("data.tasks is not set and no dataset.json with a task vocabulary lies beside the shards")
        self.tasks = list(tasks)
        processor = load_processor(hp.processor, hp.trust_remote_code, **(hp.processor_kwargs or {}))
        if hp.get("image_resolution") is not None:  # the knob's keys depend on the processor's family and settings
            kwargs = resolution_kwargs(processor, hp.image_resolution, hp.processor_kwargs)
            processor = load_processor(hp.processor, hp.trust_remote_code, **kwargs)
        self.encoder = ChatEncoder(
            processor,
            self.tasks,
            hp.max_length,
            hp.max_skip_fraction,
            packing=hp.get("packing", False),
            pack_length=hp.get("pack_length"),
        )

    # -- the task vocabulary travels with checkpoints, so task ids never change on resume ---------
    def state_dict(self) -> dict[str, Any]:
        # Every rank builds the checkpoint, one writes it: the stream positions of all ranks go in.
        positions = [self.position.to_dict()]
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            positions = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(positions, self.position.to_dict())
        return {"tasks": list(self.tasks or []), "stream": positions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's data state: where the training stream was, and, when training on, the task vocabulary.

        ``state["tasks"]`` is the vocabulary the checkpoint was trained with (``state["from"]`` says
        where it comes from: the module passes ``model.init_adapter``'s). Training keeps its task
        ids (:meth:`keep_task_ids`); ``validate``, ``test`` and ``predict`` score and answer the
        data's own tasks, whichever the adapter saw: task ids only label samples for the per-task
        scores and the routing losses of training (docs/evaluation.md).
        """
        positions = state.get("stream") or []
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if positions:
            if len(positions) != (self.trainer.world_size if self.trainer is not None else 1):
                log.warning(
                    "the checkpoint holds the data streams of %d ranks, this run has %d: "
                    "each epoch restarts from its beginning",
                    len(positions),
                    self.trainer.world_size,
                )
            else:
                self._resume = StreamPosition.from_dict(positions[rank])
        saved = list(state.get("tasks") or [])
        source = state.get("from") or "the checkpoint (--ckpt_path)"
        if not saved or saved == self.tasks:
            return
        if self.trainer is not None and self.trainer.state.fn != TrainerFn.FITTING:
            log.info(
                "%s was trained on tasks %s; this %s uses the data's: %s",
                source,
                saved,
                self.trainer.state.fn.value,
                self.tasks,
            )
            return
        self.keep_task_ids(saved, source)

    def keep_task_ids(self, saved: list[str], source: str) -> None:
        """Take the vocabulary ``saved`` of ``source`` so that training on keeps its task ids, or :class:`ConfigError`
        with a ``data.tasks`` that does.

        - Every task of the data (``data.tasks``, else the indexes') is in ``saved``: ``saved`` is the vocabulary.
        - ``data.tasks`` lists ``saved`` first, in its order, then new tasks: ``data.tasks`` is (the old ids stay, the
          new follow).
        - Otherwise an error whose suggested ``data.tasks`` (``saved``, then the data's new tasks) does the second.
        """
        wanted = list(self.hparams.tasks or [])
        new = [task for task in (wanted or self.index_tasks) if task not in saved]
        if not new:
            vocabulary = saved
        elif wanted[: len(saved)] == saved:
            vocabulary = wanted
        else:
            advice = (
                f"set data.tasks to {json.dumps(saved + new, ensure_ascii=False)} "
                f"(its tasks first, in its order, then the new ones), or start a new run without {source}"
            )
            if wanted:
                raise ConfigError(
                    f"data.tasks {wanted} changes the task ids of {source}, trained on the task vocabulary {saved}; "
                    f"task ids must not change when training goes on: {advice}"
                )
            raise ConfigError(
                f"{source} was trained on the task vocabulary {saved}, which lacks task(s) {new} of the data; "
                f"task ids must not change when training goes on: {advice}"
            )
        log.info("task vocabulary from %s: %s", source, vocabulary)
        self.tasks = vocabulary
        if self.encoder is not None:
            self.encoder.set_tasks(vocabulary)

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> DataLoader:
        hp = self.hparams
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (None, None)
        plan = self.plan if train else None
        epoch_steps = None
        if plan is not None:
            epoch_steps = self.mixing.epoch_steps
            if epoch_steps is None:
                samples = sum(s.samples or 0 for source in self.sources[split] for s in source.shards)
                epoch_steps = max(1, samples // (hp.batch_size * (world or 1)))
        dataset = ShardStream(
            self.sources[split],
            self.encoder,
            hp.batch_size,
            train=train,
            seed=hp.seed,
            shuffle_buffer=hp.shuffle_buffer,
            rank=rank,
            world=world,
            plan=plan,
            epoch_steps=epoch_steps,
            prompts=not train and self.eval_prompts,
            group_by_length=hp.group_by_length if train else 0,
        )
        if train and self._resume is not None:
            dataset.resume_at(self._resume)  # before the workers start: they take a copy of the dataset
            self._resume = None
        workers = hp.num_workers
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0 and train)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for exactly the batches that are trained on, in order (not for the one the
        # trainer fetches ahead), so the position saved with a checkpoint is what was trained.
        tag = batch.pop("stream", None) if isinstance(batch, dict) else None
        if tag is not None and (self.trainer is None or self.trainer.training):
            self.position.update(tag, max(1, self.hparams.num_workers))
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        # No validation shards means no validation loop (Lightning skips an empty list).
        return self._loader("val", train=False) if "val" in self.sources else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (None, None)
        dataset = PromptStream(self.prompt_inputs, self.encoder, self.hparams.batch_size, rank=rank, world=world)
        return DataLoader(dataset, batch_size=None, num_workers=self.hparams.num_workers)
