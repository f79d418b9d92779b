"""Checkpoints: step directories written by every rank, a completion marker, keep-last-k,
auto-resume with fallback, and the single-file safetensors export.

Layout of one checkpoint (``<run_dir>/checkpoints/step-N/``)::

    shared.pt        rank 0: config, counters, model, EMA, optimizer, LR scheduler, loss scaler
    rank-00000.pt    every rank r: its RNG states, data position, replay-buffer shard, sampler scaler
    buffer/          a global (Ray-hosted) buffer: each shard's own files, written by the shard
                     itself (ebmscale.buffer.shardfile); checkpoints of earlier versions hold one
                     buffer.pt written by rank 0 instead, still read
    deepspeed/       DeepSpeed runs only: every rank's ZeRO shard (fp32 master weights, optimizer)
    COMPLETE         JSON written last by rank 0: step, world size, and every file's size and SHA-256

A directory counts only once ``COMPLETE`` exists: it is written (temporary file, fsync, rename)
after a barrier that every rank reaches when all its files are on disk, so a run killed during a
save leaves an incomplete directory that resume ignores and the next save of that step replaces.

Loading is safe: ``.pt`` files load with ``torch.load(weights_only=True)`` (no code runs from a
checkpoint, NumPy arrays are stored as tensors for that reason) and every file is checked against
the size and SHA-256 recorded in ``COMPLETE`` first, so a truncated or tampered file fails with a
:class:`CheckpointError` naming it, and ``--resume auto`` falls back to the previous checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from ebmscale import dist
from ebmscale.buffer.client import as_numpy

CHECKPOINTS_DIR = "checkpoints"
MARKER = "COMPLETE"
SHARED_FILE = "shared.pt"
BUFFER_FILE = "buffer.pt"
DEEPSPEED_DIR = "deepspeed"
FORMAT = 2
EXPORT_FORMAT = "ebmscale-export-1"
_STEP_RE = re.compile(r"^step-(\d+)$")
# Test-only: "step:N" or "save:N" makes every rank sleep (so that a kill -9 lands at a known
# point) after step N, or inside the save of step N just before the completion marker.
TEST_HANG_ENV = "EBMSCALE_TEST_HANG"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def rank_file(rank: int) -> str:
    """File name of rank ``rank``'s own state inside a step directory."""
    return f"rank-{rank:05d}.pt"


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS_DIR, f"step-{step}")


# --------------------------------------------------------------------------- files

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



def file_digest(path: str, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """``write(fh)`` into a temporary file, fsync, rename over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_file(path: str, state: Any) -> dict:
    """Atomically ``torch.save`` ``state`` (tensors, NumPy arrays, plain values) to ``path``;
    returns its marker entry (size and SHA-256)."""
    data = io.BytesIO()
    torch.save(_to_tensors(state), data)
    raw = data.getvalue()
    _atomic_write(path, lambda fh: fh.write(raw))
    return {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else "no detail"
    return f"{type(exc).__name__}: {text}"


class StepCheckpoint:
    """One complete step directory: its marker, and verified reads of its files."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        marker = os.path.join(self.path, MARKER)
        if not os.path.isfile(marker):
            raise CheckpointError(f"checkpoint '{self.path}' is incomplete or not a checkpoint (no {MARKER} file)")
        try:
            with open(marker) as fh:
                self.marker = json.load(fh)
            self.step, self.world = int(self.marker["step"]), int(self.marker["world"])
            self.files: dict[str, dict] = dict(self.marker["files"])
        except Exception as exc:  # noqa: BLE001 - any damage to the marker is the same problem
            raise CheckpointError(f"checkpoint marker '{marker}' cannot be read ({_short(exc)})") from None

    def has(self, name: str) -> bool:
        return name in self.files

    def verify(self, name: str) -> bytes:
        """The bytes of file ``name`` after checking them against the marker."""
        path = os.path.join(self.path, name)
        entry = self.files.get(name)
        if entry is None:
            raise CheckpointError(f"checkpoint file '{path}' is not listed in {os.path.join(self.path, MARKER)}")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file '{path}' is missing")
        with open(path, "rb") as fh:
            raw = fh.read()
        if len(raw) != entry["bytes"]:
            raise CheckpointError(f"checkpoint file '{path}' is truncated or damaged ({len(raw)} bytes, "
                                  f"{entry['bytes']} recorded)")
        if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"checkpoint file '{path}' does not match its recorded SHA-256 (tampered or damaged)")
        return raw

    def verify_tree(self, prefix: str) -> None:
        """Check every listed file under ``prefix`` (e.g. the DeepSpeed shards)."""
        for name in self.files:
            if name.startswith(prefix + "/"):
                self.verify(name)

    def read(self, name: str, map_location: str | torch.device = "cpu") -> Any:
        """Load a verified ``.pt`` file with ``weights_only=True``."""
        raw = self.verify(name)
        try:
            return torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a file that passed its hash but is not loadable
            raise CheckpointError(f"checkpoint file '{os.path.join(self.path, name)}' cannot be loaded "
                                  f"({_short(exc)})") from None


