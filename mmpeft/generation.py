"""Generating answers (``python -m mmpeft predict``): the decoding settings and the JSONL prediction file.

``MMPeftModule.predict_step`` generates from a batch of left-padded prompts with
:class:`Generation`'s settings; :class:`JsonlWriter` (installed by the CLI for ``predict``)
writes one JSON object per sample as the batches come. See docs/predict.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import lightning as L

from mmpeft.errors import ConfigError
from mmpeft.files import _fsync_dir

DEFAULT_OUTPUT = "predictions.jsonl"
"""The prediction file's name in ``trainer.default_root_dir`` when ``predictions.output`` is not set."""


@dataclass
class Generation:
    """How ``predict`` decodes: greedy by default, or sampling or beam search."""

    max_new_tokens: int = 64
    """Most tokens generated per answer (fewer when the model ends its turn)."""

    do_sample: bool = False
    """Sample the next token (with ``temperature``, ``top_p``, ``top_k``); off: greedy, or beam search with
    ``num_beams`` > 1. Sampling follows ``seed_everything``."""

    temperature: float = 1.0
    """Sampling only: logits are divided by it (< 1 sharpens, > 1 flattens)."""

    top_p: float = 1.0
    """Sampling only: keep the smallest set of tokens whose probability reaches ``top_p`` (1: all)."""

    top_k: int = 0
    """Sampling only: keep the ``top_k`` most likely tokens (0: all). Set, so that a checkpoint's own
    ``generation_config`` does not silently restrict sampling."""

    num_beams: int = 1
    """Beam search with this many beams (1: none)."""

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value."""
        checks = {
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "temperature": (self.temperature > 0, "> 0"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "top_k": (self.top_k >= 0, ">= 0"),
            "num_beams": (self.num_beams >= 1, ">= 1"),
        }
        for key, (ok, bound) in checks.items():
            if not ok:
                raise ConfigError(f"model.generation.{key} must be {bound}, got {getattr(self, key)!r}")

    def kwargs(self) -> dict[str, Any]:
        """The arguments of ``model.generate`` (sampling ones only when sampling, so greedy decoding warns about
        none)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


class JsonlWriter(L.Callback):
    """Writes ``predict``'s answers as JSON lines, one object per sample, in the order they are generated.

    Lines go to ``<output>.partial``, flushed after every batch, and the file is renamed to
    ``output`` when prediction ends (and its path printed): a crash leaves what was generated so far
    in the ``.partial`` file, never a shorter file under the final name. With several ranks, rank ``r`` writes
    ``<stem>.rank<r><suffix>`` (each rank predicts its own share of the data; concatenate them).

    A plain callback rather than Lightning's ``BasePredictionWriter``, whose batch indices exist
    only for map-style datasets (the prompts are a stream) and which warns when they are missing.
    """

    def __init__(self, output: str | None = None) -> None:
        """
        Args:
            output: The JSONL file to write (its folder is created). Default: ``predictions.jsonl`` in
                ``trainer.default_root_dir``.
        """
        super().__init__()
        self.output = output
        self.path: Path | None = None
        """Where this rank's file goes, set when prediction starts."""
        self.rows = 0
        """Answers written so far."""
        self._stream: IO[str] | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.output).expanduser() if self.output else Path(trainer.default_root_dir) / DEFAULT_OUTPUT
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.rows = 0
        self._stream = open(self._partial, "w", encoding="utf-8")

    @property
    def _partial(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    def on_predict_batch_end(
        self, trainer, pl_module, outputs: list[dict[str, Any]], batch, batch_idx, dataloader_idx=0
    ) -> None:
        with self._naming_the_file():
            for row in outputs:
                self._stream.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._stream.flush()
        self.rows += len(outputs)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with self._naming_the_file():
            self._stream.flush()
            os.fsync(self._stream.fileno())
        stream, self._stream = self._stream, None
        stream.close()
        os.replace(self._partial, self.path)
        _fsync_dir(self.path.parent)
        print(f"predictions: {self.path.resolve()} ({self.rows} answers)", flush=True)

    @contextmanager
    def _naming_the_file(self) -> Iterator[None]:
        # A failed write (a full disk) says which file: the stream's own error does not.
        try:
            yield
        except OSError as exc:
            if exc.filename is not None:
                raise
            raise OSError(exc.errno, exc.strerror, str(self._partial)) from exc

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:  # what was written stays in the .partial file
            try:
                stream.close()
            except OSError:  # its last lines could not be written either (the error being handled)
                pass
