"""Training checkpoints that survive a kill, each with an adapter directory beside it.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary
file lies in the system's temp folder: when that is another file system the final move is a
copy, and nothing is fsynced, so a kill or power loss during a save can leave a truncated
``last.ckpt``. :class:`AtomicCheckpointIO` writes the temporary file next to the target,
fsyncs it and renames it (:mod:`mmpeft.files`), then writes the checkpoint's adapter as an
adapter directory ``<name>-adapter/`` (see :mod:`mmpeft.saving`) from the same tensors.
:class:`~mmpeft.module.MMPeftModule` installs it in place of the default one.

The module also stores the random number generators' states in each checkpoint and restores
them right before the first resumed step, so that dropout draws the same masks as in a run
that was never interrupted.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mmpeft.files import atomic_file
from mmpeft.saving import AdapterSpec, save_adapter

ADAPTER_KEY = "mmpeft_adapter"
"""Checkpoint key of the adapter's ``adapter_config.json`` contents."""
RNG_KEY = "mmpeft_rng"
"""Checkpoint key of the random number generators' states."""
MODEL_PREFIX = "model."
"""Prefix of the transformers model's tensors in the LightningModule's state dict."""


def adapter_dir_for(checkpoint_path: str | Path) -> Path:
    """``runs/x/checkpoints/last.ckpt`` -> ``runs/x/checkpoints/last-adapter``."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + "-adapter")


def _is_local(path: Any) -> bool:
    return "://" not in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary sibling, fsync, rename; plus ``<name>-adapter/``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as stream:
            torch.save(checkpoint, stream)
        spec = checkpoint.get(ADAPTER_KEY)
        if spec is not None:
            tensors = {
                k[len(MODEL_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)
            }
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            save_adapter(adapter_dir_for(path), AdapterSpec.from_json(spec, str(path)), tensors)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if _is_local(path):
            shutil.rmtree(adapter_dir_for(path), ignore_errors=True)


def rng_states() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's generators (CUDA's too when present)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain types and tensors only: Lightning loads checkpoints with torch.load(weights_only=True).
    numpy = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    states = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
