"""Validation and test scores, for every task and averaged over tasks (docs/evaluation.md).

One torchmetrics ``Metric`` per score, not per task: each keeps two ``(num_tasks,)`` states,
the sum of a per-item score and the number of items, indexed by task id and summed across
processes (``dist_reduce_fx="sum"``), so DDP needs nothing more than torchmetrics' own sync.
``compute`` gives every task's mean (NaN for a task without items), which a
``ClasswiseWrapper`` names by task. A batch adds to the tasks it holds, so a task absent from
a batch, or from the whole run, breaks nothing; an absent task is left out of the results,
and out of the mean over tasks. (``MultitaskWrapper`` does not fit: its ``update`` needs
every task in every batch.)

Scores: ``loss`` and ``token_accuracy`` under teacher forcing for every task; the generated
answer's ``exact_match``, ``vqa_accuracy`` or ``yes_no`` for the tasks that choose them
(:class:`Evaluation`).
"""

from __future__ import annotations

import math
import string
import unicodedata
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.wrappers import ClasswiseWrapper

from mmpeft.errors import ConfigError
from mmpeft.objective import IGNORE_INDEX

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
"""Number words the VQA evaluation writes as digits."""


def normalize_answer(text: str) -> str:
    """An answer as the scores compare it: SQuAD's normalisation, with VQA's digits and decimal points.

    Unicode NFKC, lowercase; punctuation removed (ASCII punctuation and every Unicode ``P*``
    character), except a ``.`` between two digits; the articles *a*, *an*, *the* dropped;
    number words from *zero* to *ten* written as digits; whitespace collapsed and stripped.
    ``"The  Red circle."`` and ``"red circle"`` are equal, as are ``"Three!"`` and ``"3"``;
    ``"3.5"`` stays ``"3.5"``.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    kept = []
    for i, char in enumerate(text):
        decimal_point = char == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
        if decimal_point or not (char in string.punctuation or unicodedata.category(char).startswith("P")):
            kept.append(char)
    words = "".join(kept).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def yes_no(text: str) -> str | None:
    """``"yes"`` or ``"no"`` when the normalised text starts with that word, else ``None``."""
    first = normalize_answer(text).split(" ", 1)[0]
    return first if first in ("yes", "no") else None


class TaskMean(Metric):
    """Base of the scores: a per-item score summed per task, and the items counted per task.

    ``compute`` returns the ``(num_tasks,)`` means, NaN where a task has no item.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_tasks = num_tasks
        self.add_state("total", torch.zeros(num_tasks), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_tasks), dist_reduce_fx="sum")

    def _add(self, scores: Tensor, task_ids: Tensor) -> None:
        """Add ``scores`` ``(n,)`` of items whose tasks are ``task_ids`` ``(n,)``."""
        task_ids = task_ids.to(self.total.device)
        self.total.index_add_(0, task_ids, scores.detach().to(self.total))
        self.count.index_add_(0, task_ids, torch.ones_like(self.total[task_ids]))

    def compute(self) -> Tensor:
        return self.total / self.count  # (num_tasks,): 0 / 0 = NaN for a task without items


class Samples(TaskMean):
    """The samples seen per task (``compute`` returns counts, not means); a task with none was absent."""

    def update(self, task_ids: Tensor) -> None:
        self._add(torch.ones_like(task_ids, dtype=torch.float), task_ids)

    def compute(self) -> Tensor:
        return self.count  # (num_tasks,)


class TokenMetric(TaskMean):
    """A score of each trained token under teacher forcing.

    ``update(logits, target, task_ids)``: ``logits`` ``(..., vocab)`` predicts ``target``
    ``(...)`` position by position (already shifted: see ``mmpeft.objective.next_token_targets``);
    positions whose target is ``IGNORE_INDEX`` (-100) are left out. ``task_ids`` gives each
    position's task, shaped like ``target``, or ``(batch,)`` for ``(batch, seq)`` targets.
    """

    def update(self, logits: Tensor, target: Tensor, task_ids: Tensor) -> None:
        if task_ids.dim() == 1 and target.dim() == 2:
            task_ids = task_ids[:, None].expand_as(target)  # (batch, seq)
        keep = target != IGNORE_INDEX  # (...)
        self._add(self.score(logits[keep].float(), target[keep]), task_ids[keep])

    def score(self, logits: Tensor, target: Tensor) -> Tensor:
        """``(n,)`` scores of ``n`` tokens from their ``(n, vocab)`` logits."""
        raise NotImplementedError


class MeanLoss(TokenMetric):
    """Mean next-token cross-entropy (nats) per trained token of a task: the LM loss on that task's tokens alone."""

    higher_is_better = False

    def score(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, reduction="none")  # (n,)


class TokenAccuracy(TokenMetric):
    """Fraction of a task's trained tokens whose logits' argmax is the target token (teacher forcing)."""

    def score(self, logits: Tensor, target: Tensor) -> Tensor:
        return (logits.argmax(dim=-1) == target).float()  # (n,)


