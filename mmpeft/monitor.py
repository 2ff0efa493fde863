"""What a run shows while it trains and when it ends, beyond Lightning's own logging.

- :class:`Monitor` logs to TensorBoard the loss of each task, samples and tokens per second,
  peak memory, and for every mixture adapter the expert load, the router entropy and, at
  every validation, a task x expert heatmap of the mean gate;
- :class:`TokensProgressBar` is Lightning's rich progress bar with the tokens per second;
- :class:`RunSummary` prints, at the end of ``fit``, the steps, the time, the best validation
  values and where the adapter, the checkpoints and the logs are.

``python -m mmpeft fit`` adds each of them unless the config lists one (:func:`default_callbacks`).
Every tag is described in docs/monitoring.md.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from mmpeft.adapters.routing import RoutingContext, RoutingStats
from mmpeft.report import best_point

TOKENS_PER_SEC = "tokens/s"
"""The progress bar's name for the tokens per second."""


def real_tokens(batch: dict[str, Any]) -> int:
    """Tokens the language model reads in ``batch``: its attention mask's ones (every position without a mask)."""
    inputs = batch["inputs"]
    mask = inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None else inputs["input_ids"].numel()


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far, in GiB: on CUDA what PyTorch's tensors held on ``device``
    (``torch.cuda.max_memory_allocated``), elsewhere the process's peak resident set size (``ru_maxrss``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024) / 2**30


def _log_step(trainer: L.Trainer) -> int:
    # The step Lightning itself gives the values a module logs in this batch (and in a validation run now).
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _log_scalars(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=_log_step(trainer))


def task_expert_table(matrix: torch.Tensor, tasks: list[str]) -> str:
    """A ``(tasks, experts)`` matrix as a Markdown table (TensorBoard's Text tab shows it), ``n/a`` for a task not seen."""
    experts = matrix.shape[1]
    lines = ["| task | " + " | ".join(f"expert {e}" for e in range(experts)) + " |", "|---" * (experts + 1) + "|"]
    for task, row in zip(tasks, matrix.tolist()):
        lines.append(f"| {task} | " + " | ".join("n/a" if math.isnan(v) else f"{v:.4f}" for v in row) + " |")
    return "\n".join(lines)


