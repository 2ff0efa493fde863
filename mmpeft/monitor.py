"""What a run shows while it trains and when it ends, beyond Lightning's own logging.

- :class:`Monitor` logs to TensorBoard the loss of each task, samples and tokens per second,
  peak memory, and for every mixture adapter the expert load, the router entropy and, at
  every validation, a task x expert heatmap of the mean gate;
- :class:`TokensProgressBar` is Lightning's rich progress bar counting steps of ``max_steps``,
  with the tokens per second, or plain lines where the output is not a terminal;
- :class:`RunSummary` prints, at the end of ``fit``, the steps this invocation ran, the time,
  the skipped samples, the best validation values and where the adapter, the checkpoints and
  the logs are; it keeps the run's folder in each checkpoint, for a resumed run to log there.

``python -m mmpeft fit`` adds each of them unless the config lists one (:func:`default_callbacks`).
Every tag is described in docs/monitoring.md.
"""

from __future__ import annotations

import html
import math
import re
import resource
import sys
import time
from collections import Counter, deque
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from mmpeft.adapters.routing import RoutingContext, RoutingStats
from mmpeft.packing import PACKING
from mmpeft.report import best_point

TOKENS_PER_SEC = "tokens/s"
"""The progress bar's name for the tokens per second."""


def real_tokens(batch: dict[str, Any]) -> int:
    """Tokens the language model reads in ``batch``: its attention mask's ones, a packed batch's sample positions
    (every position without either)."""
    inputs = batch["inputs"]
    packed = batch.get(PACKING)
    mask = inputs.get("attention_mask") if packed is None else packed["sample"] >= 0
    return int(mask.sum()) if mask is not None else inputs["input_ids"].numel()


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far, in GiB: on CUDA what PyTorch's tensors held on ``device``
    (``torch.cuda.max_memory_allocated``), elsewhere the process's peak resident set size (``ru_maxrss``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024) / 2**30


class LogStep:
    """The step at which Lightning logs what a module logs (``self.log``) in this training batch and in a
    validation run after it, and whether this batch stepped the optimizer: from public API only.

    ``trainer.global_step`` counts optimizer steps, and the optimizer steps inside the batch,
    before ``on_train_batch_end``; Lightning logs a batch's values (and those of a validation run
    after the batch) at the count of batches that stepped *before* it. With automatic
    optimization (one optimizer, as :class:`mmpeft.module.MMPeftModule` trains) that is the
    ``global_step`` the batch started at, which a callback records in ``on_train_batch_start``.
    Outside a training batch (``validate``, ``test``) it is ``global_step``.
    tests/test_compat.py checks it against the steps of Lightning's own ``train/loss`` and ``val/loss``.
    """

    def __init__(self) -> None:
        self.start: int | None = None
        """``trainer.global_step`` when the last training batch started; ``None`` before the first."""

    def reset(self) -> None:
        """Forget the last batch (a new ``fit``, ``validate`` or ``test`` starts)."""
        self.start = None

    def batch_start(self, trainer: L.Trainer) -> None:
        """Call in ``on_train_batch_start``."""
        self.start = trainer.global_step

    def stepped(self, trainer: L.Trainer) -> bool:
        """Whether the optimizer stepped in this training batch (Lightning's accumulation and last-batch rules)."""
        return self.start is not None and trainer.global_step != self.start

    def step(self, trainer: L.Trainer) -> int:
        """The step Lightning gives the values logged now."""
        return trainer.global_step if self.start is None else self.start

    def logs_now(self, trainer: L.Trainer) -> bool:
        """Whether Lightning writes this training batch's values to the loggers: the batch stepped and it is
        every ``trainer.log_every_n_steps``-th step, or training stops."""
        every = trainer.log_every_n_steps
        return self.stepped(trainer) and every > 0 and ((self.step(trainer) + 1) % every == 0 or trainer.should_stop)


class StepTracking(Callback):
    """A callback that knows the step Lightning logs at: its :class:`LogStep` (``self._step``), fed at the
    start of every training batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._step = LogStep()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step.batch_start(trainer)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


@runtime_checkable
class Monitored(Protocol):
    """What :class:`Monitor` reads of the LightningModule; :class:`mmpeft.module.MMPeftModule` keeps it.

    A module with none of these members gets the throughput and memory only (no per-task losses,
    no routing statistics); one with some but not all of them is an error at ``setup``.
    """

    routing_context: RoutingContext
    """The routers' shared context: :class:`Monitor` observes every router record through it."""

    sample_losses: torch.Tensor | None
    """The last training batch's loss of each sample ``(batch,)``, detached; ``None`` before the first."""

    def task_names(self) -> list[str]:
        """The task vocabulary (task id = position), final when a loop starts."""
        ...