class AnswerMetric(TaskMean):
    """A score of each generated answer against its sample's references.

    ``update(answers, references, task_ids)``: one answer string, one non-empty list of
    reference strings (the first being the sample's own answer) and one task id per sample.
    """

    def update(self, answers: list[str], references: list[list[str]], task_ids: Tensor) -> None:
        scores = [self.score(a, r) for a, r in zip(answers, references, strict=True)]
        scored = [i for i, s in enumerate(scores) if s is not None]
        if scored:
            self._add(torch.tensor([scores[i] for i in scored]), task_ids[scored])

    def score(self, answer: str, references: list[str]) -> float | None:
        """The answer's score, or ``None`` when the sample cannot be scored (it is not counted)."""
        raise NotImplementedError


class ExactMatch(AnswerMetric):
    """1 when the normalised answer equals the normalised first reference (the sample's own answer), else 0.

    Normalisation: :func:`normalize_answer`. Other references are ignored (``vqa_accuracy`` takes any of them).
    """

    def score(self, answer: str, references: list[str]) -> float:
        return float(normalize_answer(answer) == normalize_answer(references[0]))


class VQAAccuracy(AnswerMetric):
    """1 when the normalised answer is among the normalised references, else 0.

    Plain membership, not VQA v2's ``min(#matching / 3, 1)``: references here are a set of
    acceptable answers (often one), not the votes of ten annotators, and under that formula a
    sample with one reference could score at most 1/3.
    """

    def score(self, answer: str, references: list[str]) -> float:
        return float(normalize_answer(answer) in {normalize_answer(r) for r in references})


class YesNoAccuracy(AnswerMetric):
    """MME-style: 1 when the answer's leading yes/no word is the first reference's, else 0.

    The word is the first of the normalised text (``"Yes, it is."`` gives yes). An answer that
    starts with neither counts as wrong; a sample whose reference starts with neither is not
    a yes/no question and is not scored.
    """

    def score(self, answer: str, references: list[str]) -> float | None:
        expected = yes_no(references[0])
        return None if expected is None else float(yes_no(answer) == expected)


METRICS: dict[str, type[AnswerMetric]] = {
    "exact_match": ExactMatch,
    "vqa_accuracy": VQAAccuracy,
    "yes_no": YesNoAccuracy,
}
"""The generation-based scores a task can choose, by name (also the column order of the table)."""
FORCED: dict[str, type[TaskMean]] = {"samples": Samples, "loss": MeanLoss, "token_accuracy": TokenAccuracy}
"""What every task reports."""


def check_metric_names(names: Any, where: str) -> list[str]:
    """``names`` as a list of known metric names, or :class:`ConfigError` naming ``where`` and the valid names."""
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where} must be a list of metric names, got {names!r}")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown metric(s) {', '.join(map(repr, unknown))}; the metrics are {', '.join(METRICS)}"
        )
    return list(names)