class Monitor(Callback):
    """Logs per-task training losses, throughput, peak memory and routing statistics to the run's loggers.

    Every ``trainer.log_every_n_steps`` steps, over the steps since the last log (summed over
    processes): ``train/loss/<task>``, ``train/samples_per_sec``, ``train/tokens_per_sec``,
    ``train/peak_memory_gib``, and per router group ``routing/<group>/entropy`` and
    ``routing/<group>/load/expert_<i>``. At the end of every validation, per router group, the
    task x expert mean gate of the validation batches as an image and a table
    (``routing/<group>/task_expert``). Modules without routers or tasks log what applies.
    """

    def __init__(self, window: int = 20) -> None:
        """
        Args:
            window: Training batches the progress bar's tokens per second averages over.
        """
        super().__init__()
        self.window = window
        self.tasks: list[str] = []
        self._bar: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, tokens) of the last batches
        self._clock: float | None = None
        self._interval = [0.0, 0, 0]  # seconds, samples, tokens since the last log
        self._task_loss: torch.Tensor | None = None  # (2, tasks): loss sums, samples
        self._train = RoutingStats()
        self._val = RoutingStats()
        self._context: RoutingContext | None = None
        self._trainer: L.Trainer | None = None

    # -- wiring -----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        context = getattr(pl_module, "routing_context", None)
        if isinstance(context, RoutingContext) and self._observe not in context.observers:
            context.observers.append(self._observe)
            self._context = context

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._context is not None and self._observe in self._context.observers:
            self._context.observers.remove(self._observe)
        self._context = None

    def _observe(self, context: RoutingContext) -> None:
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking:
            return
        if trainer.training:
            self._train.add(context)
        elif trainer.validating:
            self._val.add(context)

    def _read_tasks(self, trainer: L.Trainer) -> list[str]:
        # Read when a loop starts: the module's setup may still have set the data module's task vocabulary.
        self.tasks = list(getattr(trainer.datamodule, "tasks", None) or [])
        return self.tasks

    def _sum(self, trainer: L.Trainer, value: torch.Tensor) -> torch.Tensor:
        return trainer.strategy.reduce(value, reduce_op="sum")

    # -- training ---------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tasks = self._read_tasks(trainer)
        self._train = RoutingStats(len(tasks))
        self._task_loss = torch.zeros(2, len(tasks), dtype=torch.float64, device=pl_module.device)
        self._interval = [0.0, 0, 0]
        self._clock = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._clock = time.perf_counter()  # throughput counts training time only

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        seconds, self._clock = now - (self._clock or now), now
        samples, tokens = len(batch["task_ids"]), real_tokens(batch)
        self._interval = [self._interval[0] + seconds, self._interval[1] + samples, self._interval[2] + tokens]
        self._bar.append((seconds, tokens))
        bar_seconds = sum(s for s, _ in self._bar)
        if bar_seconds > 0:
            rate = sum(t for _, t in self._bar) / bar_seconds * trainer.world_size  # this rank's rate, times the ranks
            pl_module.log(TOKENS_PER_SEC, rate, prog_bar=True, logger=False, batch_size=samples)
        losses = getattr(pl_module, "sample_losses", None)  # (batch,)
        if self.tasks and losses is not None and self._task_loss is not None:
            seen = torch.isfinite(losses)
            ids = batch["task_ids"].to(self._task_loss.device)
            self._task_loss[0].index_add_(0, ids, torch.where(seen, losses, 0.0).double())
            self._task_loss[1].index_add_(0, ids, seen.double())
        # Like Lightning's own LearningRateMonitor: log when the loss is logged, once the accumulated step is done.
        if not trainer.fit_loop._should_accumulate() and trainer._logger_connector.should_update_logs:
            self._log_training(trainer, pl_module)

    def _log_training(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds, samples, tokens = self._interval
        counts = self._sum(trainer, torch.tensor([samples, tokens], dtype=torch.float64, device=pl_module.device))
        metrics: dict[str, float] = {"train/peak_memory_gib": peak_memory_gib(pl_module.device)}
        if seconds > 0:
            metrics["train/samples_per_sec"] = float(counts[0]) / seconds
            metrics["train/tokens_per_sec"] = float(counts[1]) / seconds
        self._interval = [0.0, 0, 0]
        if self._task_loss is not None and self.tasks:
            sums, seen = self._sum(trainer, self._task_loss).cpu()
            for task, total, n in zip(self.tasks, sums.tolist(), seen.tolist()):
                if n:
                    metrics[f"train/loss/{task}"] = total / n
            self._task_loss.zero_()
        self._train.reduce(lambda t: self._sum(trainer, t))
        for group, stats in self._train.results().items():
            metrics[f"routing/{group}/entropy"] = stats.entropy
            metrics.update({f"routing/{group}/load/expert_{e}": v for e, v in enumerate(stats.load.tolist())})
        self._train = RoutingStats(len(self.tasks))
        _log_scalars(trainer, metrics)

    # -- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val = RoutingStats(len(self._read_tasks(trainer)))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val.reduce(lambda t: self._sum(trainer, t))
        results = self._val.results()
        self._val = RoutingStats(len(self.tasks))
        writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not trainer.is_global_zero or not writers:
            return
        from mmpeft import plots

        step = _log_step(trainer)
        for group, stats in results.items():
            if stats.task_expert is None:
                continue
            title = f"{group}: mean gate of each task's tokens (samples), validation at step {step}"
            image = plots.rgb(plots.heatmap(stats.task_expert.numpy(), self.tasks, title))  # (height, width, 3)
            table = task_expert_table(stats.task_expert, self.tasks)
            for writer in writers:
                writer.add_image(f"routing/{group}/task_expert", image, step, dataformats="HWC")
                writer.add_text(f"routing/{group}/task_expert", table, step)


class TokensProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with the :class:`Monitor`'s tokens per second as a whole number."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        rate = metrics.get(TOKENS_PER_SEC)
        if isinstance(rate, float):
            metrics[TOKENS_PER_SEC] = f"{rate:,.0f}"
        return metrics


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


class RunSummary(Callback):
    """At the end of ``fit``, on rank zero: steps and time, the best of every ``val/*`` value, and where the outputs are."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = {}
        """Every validation's ``val/*`` values: ``tag -> [(step, value), ...]``."""
        self._start = time.monotonic()
        self._outputs: dict[str, Path] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self.history = {}
        self._outputs = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for tag, value in trainer.callback_metrics.items():
            if tag.startswith("val/"):
                self.history.setdefault(tag, []).append((_log_step(trainer), float(value)))  # TensorBoard's step

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from mmpeft.module import adapter_dir

        outputs = {"adapter": adapter_dir(trainer)}  # a collective: every rank asks
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            outputs["checkpoints"] = Path(checkpoint.dirpath)
        if trainer.logger is not None and trainer.log_dir:
            outputs["logs"] = Path(trainer.log_dir)
        self._outputs = outputs

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After the module's on_fit_end has written the adapter; teardown runs only when fit succeeded.
        if stage != "fit" or self._outputs is None or not trainer.is_global_zero:
            return
        from rich.console import Console
        from rich.table import Table

        console = Console(highlight=False)
        table = Table(title=f"fit: {trainer.global_step} steps in {_duration(time.monotonic() - self._start)}", title_justify="left")
        for column in ("validation", "best", "at step", "last"):
            table.add_column(column, justify="left" if column == "validation" else "right")
        for tag in sorted(self.history, key=lambda t: (t.count("/"), t)):
            points = self.history[tag]
            step, value = best_point(tag, points)
            table.add_row(tag, f"{value:.4g}", str(step), f"{points[-1][1]:.4g}")
        if self.history:
            console.print(table)
        else:
            console.print(table.title + " (no validation)")
        for name, path in self._outputs.items():
            console.print(f"{name + ':':13}{path.resolve()}", soft_wrap=True, markup=False)
        if "logs" in self._outputs:
            logs = self._outputs["logs"].resolve()
            console.print(f"{'report:':13}python -m mmpeft report {logs}", soft_wrap=True, markup=False)


def default_callbacks(callbacks: list[Callback], progress_bar: bool = True) -> list[Callback]:
    """The callbacks ``python -m mmpeft`` adds to the config's ``trainer.callbacks``: those of a kind the list lacks.

    A progress bar is added only where ``progress_bar`` (``trainer.enable_progress_bar``) and the list has none.
    """
    added: list[Callback] = []
    # The bar first: its teardown closes the live display before the summary prints below it.
    for kind, make in ((ProgressBar, TokensProgressBar), (Monitor, Monitor), (RunSummary, RunSummary)):
        if kind is ProgressBar and not progress_bar:
            continue
        if not any(isinstance(c, kind) for c in callbacks):
            added.append(make())
    return added
