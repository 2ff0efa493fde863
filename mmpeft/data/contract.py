"""What the LightningModule asks of its data module, and nothing more.

:class:`mmpeft.data.datamodule.ShardDataModule` implements it; a data module of one's own works with
:class:`mmpeft.module.MMPeftModule` when it does too (its batches are described in
:mod:`mmpeft.objective`). The module never reads other attributes of the data module, and the data
module never reads the module's.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TaskData(Protocol):
    """The data module's side of the module/data-module contract (docs/architecture.md)."""

    tasks: list[str] | None
    """The task vocabulary, set up by the data module's ``setup`` (task id = position); ``None`` before it."""

    index_metrics: dict[str, list[str]]
    """The generation metrics the shards' ``dataset.json`` indexes choose per task (docs/evaluation.md)."""

    def keep_task_ids(self, saved: list[str], source: str) -> None:
        """Train on with the task vocabulary ``saved`` (of ``source``, named in errors), so that task ids do not
        change."""
        ...

    def carry_prompts(self, on: bool) -> None:
        """Whether validation and test batches also carry each prompt to generate an answer from."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the processor that encodes the batches (decodes generated tokens); ``None`` before
        ``setup``."""
        ...

    def batches(self, images: int = 1, image_side: int | None = None) -> Any:
        """Worst-case batches of the data's settings for the memory plan (:class:`mmpeft.planner.Batches`), each
        sample with ``images`` images of ``image_side`` pixels; ``None`` when the data module cannot make them (the
        preflight then counts what training holds before its first batch only)."""
        ...