_MONITORED = ("routing_context", "sample_losses", "task_names")


def monitored(pl_module: L.LightningModule) -> Monitored | None:
    """``pl_module`` when it keeps :class:`Monitored`, ``None`` when it has none of its members; else an error."""
    present = [name for name in _MONITORED if hasattr(pl_module, name)]
    if not present:
        return None
    kind = type(pl_module).__qualname__
    if len(present) < len(_MONITORED):
        missing = ", ".join(name for name in _MONITORED if name not in present)
        raise TypeError(
            f"Monitor: {kind} has {', '.join(present)} but not {missing}; "
            "a module keeps all of mmpeft.monitor.Monitored or none"
        )
    context = pl_module.routing_context
    if not isinstance(context, RoutingContext):
        raise TypeError(
            f"Monitor: {kind}.routing_context is a {type(context).__qualname__}, "
            "not a mmpeft.adapters.routing.RoutingContext"
        )
    assert isinstance(pl_module, Monitored)
    return pl_module


def _log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def markdown_text(text: str) -> str:
    """``text`` as literal Markdown table-cell text: HTML characters as entities, Markdown's punctuation and ``|``
    escaped."""
    text = html.escape(" ".join(text.splitlines()), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|])", r"\\\1", text)


def task_expert_table(matrix: torch.Tensor, tasks: list[str]) -> str:
    """A ``(tasks, experts)`` matrix as a Markdown table (TensorBoard's Text tab shows it), ``n/a`` for a task not seen.

    Task names are escaped (:func:`markdown_text`): each shows as it is, in its own cell.
    """
    experts = matrix.shape[1]
    lines = ["| task | " + " | ".join(f"expert {e}" for e in range(experts)) + " |", "|---" * (experts + 1) + "|"]
    for task, row in zip(tasks, matrix.tolist()):
        lines.append(
            f"| {markdown_text(task)} | " + " | ".join("n/a" if math.isnan(v) else f"{v:.4f}" for v in row) + " |"
        )
    return "\n".join(lines)


class Monitor(StepTracking):
    """Logs per-task training losses, throughput, peak memory and routing statistics to the run's loggers.

    Every ``trainer.log_every_n_steps`` steps, over the steps since the last log (summed over
    processes): ``train/loss/<task>``, ``train/samples_per_sec``, ``train/tokens_per_sec``,
    ``train/peak_memory_gib``, and per router group ``routing/<group>/entropy`` and
    ``routing/<group>/load/expert_<i>``. At the end of every validation, per router group, the
    task x expert mean gate of the validation batches as an image and a table
    (``routing/<group>/task_expert``). Modules without routers or tasks log what applies; what the
    monitor reads of the module is :class:`Monitored`. Every value is logged at the step Lightning
    logs the module's own values at (:class:`LogStep`).
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
        self._module: Monitored | None = None

    # -- wiring -----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self._step.reset()
        self._module = monitored(pl_module)
        context = self._module.routing_context if self._module is not None else None
        if context is not None and self._observe not in context.observers:
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

    def _read_tasks(self) -> list[str]:
        # Read when a loop starts: the module's setup may still have changed the task vocabulary.
        self.tasks = list(self._module.task_names()) if self._module is not None else []
        return self.tasks

    def _sum(self, trainer: L.Trainer, value: torch.Tensor) -> torch.Tensor:
        return trainer.strategy.reduce(value, reduce_op="sum")

    # -- training ---------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tasks = self._read_tasks()
        self._train = RoutingStats(len(tasks))
        self._task_loss = torch.zeros(2, len(tasks), dtype=torch.float64, device=pl_module.device)
        self._interval = [0.0, 0, 0]
        self._clock = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._clock = time.perf_counter()  # throughput counts training time only

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        seconds, self._clock = now - (self._clock or now), now
        samples, tokens = len(batch["task_ids"]), real_tokens(batch)
        self._interval = [self._interval[0] + seconds, self._interval[1] + samples, self._interval[2] + tokens]
        self._bar.append((seconds, tokens))
        bar_seconds = sum(s for s, _ in self._bar)
        if bar_seconds > 0:
            rate = sum(t for _, t in self._bar) / bar_seconds * trainer.world_size  # this rank's rate, times the ranks
            pl_module.log(TOKENS_PER_SEC, rate, prog_bar=True, logger=False, batch_size=samples)
        losses = self._module.sample_losses if self._module is not None else None  # (batch,)
        if self.tasks and losses is not None and self._task_loss is not None:
            seen = torch.isfinite(losses)
            ids = batch["task_ids"].to(self._task_loss.device)
            self._task_loss[0].index_add_(0, ids, torch.where(seen, losses, 0.0).double())
            self._task_loss[1].index_add_(0, ids, seen.double())
        # Log when Lightning logs the loss (as its own LearningRateMonitor does), once the accumulated step is done.
        if self._step.logs_now(trainer):
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
        _log_scalars(trainer, metrics, self._step.step(trainer))

    # -- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val = RoutingStats(len(self._read_tasks()))

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

        step = self._step.step(trainer)
        for group, stats in results.items():
            if stats.task_expert is None:
                continue
            title = f"{group}: mean gate of each task's tokens (samples), validation at step {step}"
            image = plots.rgb(plots.heatmap(stats.task_expert.numpy(), self.tasks, title))  # (height, width, 3)
            table = task_expert_table(stats.task_expert, self.tasks)
            for writer in writers:
                writer.add_image(f"routing/{group}/task_expert", image, step, dataformats="HWC")
                writer.add_text(f"routing/{group}/task_expert", table, step)


def _clock(seconds: float) -> str:
    """``h:mm:ss``, like the bar's time column."""
    return str(timedelta(seconds=max(0, int(seconds))))


