"""A global replay buffer's shards as checkpoint files, written and read by the shards themselves.

Each shard of a Ray-hosted buffer writes its own files into the step directory (no torch, no
pickle, nothing through rank 0)::

    buffer/shard-00003.npy         the chains, in the storage dtype (NumPy .npy)
    buffer/shard-00003.labels.npy  their class labels (class-partitioned buffers only)
    buffer/shard-00003.age.npy     each chain's age (sampler steps since it last started from noise)
    buffer/shard-00003.json        capacity, storage, bounds, reinit_prob, num_classes, RNG state

hashing the bytes as they go out (:func:`write_shard` returns the entries -- size and SHA-256 --
that the checkpoint's completion marker lists). Loading (:func:`load_state`) reads slices through
a memory map, so a shard of the resumed run reads only its own chains.

Re-split (:func:`plan_load`): the saved chains, taken in shard order, are dealt into contiguous
runs of near-equal size, one per new shard. The number of chains is the checkpoint's, whatever the
new shard count or world size: every chain is kept once, none is duplicated or dropped. So when a
run resumes on more ranks, its global buffer keeps the saved total (fewer chains per rank than
``buffer.capacity`` asks); a fresh run on the new world size starts at ``capacity x ranks``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Callable

import numpy as np

from ebmscale.buffer.client import split_capacity

SHARD_DIR = "buffer"
_META_RE = re.compile(r"^buffer/shard-(\d+)\.json$")
_BLOCK = 1 << 20


class ShardFileError(ValueError):
    """A shard file that is missing, damaged or does not fit; the message names it."""


def names(k: int) -> dict[str, str]:
    """Marker names (relative to the step directory) of shard ``k``'s files."""
    stem = f"{SHARD_DIR}/shard-{k:05d}"
    return {"data": f"{stem}.npy", "labels": f"{stem}.labels.npy", "age": f"{stem}.age.npy", "meta": f"{stem}.json"}


def shard_entries(files: dict[str, dict]) -> dict[str, dict]:
    """The buffer shard files among a marker's ``files``."""
    return {n: e for n, e in files.items() if n.startswith(SHARD_DIR + "/")}


def saved_shards(files: dict[str, dict]) -> list[int]:
    """Shard numbers of a checkpoint's buffer files (0..n-1), from its marker entries."""
    ids = sorted(int(m.group(1)) for m in map(_META_RE.match, files) if m)
    if ids != list(range(len(ids))):
        raise ShardFileError(f"the buffer shard files listed are not shards 0..{len(ids) - 1}: {ids}")
    return ids


class _HashingWriter:
    """A write-only file that hashes and counts what goes through (NumPy writes to it in chunks)."""

    def __init__(self, fh: Any):
        self.fh, self.sha, self.bytes = fh, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.fh.write(b)


def _write(path: str, fill: Callable[[_HashingWriter], None]) -> dict:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        w = _HashingWriter(fh)
        fill(w)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {"bytes": w.bytes, "sha256": w.sha.hexdigest()}


def write_shard(step_path: str, k: int, buf: Any) -> dict[str, dict]:
    """Write shard ``k`` (a :class:`~ebmscale.buffer.replay.ReplayBuffer`) into ``step_path``,
    streaming its arrays (no copy of the chains); returns the marker entries of its files."""
    os.makedirs(os.path.join(step_path, SHARD_DIR), exist_ok=True)
    n = names(k)

    def array(a: np.ndarray) -> Callable[[_HashingWriter], None]:
        return lambda w: np.lib.format.write_array(w, np.ascontiguousarray(a), allow_pickle=False)

    entries = {n["data"]: _write(os.path.join(step_path, n["data"]), array(buf.data))}
    if buf.labels is not None:
        entries[n["labels"]] = _write(os.path.join(step_path, n["labels"]), array(buf.labels))
    # Ages make a resumed run's buffer health (buffer_age_mean/max) continue instead of restarting at 0.
    entries[n["age"]] = _write(os.path.join(step_path, n["age"]), array(buf.age))
    meta = {"shard": k, "capacity": int(buf.capacity), "shape": list(buf.shape), "storage": buf.storage,
            "bounds": list(buf.bounds), "reinit_prob": buf.reinit_prob, "num_classes": buf.num_classes,
            "labels": buf.labels is not None, "age": True, "rng": buf.rng.bit_generator.state}
    entries[n["meta"]] = _write(os.path.join(step_path, n["meta"]), lambda w: w.write(json.dumps(meta).encode()))
    return entries


