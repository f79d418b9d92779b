"""Checkpoints: one file per save (sharded step directories come with the checkpoint issue).

Saves are atomic (write a temporary file, fsync, rename), so an interrupted save never replaces a
good checkpoint with a bad one. Loads use ``torch.load(weights_only=True)``: no code runs from a
checkpoint file, and NumPy arrays are stored as tensors for that reason.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def _to_tensors(obj: Any) -> Any:
    """NumPy arrays -> tensors (recursively), so the file loads with weights_only=True."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_tensors(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_checkpoint(path: str, state: dict) -> None:
    """Atomically write ``state`` (tensors, NumPy arrays, plain Python values) to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(_to_tensors(state), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (weights_only); any problem raises CheckpointError naming the file."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, tampered, or not a checkpoint at all
        raise CheckpointError(f"checkpoint '{path}' cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint '{path}' is not an ebmscale checkpoint (no model/config)")
    return state


def find_resume(run_dir: str) -> str | None:
    """The checkpoint to resume from in ``run_dir`` (None when there is none yet)."""
    path = os.path.join(run_dir, CHECKPOINT_NAME)
    return path if os.path.isfile(path) else None