# --------------------------------------------------------------------------- listing

def list_checkpoints(run_dir: str) -> list[tuple[int, str, bool]]:
    """``(step, path, complete)`` of every step directory under ``run_dir``, oldest first."""
    root = os.path.join(run_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m:
            path = os.path.join(root, name)
            out.append((int(m.group(1)), path, os.path.isfile(os.path.join(path, MARKER))))
    return sorted(out)


def complete_checkpoints(run_dir: str) -> list[str]:
    """Paths of the complete checkpoints, newest first."""
    return [p for _, p, done in reversed(list_checkpoints(run_dir)) if done]


def find_resume(run_dir: str) -> str | None:
    """The newest complete checkpoint in ``run_dir`` (None when there is none yet)."""
    done = complete_checkpoints(run_dir)
    return done[0] if done else None


def resolve(path: str) -> str:
    """A checkpoint path as given by a user: a step directory, or a run directory (its newest
    complete checkpoint)."""
    if os.path.isfile(os.path.join(path, MARKER)):
        return path
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
        found = find_resume(path)
        if found is None:
            raise CheckpointError(f"run directory '{path}' has no complete checkpoint")
        return found
    if os.path.isdir(path):
        raise CheckpointError(f"'{path}' is neither a checkpoint step directory (no {MARKER}) nor a run directory")
    raise CheckpointError(f"checkpoint '{path}' does not exist")


def prune(run_dir: str, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest complete checkpoints, and incomplete directories
    older than the newest complete one (left by killed saves). Returns what was removed."""
    entries = list_checkpoints(run_dir)
    done = [(s, p) for s, p, c in entries if c]
    if not done:
        return []
    newest = done[-1][0]
    kept = {p for _, p in done[-keep:]}
    removed = [p for s, p, c in entries if (c and p not in kept) or (not c and s < newest)]
    for p in removed:
        # The marker goes first: a directory half-deleted by a crash is then merely incomplete.
        marker = os.path.join(p, MARKER)
        if os.path.exists(marker):
            os.remove(marker)
        shutil.rmtree(p, ignore_errors=True)
    return removed


# --------------------------------------------------------------------------- saving

def hang_for_tests(where: str, step: int) -> None:
    """Test-only seam (``EBMSCALE_TEST_HANG=step:N|save:N``): announce and sleep so that a test
    can ``kill -9`` the process at a known point. Never set in production."""
    spec = os.environ.get(TEST_HANG_ENV, "")
    if spec == f"{where}:{step}":
        print(f"ebmscale: test hang ({where}:{step}) on rank {dist.rank()}", file=sys.stderr, flush=True)
        time.sleep(3600)


def save_checkpoint(run_dir: str, step: int, *, shared: dict | None, rank_state: dict,
                    extra_files: dict[str, dict] | None = None,
                    write_sharded: Callable[[str], None] | None = None,
                    write_global: Callable[[str], dict[str, dict]] | None = None, keep: int = 0) -> str:
    """Write checkpoint ``step`` (collective: call on every rank) and return its directory.

    ``shared`` and ``extra_files`` (name -> state) are written by rank 0, ``rank_state`` by
    every rank as ``rank-RRRRR.pt``; ``write_sharded(dir)``, when given, is called on every rank
    to write per-rank shards under ``deepspeed/``; ``write_global(dir)``, on rank 0, has the owners
    of a global state write it into the directory and returns their files' marker entries (the
    Ray buffer's shards). Rank 0 writes the marker last and then keeps
    the ``keep`` newest complete checkpoints (0 = all).
    """
    rank, world = dist.rank(), dist.world_size()
    path = step_dir(run_dir, step)
    if rank == 0:
        if os.path.exists(path):  # an incomplete leftover (or a checkpoint being redone after a rollback)
            marker = os.path.join(path, MARKER)
            if os.path.exists(marker):
                os.remove(marker)
            shutil.rmtree(path)
        os.makedirs(path)
    dist.barrier()
    entries = {rank_file(rank): write_file(os.path.join(path, rank_file(rank)), rank_state)}
    if rank == 0:
        entries[SHARED_FILE] = write_file(os.path.join(path, SHARED_FILE), shared)
        for name, state in (extra_files or {}).items():
            entries[name] = write_file(os.path.join(path, name), state)
        if write_global is not None:
            entries.update(write_global(path))
    if write_sharded is not None:
        write_sharded(os.path.join(path, DEEPSPEED_DIR))
    # Each rank hashed its own files; they reach rank 0 as small JSON side files.
    with open(os.path.join(path, f".entries-{rank:05d}.json"), "w") as fh:
        json.dump(entries, fh)
    dist.barrier()
    if rank == 0:
        files: dict[str, dict] = {}
        for r in range(world):
            side = os.path.join(path, f".entries-{r:05d}.json")
            with open(side) as fh:
                files.update(json.load(fh))
            os.remove(side)
        sharded = os.path.join(path, DEEPSPEED_DIR)
        for root, _, names in os.walk(sharded):
            for name in names:
                full = os.path.join(root, name)
                files[os.path.relpath(full, path)] = {"bytes": os.path.getsize(full), "sha256": file_digest(full)}
        hang_for_tests("save", step)
        marker = {"format": FORMAT, "step": step, "world": world, "time": time.time(), "files": files}
        _atomic_write(os.path.join(path, MARKER), lambda fh: fh.write(json.dumps(marker, indent=1).encode()))
        if keep:
            prune(run_dir, keep)
    dist.barrier()
    return path


# --------------------------------------------------------------------------- model weights

def load_checkpoint(path: str, rank: int = 0) -> dict:
    """The shared state of a checkpoint merged with rank ``rank``'s own (a step directory or a
    run directory's newest complete one). For evaluation and inspection; training resumes
    through the trainer."""
    ck = StepCheckpoint(resolve(path))
    state = ck.read(SHARED_FILE)
    if ck.has(rank_file(rank)):
        state.update(ck.read(rank_file(rank)))
    return state


def load_buffer_state(path: str) -> dict:
    """Every chain of a checkpoint's replay buffer as one :class:`ReplayBuffer` state (the global
    buffer's shards, or all ranks' local buffers, pooled in order), for sampling from the buffer
    at evaluation time. An export holds no buffer: that raises CheckpointError naming it."""
    from ebmscale.buffer.reshard import reshard_buffer_states

    if path.endswith(".safetensors"):
        raise CheckpointError(f"'{path}' is an export: it holds weights only, no replay buffer "
                              "(sample from noise, or pass the run's checkpoint)")
    from ebmscale.buffer import shardfile

    ck = StepCheckpoint(resolve(path))
    if ck.has(BUFFER_FILE):
        states = list(as_numpy(ck.read(BUFFER_FILE))["shards"])
    elif shardfile.shard_entries(ck.files):
        try:
            states = shardfile.load_all(ck.path, shardfile.shard_entries(ck.files))
        except shardfile.ShardFileError as exc:
            raise CheckpointError(str(exc)) from None
    else:
        states = [as_numpy(ck.read(rank_file(r)).get("buffer")) for r in range(ck.world)]
        if any(s is None for s in states):
            raise CheckpointError(f"checkpoint '{ck.path}' holds no replay buffer (short-run sampling keeps none)")
    return reshard_buffer_states(states, 1, 0)


def load_weights(path: str) -> dict:
    """``{"config", "step", "model", "ema"}`` from a checkpoint (step or run directory) or from
    an export (``.safetensors``); ``ema`` is None when the run kept none."""
    if path.endswith(".safetensors"):
        return _load_export(path)
    ck = StepCheckpoint(resolve(path))
    state = ck.read(SHARED_FILE)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint file '{os.path.join(ck.path, SHARED_FILE)}' is not an ebmscale "
                              "checkpoint (no model/config)")
    return {"config": state["config"], "step": int(state["step"]), "model": state["model"], "ema": state.get("ema")}


def export_weights(src: str, out: str) -> dict:
    """Write the EMA weights (the live ones when the run kept no EMA) of checkpoint ``src`` as one
    safetensors file ``out`` with the resolved config in its metadata, plus the config as YAML
    beside it (``out`` with ``.yaml``). Returns a summary."""
    from safetensors.torch import save_file

    from ebmscale.config import dump_yaml, from_dict

    if not out.endswith(".safetensors"):
        raise CheckpointError(f"export file '{out}' must end in .safetensors")
    w = load_weights(src)
    kind = "ema" if w["ema"] is not None else "model"
    # Own, contiguous copies: safetensors refuses shared or strided storage (channels_last).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in w[kind].items()}
    cfg = from_dict(w["config"])
    meta = {"format": EXPORT_FORMAT, "weights": kind, "step": str(w["step"]),
            "config": json.dumps(w["config"], sort_keys=False)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, out)
    yaml_path = out[: -len(".safetensors")] + ".yaml"
    _atomic_write(yaml_path, lambda fh: fh.write(dump_yaml(cfg).encode()))
    return {"export": out, "config": yaml_path, "weights": kind, "step": w["step"], "tensors": len(tensors),
            "bytes": os.path.getsize(out)}


def _load_export(path: str) -> dict:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"export '{path}' does not exist")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        if meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"metadata format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
        config = json.loads(meta["config"])
    except Exception as exc:  # noqa: BLE001 - truncated, tampered, or not an ebmscale export
        raise CheckpointError(f"export '{path}' cannot be loaded ({_short(exc)})") from None
    weights = tensors
    return {"config": config, "step": int(meta.get("step", 0)), "model": weights,
            "ema": weights if meta.get("weights") == "ema" else None}
