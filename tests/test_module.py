"""The LightningModule: its loss against transformers' own, optimizers and schedule in a real Trainer."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from test_backbone import _batch

from data_recipes.synthetic import SyntheticRecipe
from mmpeft.adapters import AdapterGroup, inject_adapters
from mmpeft.data.datamodule import ShardDataModule
from mmpeft.errors import ConfigError
from mmpeft.models.backbone import Backbone, language_model, load_backbone
from mmpeft.module import MMPeftModule, Optim
from mmpeft.objective import lm_loss, next_token_targets


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_lm_loss_matches_transformers_loss_on_assistant_tokens(tiny_model_dirs, family):
    model = load_backbone(Backbone(pretrained=tiny_model_dirs[family]), torch.device("cpu")).eval()
    inject_adapters(language_model(model), [AdapterGroup()])
    batch = _batch(tiny_model_dirs[family])
    with torch.no_grad():
        out = model(**batch["inputs"], labels=batch["labels"], use_cache=False)
        ours = lm_loss(model, batch["inputs"], batch["labels"])
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-5)
    # Only the positions that predict an assistant token reached the LM head.
    keep, targets = next_token_targets(batch["labels"])
    assert keep.sum() == targets.numel() == (batch["labels"] != -100).sum()
    assert keep.sum() < keep.numel() // 3


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("module-shards")
    SyntheticRecipe(samples=48, samples_per_shard=24, seed=5).build(out, progress=False)
    return str(out)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_fit_with_each_optimizer_and_warmup_cosine_schedule(tmp_path, tiny_model_dirs, small_shards, optimizer):
    path = tiny_model_dirs["qwen2_vl"]
    module = MMPeftModule(
        Backbone(pretrained=path),
        [AdapterGroup("lora", ["mlp"], {"r": 64, "alpha": 64})],  # 64 x 128 A/B: big enough for 8-bit state
        Optim(lr=1e-3, warmup=2, optimizer=optimizer),
    )
    data = ShardDataModule(train=small_shards, processor=path, batch_size=4, max_length=256)
    lrs: list[float] = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordLR()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    opt = trainer.optimizers[0]
    expected = {
        "adamw": torch.optim.AdamW,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }
    assert type(opt) is expected[optimizer]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in module.parameters() if p.requires_grad
    }
    if optimizer != "adamw":
        assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values())
    # Linear warmup over 2 steps to the peak, then half a cosine down to 0 at step 6.
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 4)) for step in range(2, 6)]
    assert lrs == pytest.approx([0.0, 5e-4, *cosine], abs=1e-9)


def test_a_run_without_max_steps_is_refused_by_name(tmp_path, tiny_model_dirs, small_shards):
    path = tiny_model_dirs["llava"]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match=r"trainer\.max_steps is not set"):
        trainer.fit(MMPeftModule(Backbone(pretrained=path)), ShardDataModule(train=small_shards, processor=path))


def test_per_group_adapters_train_with_their_routing_losses_logged(tmp_path, tiny_model_dirs, small_shards):
    """HydraLoRA's recipe: plain LoRA on attention, AsymLoRA on the MLP; every auxiliary loss is logged."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from test_cli import scalars

    from mmpeft.adapters.routing import RoutingLosses

    path = tiny_model_dirs["llava"]
    module = MMPeftModule(
        Backbone(pretrained=path),
        [AdapterGroup("lora", ["attention"], {"r": 4}), AdapterGroup("asymlora", ["mlp"], {"r": 4, "heads": 3})],
        Optim(lr=1e-3, warmup=0),
        RoutingLosses(load_balance=0.05, z_loss=1e-3, localized_balance=0.01, mutual_information=0.01),
    )
    data = ShardDataModule(train=small_shards, processor=path, batch_size=4, max_length=256)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, data)
    assert module.routing_context.num_tasks == len(data.tasks) == 4
    for name in ("load_balance", "z_loss", "localized_balance", "mutual_information"):
        values = scalars(tmp_path / "run" / "version_0", f"train/aux/{name}")
        assert len(values) == 4 and all(math.isfinite(v) for v in values), name
    # Summed over the 2 x 3 routed MLP layers, each in (0, heads]: 1 when balanced, 3 when one head takes all.
    assert 0.0 < scalars(tmp_path / "run" / "version_0", "train/aux/load_balance")[0] <= 6 * 3


def test_the_module_asks_the_data_module_only_what_the_contract_lists(tmp_path, tiny_model_dirs, small_shards):
    """A data module of one's own that keeps :class:`TaskData` (and nothing of ShardDataModule besides its loaders) fits
    and validates; ShardDataModule keeps the contract too."""
    from mmpeft.data.contract import TaskData

    path = tiny_model_dirs["llava"]
    shards = ShardDataModule(train=small_shards, val=small_shards, processor=path, batch_size=4, max_length=256)
    assert isinstance(shards, TaskData)
    calls: list[str] = []

    class OwnData(L.LightningDataModule):
        """Only the contract's members and the loaders, each call recorded."""

        def __init__(self) -> None:
            super().__init__()
            self.tasks: list[str] | None = None
            self.index_metrics: dict[str, list[str]] = {}

        def setup(self, stage: str) -> None:
            shards.trainer = self.trainer
            shards.setup(stage)
            self.tasks = shards.tasks

        def keep_task_ids(self, saved: list[str], source: str) -> None:
            calls.append("keep_task_ids")

        def carry_prompts(self, on: bool) -> None:
            calls.append(f"carry_prompts({on})")
            shards.carry_prompts(on)

        @property
        def tokenizer(self):
            calls.append("tokenizer")
            return shards.tokenizer

        def batches(self, images: int = 1, image_side: int | None = None):
            calls.append("batches")
            return None  # no worst-case batch: a preflight would count the static part only

        def train_dataloader(self):
            return shards.train_dataloader()

        def val_dataloader(self):
            return shards.val_dataloader()

        def on_before_batch_transfer(self, batch, dataloader_idx):
            return shards.on_before_batch_transfer(batch, dataloader_idx)

    own = OwnData()
    assert isinstance(own, TaskData)
    module = MMPeftModule(Backbone(pretrained=path), [AdapterGroup("lora", ["mlp"], {"r": 4})], Optim(warmup=0))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, own)
    assert module.task_names() == shards.tasks and len(shards.tasks) >= 2
    assert module.routing_context.num_tasks == len(shards.tasks)
    # Fitting generates nothing by default: no prompts in validation batches, and no tokenizer kept.
    # (isinstance(own, TaskData) reads the tokenizer property, so those reads are not counted.)
    assert [call for call in calls if call != "tokenizer"] == ["carry_prompts(False)"]
    assert module.tokenizer is None
    assert math.isfinite(trainer.callback_metrics["val/loss"].item())