class TokensProgressBar(StepTracking, RichProgressBar):
    """Lightning's rich progress bar counting optimizer steps of ``trainer.max_steps``, with the tokens per second;
    plain lines instead where the output is not a terminal (a log file, a pipe).

    In a terminal the training bar shows the steps done and ``max_steps``, the elapsed time and
    the time left, the steps per second, ``train/loss``, the :class:`Monitor`'s tokens per second
    (a whole number) and the last ``val/loss`` (Lightning's ``v_num``, the logger's version, is
    left out). Elsewhere a live display would only ever show its final frame, so the bar prints a
    line every ``every_n_steps`` steps and at the last one::

        step 50/150  loss 2.310  1,234 tokens/s  elapsed 0:00:20  eta 0:00:40

    one after each validation (``validation at step 50/150  val/loss 2.104  (0:00:03)``), and in
    ``validate``, ``test`` and ``predict`` one every ``every_n_steps`` batches and one at the end.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        interactive: bool | None = None,
        refresh_rate: int = 100,
        leave: bool = False,
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            every_n_steps: Steps (batches outside ``fit``) between two plain lines.
                Default: ``trainer.log_every_n_steps``.
            interactive: Draw the live bar (``True``) or print plain lines (``False``).
                Default: the bar when the output is a terminal.
            refresh_rate: The live bar's refreshes per second (0: none).
            leave: Leave each finished bar on the screen.
            console_kwargs: Arguments of the ``rich.console.Console`` the live bar draws on.
        """
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs=console_kwargs)
        self.every_n_steps = every_n_steps
        self.interactive = interactive
        self._console_args = dict(console_kwargs or {})  # the terminal test's console, as the bar's will be
        self._plain = False
        self._plain_enabled = True
        self._start = time.monotonic()
        self._start_step = 0
        self._eval_start = time.monotonic()
        self._eval_batches = 0

    # -- which kind -------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        interactive = self.interactive
        if interactive is None:
            from rich.console import Console

            console = Console(**self._console_args)
            interactive = console.is_terminal or console.is_jupyter
        self._plain = not interactive
        if self._plain:
            super().disable()  # the rich machinery stays idle (the plain lines keep their own switch)
        self._step.reset()
        super().setup(trainer, pl_module, stage)

    def disable(self) -> None:
        super().disable()
        self._plain_enabled = False

    def enable(self) -> None:
        self._plain_enabled = True
        if not self._plain:
            super().enable()

    @property
    def _printing(self) -> bool:
        return self._plain and self._plain_enabled

    def _every(self, trainer: L.Trainer) -> int:
        return max(1, self.every_n_steps or trainer.log_every_n_steps or 1)

    @staticmethod
    def _max_steps(trainer: L.Trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None

    # -- what it shows ----------------------------------------------------------------------
    def get_metrics(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: the folder the summary names
        rate = metrics.get(TOKENS_PER_SEC)
        if isinstance(rate, float):
            metrics[TOKENS_PER_SEC] = f"{rate:,.0f}"
        return metrics

    def _add_train_task(self, trainer: L.Trainer) -> None:
        # Steps of max_steps, from the step the run starts at (a resumed run included).
        description = f"{self.train_description:{len(self.validation_description)}}"
        self.train_progress_bar_id = self.progress.add_task(
            description, total=self._max_steps(trainer), completed=trainer.global_step
        )

    # -- training ---------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step = time.monotonic(), trainer.global_step
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._max_steps(trainer) is None:  # a run of epochs: Lightning's bar of each epoch's batches
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is None:
            self._add_train_task(trainer)
            self.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._printing:
            self._print_step(trainer)
            return
        steps = self._max_steps(trainer) is not None
        if steps and self.is_enabled and self.progress is not None and self.train_progress_bar_id is None:
            self._add_train_task(trainer)
        # Lightning's bar updates the metrics column and counts the epoch's batches; a run of
        # max_steps counts optimizer steps instead, set right after (before the bar draws again).
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if steps and self.is_enabled and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
            self.refresh()

    def _print_step(self, trainer: L.Trainer) -> None:
        step, total = trainer.global_step, self._max_steps(trainer)
        if not self._step.stepped(trainer) or (step % self._every(trainer) and step != total):
            return
        metrics = trainer.progress_bar_metrics
        elapsed = time.monotonic() - self._start
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.3f}")
        if TOKENS_PER_SEC in metrics:
            parts.append(f"{float(metrics[TOKENS_PER_SEC]):,.0f} tokens/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        done = step - self._start_step
        if total and done > 0:
            parts.append(f"eta {_clock(elapsed / done * (total - step))}")
        print("  ".join(parts), flush=True)

    # -- validation, test, predict ----------------------------------------------------------
    def _start_eval(self) -> None:
        self._eval_start, self._eval_batches = time.monotonic(), 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_eval()
        super().on_validation_start(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_eval()
        super().on_test_start(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_eval()
        super().on_predict_start(trainer, pl_module)

    def _print_eval_batch(self, trainer: L.Trainer, name: str, batch_idx: int, dataloader_idx: int) -> None:
        if not self._printing or trainer.state.fn == TrainerFn.FITTING or (batch_idx + 1) % self._every(trainer):
            return
        total = {
            "validate": trainer.num_val_batches,
            "test": trainer.num_test_batches,
            "predict": trainer.num_predict_batches,
        }[name]
        total = total[dataloader_idx] if isinstance(total, list) and dataloader_idx < len(total) else total
        of = f"/{int(total)}" if isinstance(total, (int, float)) and math.isfinite(total) else ""
        print(f"{name} batch {batch_idx + 1}{of}  elapsed {_clock(time.monotonic() - self._eval_start)}", flush=True)

    def _print_eval_end(self, trainer: L.Trainer, name: str, batches: int) -> None:
        if self._printing and trainer.state.fn != TrainerFn.FITTING:
            print(f"{name}: {batches} batches in {_clock(time.monotonic() - self._eval_start)}", flush=True)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._print_eval_batch(trainer, "validate", batch_idx, dataloader_idx)
        self._eval_batches = batch_idx + 1
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._print_eval_batch(trainer, "test", batch_idx, dataloader_idx)
        self._eval_batches = batch_idx + 1
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._print_eval_batch(trainer, "predict", batch_idx, dataloader_idx)
        self._eval_batches = batch_idx + 1
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._printing or trainer.sanity_checking:
            return
        if trainer.state.fn != TrainerFn.FITTING:
            return self._print_eval_end(trainer, "validate", self._eval_batches)
        total = self._max_steps(trainer)
        loss = trainer.callback_metrics.get("val/loss")
        parts = [f"validation at step {trainer.global_step}" + (f"/{total}" if total else "")]
        if loss is not None:
            parts.append(f"val/loss {float(loss):.3f}")
        parts.append(f"({_clock(time.monotonic() - self._eval_start)})")
        print("  ".join(parts), flush=True)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_end(trainer, pl_module)
        self._print_eval_end(trainer, "test", self._eval_batches)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_end(trainer, pl_module)
        self._print_eval_end(trainer, "predict", self._eval_batches)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda rn: (-rn[1], rn[0])))


def _sum_over_ranks(trainer: L.Trainer, counts: Counter[str]) -> Counter[str]:
    """``counts`` summed over the processes (a collective); reasons are strings, so each rank's dict is gathered."""
    import torch.distributed as dist

    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return counts
    gathered: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counts))
    total: Counter[str] = Counter()
    for part in gathered:
        total.update(part or {})
    return total