@dataclass
class Evaluation:
    """What validation and test report besides every task's loss and token accuracy (docs/evaluation.md)."""

    generate: bool = True
    """``validate`` and ``test`` generate an answer to every prompt (greedy) and score it with its task's metrics;
    false: loss and token accuracy only, without the cost of decoding."""

    generate_in_fit: bool = False
    """Also generate and score answers in ``fit``'s periodic validations (off by default: decoding costs up to
    ``max_new_tokens`` forward passes per batch, at every validation)."""

    max_new_tokens: int = 32
    """Most tokens per generated answer (fewer when the model ends its turn); an answer cut here is scored as it is."""

    metrics: dict[str, list[str]] | None = None
    """Generation metrics per task, e.g. ``{vqa: [vqa_accuracy], mme: [yes_no]}``: exact_match, vqa_accuracy,
    yes_no. A task named here ignores the choice of its ``dataset.json``."""

    default_metrics: list[str] = field(default_factory=lambda: ["exact_match"])
    """The metrics of a task that neither ``metrics`` nor its shards' ``dataset.json`` names."""

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"model.evaluation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for task, names in (self.metrics or {}).items():
            check_metric_names(names, f"model.evaluation.metrics[{task!r}]")
        check_metric_names(self.default_metrics, "model.evaluation.default_metrics")

    def generates(self, fitting: bool) -> bool:
        """Whether this evaluation generates answers (``fitting``: a validation inside ``fit``)."""
        return self.generate and (self.generate_in_fit or not fitting)

    def choose(self, tasks: list[str], index: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
        """Each task's generation metrics: this config's, else the shard index's (``index``), else
        ``default_metrics``."""
        config, index = self.metrics or {}, index or {}
        return {task: list(config.get(task, index.get(task, self.default_metrics))) for task in tasks}


@dataclass
class Results:
    """One evaluation's scores: ``tasks[task][metric]`` for the tasks that had samples, and ``mean[metric]`` over
    them."""

    tasks: dict[str, dict[str, float]]
    mean: dict[str, float]
    """Each score's mean over the tasks that report it (``samples``: their total)."""

    def scalars(self, stage: str) -> dict[str, float]:
        """Logged names: ``<stage>/<metric>`` (mean over tasks) and ``<stage>/<task>/<metric>``; sample counts left out.

        The task name goes in as it is: metric names hold no ``/``, so the task is everything between
        ``<stage>/`` and the last ``/`` (how ``python -m mmpeft report`` reads it back).
        """
        out = {f"{stage}/{name}": value for name, value in self.mean.items() if name != "samples"}
        for task, row in self.tasks.items():
            out.update({f"{stage}/{task}/{name}": value for name, value in row.items() if name != "samples"})
        return out

    def table(self, title: str) -> Any:
        """A rich table: a row per task and a ``mean`` row, a column per score, ``-`` where a task has no such score.

        Task names and the title are plain text, not rich markup: ``[b]x`` shows as it is.
        """
        from rich.table import Table
        from rich.text import Text

        names = [n for n in (*FORCED, *METRICS) if n in self.mean]
        table = Table(title=Text(title))
        table.add_column("task")
        for name in names:
            table.add_column(name, justify="right", no_wrap=True)

        def cells(row: dict[str, float]) -> list[str]:
            return [("-" if n not in row else f"{row[n]:.0f}" if n == "samples" else f"{row[n]:.4f}") for n in names]

        for task, row in self.tasks.items():
            table.add_row(Text(task), *cells(row))
        table.add_section()
        table.add_row("mean", *cells(self.mean))
        return table


class PerTask(ClasswiseWrapper):
    """``ClasswiseWrapper`` that also takes a single task: torchmetrics squeezes a ``(1,)`` result to a scalar."""

    def _convert_output(self, x: Tensor) -> dict[str, Any]:
        return super()._convert_output(x.reshape(-1))


class TaskMetrics(torch.nn.Module):
    """Every task's scores for one evaluation pass, and their mean over tasks.

    ``chosen`` maps each task of the vocabulary ``tasks`` (task id = position) to its
    generation metrics (:meth:`Evaluation.choose`).
    """

    def __init__(self, tasks: list[str], chosen: dict[str, list[str]]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.chosen = {task: list(chosen.get(task, [])) for task in self.tasks}
        self.generated = [name for name in METRICS if any(name in names for names in self.chosen.values())]
        metrics = {name: cls(len(self.tasks)) for name, cls in FORCED.items()} | {
            name: METRICS[name](len(self.tasks)) for name in self.generated
        }
        # compute_groups off: two scores whose states happen to be equal after a batch must not be merged.
        self.collection = MetricCollection(
            {name: PerTask(metric, labels=self.tasks, postfix=f"/{name}") for name, metric in metrics.items()},
            compute_groups=False,
        )

    def update_forced(self, logits: Tensor, target: Tensor, token_task_ids: Tensor, task_ids: Tensor) -> None:
        """Add a batch's teacher-forced ``logits`` ``(n, vocab)`` and ``target`` ``(n,)``, the tokens' tasks ``(n,)``
        and the samples' ``(batch,)``."""
        self.collection["samples"].update(task_ids)
        for name in ("loss", "token_accuracy"):
            self.collection[name].update(logits, target, token_task_ids)

    def wants_answers(self, task_ids: Tensor) -> bool:
        """Whether a sample of these tasks is scored on a generated answer."""
        return any(self.chosen[self.tasks[t]] for t in task_ids.tolist())

    def update_answers(self, answers: list[str], references: list[list[str]], task_ids: Tensor) -> None:
        """Score a batch's generated ``answers``, each with the metrics of its sample's task."""
        tasks = [self.tasks[t] for t in task_ids.tolist()]
        for name in self.generated:
            rows = [i for i, task in enumerate(tasks) if name in self.chosen[task]]
            if rows:
                self.collection[name].update([answers[i] for i in rows], [references[i] for i in rows], task_ids[rows])

    def compute(self) -> Results:
        """The scores so far, gathered from every process (each process must call it)."""
        with warnings.catch_warnings():
            # A score that no batch of this process touched computes its zero states; that is expected.
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            values = {key: float(value) for key, value in self.collection.compute().items()}
        tasks: dict[str, dict[str, float]] = {}
        for task in self.tasks:
            if not values[f"{task}/samples"]:
                continue  # absent from every batch
            row = {name: values[f"{task}/{name}"] for name in FORCED}
            row.update(
                {
                    name: values[f"{task}/{name}"]
                    for name in self.chosen[task]
                    if not math.isnan(values[f"{task}/{name}"])
                }
            )  # NaN: nothing scored
            tasks[task] = row
        mean: dict[str, float] = {}
        for name in (*FORCED, *METRICS):
            have = [row[name] for row in tasks.values() if name in row]
            if have:
                mean[name] = sum(have) if name == "samples" else sum(have) / len(have)
        return Results(tasks, mean)

    def reset(self) -> None:
        self.collection.reset()


def print_table(table: Any) -> None:
    """Print a rich table to stdout, as wide as it needs (a log file or a pipe is not cut at 80 columns)."""
    from rich.console import Console

    console = Console()
    console.width = max(console.width, console.measure(table, options=console.options.update_width(10_000)).maximum)
    console.print(table)