def verify(step_path: str, name: str, entry: dict) -> None:
    """Check file ``name`` against its marker entry (size, then SHA-256 read in 1 MiB blocks)."""
    path = os.path.join(step_path, name)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ShardFileError(f"checkpoint file '{path}' is missing") from None
    if size != entry["bytes"]:
        raise ShardFileError(f"checkpoint file '{path}' is truncated or damaged ({size} bytes, "
                             f"{entry['bytes']} recorded)")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    if h.hexdigest() != entry["sha256"]:
        raise ShardFileError(f"checkpoint file '{path}' does not match its recorded SHA-256 (tampered or damaged)")


def read_meta(step_path: str, k: int) -> dict:
    path = os.path.join(step_path, names(k)["meta"])
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ShardFileError(f"checkpoint file '{path}' cannot be read ({exc})") from None


def plan_load(saved_capacities: list[int], n_shards: int) -> tuple[list[int], list[list[tuple[int, int, int]]]]:
    """New capacities and, per new shard, the ``(saved shard, start, stop)`` slices it reads: the
    saved chains in shard order, dealt into ``n_shards`` contiguous near-equal runs (identity when
    the shard count is unchanged)."""
    total = sum(saved_capacities)
    if total < n_shards:
        raise ShardFileError(f"{total} saved buffer chains cannot fill {n_shards} shards")
    caps = split_capacity(total, n_shards)
    starts = np.cumsum([0, *saved_capacities])
    plans, pos = [], 0
    for cap in caps:
        parts, lo, hi = [], pos, pos + cap
        for j, cap_j in enumerate(saved_capacities):
            a, b = max(lo, int(starts[j])), min(hi, int(starts[j + 1]))
            if a < b:
                parts.append((j, a - int(starts[j]), b - int(starts[j])))
        plans.append(parts)
        pos = hi
    return caps, plans


def load_sources(step_path: str, files: dict[str, dict], n_shards: int) -> tuple[list[int], list[tuple]]:
    """New capacities and, per new shard, what it loads (``(step_path, parts, rng_from)``, the
    arguments of :func:`load_state`) from checkpoint ``step_path``'s shard files ``files``."""
    saved = [int(read_meta(step_path, k)["capacity"]) for k in saved_shards(files)]
    caps, plans = plan_load(saved, n_shards)
    return caps, [(step_path, parts, k % len(saved)) for k, parts in enumerate(plans)]


def files_of(files: dict[str, dict], k: int) -> dict[str, dict]:
    """Shard ``k``'s entries among a marker's ``files``."""
    return {n: files[n] for n in names(k).values() if n in files}


def load_state(step_path: str, parts: list[tuple[int, int, int]], rng_from: int) -> dict:
    """A :meth:`~ebmscale.buffer.replay.ReplayBuffer.state_dict` made of the saved slices
    ``parts`` (see :func:`plan_load`), with the RNG state of saved shard ``rng_from``. Only the
    slices are read (memory-mapped)."""
    metas = {j: read_meta(step_path, j) for j in {j for j, _, _ in parts} | {rng_from}}
    first = metas[parts[0][0]]
    # Shards written before ages were kept have none: their chains count as fresh (age 0).
    keys = ["data", *(["labels"] if first["labels"] else []),
            *(["age"] if all(metas[j].get("age", False) for j, _, _ in parts) else [])]
    cols: dict[str, list[np.ndarray]] = {key: [] for key in ("data", "labels", "age")}
    for j, a, b in parts:
        n = names(j)
        try:
            for key in keys:
                cols[key].append(np.array(np.load(os.path.join(step_path, n[key]), mmap_mode="r")[a:b]))
        except (OSError, ValueError) as exc:
            raise ShardFileError(f"buffer shard file of shard {j} under '{step_path}' cannot be read ({exc})") from None

    def joined(key: str) -> np.ndarray | None:
        arrays = cols[key]
        return (np.concatenate(arrays) if len(arrays) > 1 else arrays[0]) if arrays else None

    state = {"data": joined("data"), "labels": joined("labels"), "age": joined("age"),
             "rng": metas[rng_from]["rng"], "storage": first["storage"], "bounds": first["bounds"],
             "reinit_prob": first["reinit_prob"], "num_classes": first["num_classes"]}
    if state["num_classes"]:
        missing = sorted(set(range(state["num_classes"])) - set(np.unique(state["labels"]).tolist()))
        if missing:
            raise ShardFileError(f"re-split of the buffer under '{step_path}' leaves a shard with no chain of "
                                 f"class {missing[0]}: resume with fewer buffer.shards")
    return state


def load_all(step_path: str, files: dict[str, dict]) -> list[dict]:
    """Every saved shard's state, verified (evaluation reads a whole buffer in one process)."""
    out = []
    for k in saved_shards(files):
        for name in names(k).values():
            if name in files:
                verify(step_path, name, files[name])
        cap = int(read_meta(step_path, k)["capacity"])
        out.append(load_state(step_path, [(k, 0, cap)], k))
    return out
