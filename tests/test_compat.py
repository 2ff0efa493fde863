"""The libraries' private APIs mmpeft still uses are there (mmpeft/compat.py, docs/private-apis.md), and the
public replacements of the ones it stopped using give what the private ones gave.

A failure here after an upgrade names the library, its version and the missing attribute.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from mmpeft.compat import PRIVATE_APIS, PrivateAPI, last_checkpoints
from mmpeft.monitor import LogStep, Monitor, RunSummary

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("api", PRIVATE_APIS, ids=lambda api: f"{api.owner}.{api.attribute}")
def test_each_private_api_mmpeft_uses_is_still_there(api: PrivateAPI):
    module, _, name = api.owner.partition(":")
    owner = getattr(importlib.import_module(module), name)
    version = importlib.metadata.version(api.distribution)
    assert hasattr(owner, api.attribute), (
        f"{api.distribution} {version}: {api.owner} has no {api.attribute} any more; "
        f"{api.used_in} needs another way (docs/private-apis.md)"
    )


def test_every_private_api_is_listed_in_the_docs():
    page = (ROOT / "docs" / "private-apis.md").read_text()
    for api in PRIVATE_APIS:
        name = f"`{api.owner.partition(':')[2]}.{api.attribute}`"  # `ModelCheckpoint._find_last_checkpoints`
        assert name in page and api.used_in.split(" ")[0] in page, name


def test_last_checkpoints_are_the_ones_lightning_resumes_from(tmp_path):
    for name in ("last.ckpt", "last-v1.ckpt", "epoch=0-step=4.ckpt", "last.txt", "lastly.ckpt"):
        (tmp_path / name).write_bytes(b"")
    callback = ModelCheckpoint(dirpath=tmp_path)
    trainer = L.Trainer(logger=False, callbacks=[callback], enable_progress_bar=False, enable_model_summary=False)
    found = last_checkpoints(callback, trainer)
    # Lightning's pattern: last, then an optional -<number>; "lastly" matches its regular expression too.
    assert {Path(p).name for p in found} == {"last.ckpt", "last-v1.ckpt", "lastly.ckpt"}
    assert last_checkpoints(ModelCheckpoint(dirpath=tmp_path / "none"), trainer) == set()


def test_a_single_task_still_gets_its_named_score():
    """metrics.PerTask overrides torchmetrics' private ClasswiseWrapper._convert_output: still called by compute."""
    from mmpeft.metrics import PerTask, Samples

    metric = PerTask(Samples(1), labels=["only"], postfix="/samples")
    metric.update(torch.tensor([0, 0, 0]))
    assert {k: float(v) for k, v in metric.compute().items()} == {"only/samples": 3.0}


# -- the step Lightning logs at, from public API (mmpeft.monitor.LogStep) --------------------------


class Recorder(Logger):
    """Every ``log_metrics`` call Lightning and the callbacks make: ``(step, names)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, set[str]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, set(metrics)))

    def steps(self, tag: str) -> list[int | None]:
        return sorted({step for step, names in self.calls if tag in names})


class Tiny(L.LightningModule):
    """A linear layer on batches shaped like mmpeft's (``inputs``, ``task_ids``), logging Lightning's own losses."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.layer(batch["inputs"]["input_ids"].float()).pow(2).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, batch_size=2)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), batch_size=2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(batches: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = [
        {"inputs": {"input_ids": torch.randint(0, 9, (2, 4), generator=g)}, "task_ids": torch.tensor([0, 1])}
        for _ in range(batches)
    ]
    return torch.utils.data.DataLoader(data, batch_size=None)


class Oracle(Callback):
    """``LogStep`` beside what public hooks say: the optimizer stepped in a batch iff ``on_before_optimizer_step``
    ran."""

    def __init__(self) -> None:
        self.clock = LogStep()
        self.optimizer_stepped = False
        self.seen: list[tuple[bool, bool]] = []  # (LogStep.stepped, optimizer stepped) of each batch
        self.validation_steps: list[int] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.clock.reset()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.batch_start(trainer)
        self.optimizer_stepped = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.optimizer_stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append((self.clock.stepped(trainer), self.optimizer_stepped))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validation_steps.append(self.clock.step(trainer))


