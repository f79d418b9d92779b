"""The checkpoint manager: save, keep-k, load (latest with fallback), world-size re-split and the
I/O of rollbacks, over one ordered dict of stateful parts that the trainer registers.

A part is a key and a scope:

- ``shared``: identical on every rank, written once by rank 0 into ``shared.pt`` (model, EMA,
  optimizer, scheduler, counters...);
- ``rank``: every rank's own, in ``rank-RRRRR.pt`` (RNG, data position, a local buffer shard...);
  on a world-size change its ``remap`` builds this rank's state from every old rank's (a part
  without one takes the state of old rank ``rank % old_world``);
- ``global``: one state for the whole cluster held outside the ranks (the Ray-hosted buffer), saved
  by its :class:`GlobalWriter`; the default writer gathers it on rank 0 into ``<key>.pt``. A part
  that scales with the cluster supplies a writer of its own that writes its shards from where they
  live and returns their marker entries: nothing else changes.

Parts load in registration order. The file layout is :mod:`ebmscale.checkpoint`'s.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ebmscale import dist
from ebmscale.checkpoint import (DEEPSPEED_DIR, SHARED_FILE, CheckpointError, StepCheckpoint, complete_checkpoints,
                                 rank_file, save_checkpoint, write_file)
from ebmscale.config import ConfigError

SCOPES = ("shared", "rank", "global")


@dataclass
class Part:
    key: str
    scope: str
    save: Callable[[], Any]
    load: Callable[[Any], None] | None = None  # None: saved for reading only (e.g. the config)
    remap: Callable[[list[Any]], Any] | None = None  # rank parts: states of every old rank -> this rank's


class GlobalWriter:
    """How a global part reaches a checkpoint. This default gathers the state on rank 0 and writes
    it as ``<key>.pt``; a sharded part overrides :meth:`write` (called on every rank, returning the
    marker entries of the files this rank wrote) and :meth:`read`."""

    def __init__(self, part: Part):
        self.part = part
        self.file = f"{part.key}.pt"

    def write(self, path: str, rank: int) -> dict[str, dict]:
        if rank != 0:
            return {}
        return {self.file: write_file(os.path.join(path, self.file), self.part.save())}

    def read(self, ck: StepCheckpoint, rank: int) -> Any | None:
        """The state to load on ``rank`` (None: nothing for this rank; rank 0 restores it all)."""
        return ck.read(self.file) if rank == 0 and ck.has(self.file) else None


class SelfSavingWriter(GlobalWriter):
    """A global part whose owner writes its own shard files (the Ray buffer: each shard actor writes
    and hashes its files, rank 0 never gathers the buffer). ``owner.save_shards(dir)`` returns the
    marker entries; ``owner.verify_saved(dir, files)`` an error or None. A checkpoint of an earlier
    version with one ``<key>.pt`` is still read."""

    def __init__(self, part: Part, owner: Any):
        super().__init__(part)
        self.owner = owner

    def write(self, path: str, rank: int) -> dict[str, dict]:
        return self.owner.save_shards(path) if rank == 0 else {}

    def read(self, ck: StepCheckpoint, rank: int) -> Any | None:
        from ebmscale.buffer import shardfile

        files = shardfile.shard_entries(ck.files)
        if not files:
            return super().read(ck, rank)
        try:  # the shards read their own files; rank 0 has them checked here, in parallel
            error = self.owner.verify_saved(ck.path, files) if rank == 0 else None
        except shardfile.ShardFileError as exc:
            error = str(exc)
        if error:
            raise CheckpointError(error)
        return {"sharded": ck.path, "files": files}


class CheckpointManager:
    """Checkpoint I/O of one rank of a run (collective calls: every rank calls them together)."""

    def __init__(self, run_dir: str, rank: int, world: int, keep: int = 0,
                 sharded: tuple[Callable[[str], None], Callable[[str], None]] | None = None):
        """``sharded``: (write, load) of per-rank shards under ``deepspeed/`` (DeepSpeed ZeRO), which
        tie a checkpoint to its world size."""
        self.run_dir, self.rank, self.world, self.keep = run_dir, rank, world, keep
        self.sharded = sharded
        self.parts: dict[str, Part] = {}
        self.writers: dict[str, GlobalWriter] = {}
        self.saved_step: int | None = None  # step of the checkpoint last written or loaded

    def register(self, key: str, scope: str, save: Callable[[], Any], load: Callable[[Any], None] | None = None,
                 remap: Callable[[list[Any]], Any] | None = None,
                 writer: Callable[[Part], GlobalWriter] = GlobalWriter) -> None:
        if scope not in SCOPES or key in self.parts:
            raise ValueError(f"part '{key}': scope must be one of {SCOPES} and keys unique")
        self.parts[key] = Part(key, scope, save, load, remap)
        if scope == "global":
            self.writers[key] = writer(self.parts[key])

    def _states(self, scope: str) -> dict:
        return {k: p.save() for k, p in self.parts.items() if p.scope == scope}

    # ------------------------------------------------------------------ in memory
    def state_dict(self) -> dict:
        """This rank's complete state as one dict (global parts included, as their ``save``
        returns them on this rank), for an in-memory round trip."""
        return {k: p.save() for k, p in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        """Load every part found in ``state``, in registration order."""
        for key, part in self.parts.items():
            if part.load is not None and key in state:
                part.load(state[key])

    # ------------------------------------------------------------------ files
    def save(self, step: int) -> str:
        """Write checkpoint ``<run_dir>/checkpoints/step-<step>/`` and keep the newest ``keep``."""
        writers = list(self.writers.values())

        def write_more(path: str) -> dict[str, dict]:
            entries = {}
            for w in writers:
                entries.update(w.write(path, self.rank))
            if self.sharded is not None:
                self.sharded[0](os.path.join(path, DEEPSPEED_DIR))
            return entries

        path = save_checkpoint(self.run_dir, step, shared=self._states("shared") if self.rank == 0 else None,
                               rank_state=self._states("rank"), write_more=write_more, keep=self.keep)
        self.saved_step = step
        return path

    def read(self, ck: StepCheckpoint) -> dict:
        """Read and verify everything this rank loads from ``ck``, re-split to this world size when
        it differs. Raises CheckpointError naming a bad file, ConfigError for sharded states
        saved on another world size."""
        state = ck.read(SHARED_FILE)
        if ck.world == self.world:
            state.update(ck.read(rank_file(self.rank)))
        else:
            if self.sharded is not None:
                # Not a damaged checkpoint (no fallback to an older one): a setting to change.
                raise ConfigError(f"checkpoint '{ck.path}' holds DeepSpeed ZeRO shards of {ck.world} ranks; "
                                  f"resume it on {ck.world} ranks (DeepSpeed shards are tied to the world size)")
            old = [ck.read(rank_file(r)) for r in range(ck.world)]
            mine = dict(old[self.rank % ck.world])
            for key, part in self.parts.items():
                if part.scope == "rank" and part.remap is not None and key in mine:
                    try:
                        mine[key] = part.remap([o.get(key) for o in old])
                    except ValueError as exc:
                        raise CheckpointError(f"checkpoint '{ck.path}': cannot re-split '{key}' ({exc})") from None
            state.update(mine)
        if self.sharded is not None:
            ck.verify_tree(DEEPSPEED_DIR)
        for key, w in self.writers.items():
            found = w.read(ck, self.rank)
            if found is not None:
                state[key] = found
        return state

    def _apply(self, ck: StepCheckpoint, state: dict) -> None:
        self.load_state_dict(state)
        if self.sharded is not None:
            self.sharded[1](os.path.join(ck.path, DEEPSPEED_DIR))
        self.saved_step = ck.step
        if self.writers:
            dist.barrier()  # a global part is restored by its readers: nobody uses it before they have

    def load(self, path: str) -> None:
        """Restore checkpoint ``path`` (a step directory)."""
        ck = StepCheckpoint(path)
        self._apply(ck, self.read(ck))

    def load_latest(self, max_step: int | None = None) -> str | None:
        """Restore the newest complete checkpoint (at most ``max_step``) that every rank can read,
        falling back to older ones past a damaged one. None when there is none."""
        for path in complete_checkpoints(self.run_dir):
            try:
                ck = StepCheckpoint(path)
                if max_step is not None and ck.step > max_step:
                    continue
                loaded, error = self.read(ck), None
            except CheckpointError as exc:
                loaded, error = None, exc
            # All ranks must pick the same checkpoint: one rank's bad file rejects it for all.
            bad = torch.tensor([float(error is not None)])
            dist.all_reduce_max(bad)
            if bad.item():
                if error is not None:
                    print(f"ebmscale: warning: {error}; trying the previous checkpoint", file=sys.stderr, flush=True)
                continue
            self._apply(ck, loaded)
            return path
        return None