class RunSummary(StepTracking):
    """At the end of ``fit``, on rank zero: the steps this invocation ran and its time, the skipped samples,
    the best of every ``val/*`` value, and where the outputs are.

    Its state, saved in every checkpoint, holds the run's log folder and validation history: a run
    resumed from the checkpoint (``--ckpt_path``) logs into the same folder (``python -m mmpeft``
    sets the logger's version from it) and its summary's table covers the whole run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = {}
        """Every validation's ``val/*`` values: ``tag -> [(step, value), ...]``."""
        self.skipped: dict[str, Counter[str]] = {"training": Counter(), "validation": Counter()}
        """Samples skipped in this invocation, by reason, of the training and the validation batches."""
        self.log_dir: str | None = None
        """The run's log folder (absolute), saved with each checkpoint."""
        self.version: int | str | None = None
        """The logger's version of that folder."""
        self._start = time.monotonic()
        self._start_step = 0
        self._outputs: dict[str, Path] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before a checkpoint's state is loaded (load_state_dict), which then restores the run's history.
        self._step.reset()
        self.history = {}
        self.skipped = {"training": Counter(), "validation": Counter()}
        self._outputs = None
        self._start_step = 0
        self.log_dir = str(Path(trainer.log_dir).resolve()) if trainer.logger is not None and trainer.log_dir else None
        self.version = trainer.logger.version if trainer.logger is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {tag: [list(p) for p in points] for tag, points in self.history.items()},
            "log_dir": self.log_dir,
            "version": self.version,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {
            tag: [(int(s), float(v)) for s, v in points] for tag, points in state_dict.get("history", {}).items()
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step  # a resumed run starts at its checkpoint's step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.skipped["training"].update(batch.get("skipped", {}) if isinstance(batch, dict) else {})

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and isinstance(batch, dict):
            self.skipped["validation"].update(batch.get("skipped", {}))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for tag, value in trainer.callback_metrics.items():
            if tag.startswith("val/"):
                step = self._step.step(trainer)  # the step TensorBoard shows the value at
                self.history.setdefault(tag, []).append((step, float(value)))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from mmpeft.module import adapter_dir

        outputs = {"adapter": adapter_dir(trainer)}  # a collective: every rank asks
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            outputs["checkpoints"] = Path(checkpoint.dirpath)
        if trainer.logger is not None and trainer.log_dir:
            outputs["logs"] = Path(trainer.log_dir)
        self._outputs = outputs
        self.skipped = {
            split: _sum_over_ranks(trainer, counts) for split, counts in self.skipped.items()
        }  # collectives too

    def title(self, trainer: L.Trainer, seconds: float) -> str:
        """``fit: 12 steps in 0m 19s``; a resumed run: ``fit: 4 steps (resumed at step 12, now at step 16) in
        0m 05s``."""
        steps = trainer.global_step - self._start_step
        resumed = (
            f" (resumed at step {self._start_step}, now at step {trainer.global_step})" if self._start_step else ""
        )
        return f"fit: {steps} steps{resumed} in {_duration(seconds)}"

    def skipped_line(self) -> str:
        """``2 training samples (bad_json 1, image_count_mismatch 1)``, and the validation's, or ``none``."""
        parts = [
            f"{sum(c.values())} {split} samples ({_counts(c)})" for split, c in self.skipped.items() if sum(c.values())
        ]
        return "; ".join(parts) or "none"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After the module's on_fit_end has written the adapter; teardown runs only when fit succeeded.
        if stage != "fit" or self._outputs is None or not trainer.is_global_zero:
            return
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        console = Console(highlight=False)
        title = self.title(trainer, time.monotonic() - self._start)
        table = Table()
        for column in ("validation", "best", "at step", "last"):
            table.add_column(column, justify="left" if column == "validation" else "right")
        for tag in sorted(self.history, key=lambda t: (t.count("/"), t)):
            points = self.history[tag]
            step, value = best_point(tag, points)
            table.add_row(Text(tag), f"{value:.4g}", str(step), f"{points[-1][1]:.4g}")
        console.print(title + ("" if self.history else " (no validation)"), soft_wrap=True, markup=False)
        if self.history:
            console.print(table)
        console.print(f"{'skipped:':13}{self.skipped_line()}", soft_wrap=True, markup=False)
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