def fit(tmp_path, max_steps: int, ckpt_path: str | None = None) -> tuple[Recorder, Oracle, RunSummary]:
    recorder, oracle, summary = Recorder(), Oracle(), RunSummary()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=2,
        log_every_n_steps=2,
        val_check_interval=3,  # every 3 batches: after a batch that stepped and after one that did not
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=recorder,
        callbacks=[
            Monitor(),
            oracle,
            summary,
            ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module = Tiny()
    trainer.fit(module, train_dataloaders=loader(11), val_dataloaders=loader(1), ckpt_path=ckpt_path)
    return recorder, oracle, summary


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_monitor_logs_at_the_steps_lightning_logs_at(tmp_path, resumed):
    if resumed:
        fit(tmp_path, max_steps=4)  # checkpoints after steps 2 and 4, saved in on_train_batch_end
        recorder, oracle, summary = fit(tmp_path, max_steps=7, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    else:
        recorder, oracle, summary = fit(tmp_path, max_steps=7)  # 11 batches of 2 accumulated: the last steps alone
    assert oracle.seen and [stepped for stepped, _ in oracle.seen] == [optimizer for _, optimizer in oracle.seen]
    lightning = recorder.steps("train/loss")
    assert len(lightning) >= 2 and None not in lightning
    for tag in ("train/peak_memory_gib", "train/samples_per_sec", "train/tokens_per_sec"):
        assert recorder.steps(tag) == lightning, tag
    validations = recorder.steps("val/loss")
    assert len(validations) >= 2 and oracle.validation_steps == validations
    # The summary's "at step" (its history also holds the validations before the checkpoint it resumed from).
    assert [step for step, _ in summary.history["val/loss"]][-len(validations) :] == validations


# -- what the monitor reads of the module: mmpeft.monitor.Monitored --------------------------------


def test_the_monitor_reads_a_module_through_its_protocol_or_not_at_all():
    from mmpeft.adapters.routing import RoutingContext
    from mmpeft.monitor import Monitored, monitored

    # MMPeftModule keeps the protocol: tests/test_monitor.py fits one with the monitor.
    assert monitored(Tiny()) is None  # not an mmpeft module: throughput and memory only

    class Partial(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.routing_context = RoutingContext()

    with pytest.raises(TypeError, match="Partial has routing_context but not sample_losses, task_names"):
        monitored(Partial())

    class Complete(Partial):
        sample_losses = None

        def task_names(self) -> list[str]:
            return ["a"]

    module = Complete()
    assert monitored(module) is module and isinstance(module, Monitored)
    module.routing_context = "not a context"
    with pytest.raises(TypeError, match="Complete.routing_context is a str, not a mmpeft.adapters.routing"):
        monitored(module)


def test_the_live_bar_counts_optimizer_steps(tmp_path):
    """TokensProgressBar draws through Lightning's public hook and rich's public ``Progress.update``."""
    import io

    import rich

    from mmpeft.monitor import TokensProgressBar

    screen = io.StringIO()
    bar = TokensProgressBar(interactive=True, console_kwargs={"file": screen, "force_terminal": True, "width": 160})
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar],
        default_root_dir=tmp_path,
    )
    try:
        trainer.fit(Tiny(), train_dataloaders=loader(11))
        # After its last refresh the bar shows steps of max_steps, not the epoch's 10 batches.
        task = bar.progress.tasks[bar.train_progress_bar_id]
        assert (task.completed, task.total) == (5, 5)
        assert "5/5" in screen.getvalue() and "10/11" not in screen.getvalue()
    finally:
        rich.reconfigure()  # the bar's console_kwargs reconfigured rich's global console
