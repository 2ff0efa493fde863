"""Callbacks that tests add to real ``python -m mmpeft fit`` runs (``--trainer.callbacks+=probes.X``, with tests/ on
PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
from safetensors.torch import save_file


class RecordRanks(L.Callback):
    """Each rank writes the sample keys of every training batch it trains on, and its trainable weights at the end."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.keys: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.append(list(batch["keys"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        (self.out / f"rank{rank}.json").write_text(json.dumps({"world": trainer.world_size, "batches": self.keys}))
        weights = {n: p.detach().contiguous() for n, p in pl_module.named_parameters() if p.requires_grad}
        save_file(weights, str(self.out / f"rank{rank}.safetensors"))


class KillAt(L.Callback):
    """SIGKILL this process at the end of training step ``step`` (after any checkpoint of that step): a crash, not an
    exit."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Registered after ModelCheckpoint, so a checkpoint due at this step is already written.
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordLosses(L.Callback):
    """Appends ``{"step", "loss", "keys"}`` of every training step to a JSON-lines file (survives a kill up to the last
    step)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.out, "a") as stream:
            stream.write(
                json.dumps({"step": trainer.global_step, "loss": float(loss), "keys": list(batch["keys"])}) + "\n"
            )
