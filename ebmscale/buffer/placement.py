"""The arithmetic of the Ray-hosted global buffer, without Ray: how ``capacity x ranks`` chains are
split into shards, which shard serves each start of a draw, and the checks of a layout.

:class:`ShardLayout` holds the shards' capacities and, for this rank, the two distributions a
start's shard is drawn from: ``p_all`` (in proportion to size: uniform over every slot of the
global buffer) and ``p_own`` (this rank's own shards only, for ``buffer.mixing=affine``). Every
random choice of a plan comes from the caller's ``rng`` in a fixed order, so that one process with
a fixed seed repeats a run exactly, prefetched or not (see :mod:`ebmscale.buffer.ray_host`).
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from ebmscale.buffer.client import resplit_states, split_capacity
from ebmscale.config import ConfigError


def check_layout(b, world: int, num_classes: int) -> list[int]:
    """The shards' capacities for config section ``b`` (``buffer.*``) over ``world`` ranks; a
    ConfigError naming the key when a shard would hold fewer chains than classes, or when the
    embedded Ray (one node) is asked to serve ranks on several nodes."""
    n_shards = b.shards or world
    capacities = split_capacity(b.capacity * world, n_shards)
    if min(capacities) < max(num_classes, 1):
        raise ConfigError(f"buffer.shards={n_shards} leaves {min(capacities)} chains per shard, fewer than "
                          f"the {num_classes} classes; use fewer shards or a larger buffer.capacity")
    if not b.ray_address and world > int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        raise ConfigError("buffer.ray_address='' (embedded Ray) runs on one node; on several nodes start a "
                          "cluster with launch/ray/ and set buffer.ray_address=auto")
    return capacities


class ShardLayout:
    """Shard sizes and the draw distributions of rank ``rank`` of ``world``. A rank's own shards:
    those on its node (``shard_nodes[k] == node``) when the shards span several nodes, so that
    draws stay node-local; else shard k belongs to rank k mod world (with fewer shards than ranks,
    rank r uses shard r mod shards)."""

    def __init__(self, capacities: list[int], rank: int, world: int, shard_nodes: list[str] | None = None,
                 node: str | None = None):
        self.capacities = list(capacities)
        n_shards = len(capacities)
        caps = np.asarray(capacities, dtype=np.float64)
        self.p_all = caps / caps.sum()
        local = np.array([nd == node for nd in (shard_nodes or [None] * n_shards)])
        if node is not None and 0 < local.sum() < n_shards:
            own = local
        else:
            own = np.array([k % world == rank for k in range(n_shards)]) if n_shards >= world else \
                (np.arange(n_shards) == rank % n_shards)
        self.p_own = np.where(own, caps, 0.0) / caps[own].sum()

    def __len__(self) -> int:
        return len(self.capacities)

    def plan(self, m: int, rng: np.random.Generator, mixing: str = "random",
             mix_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Which shard serves each of ``m`` starts, and one draw seed per shard: all from ``rng``.
        ``mixing=affine``: a start comes from this rank's own shards with probability
        ``1 - mix_fraction``, else from any shard."""
        n_shards = len(self)
        if mixing == "affine":
            own = rng.random(m) >= mix_fraction
            shard = np.where(own, rng.choice(n_shards, size=m, p=self.p_own), rng.choice(n_shards, size=m, p=self.p_all))
        else:
            shard = rng.choice(n_shards, size=m, p=self.p_all)
        seeds = rng.integers(0, 2 ** 63 - 1, size=n_shards)
        return shard, seeds

    def file_sources(self, step_path: str) -> list[dict]:
        """What each shard restarts from after a save of its files into ``step_path``."""
        return [{"files": (step_path, [(k, 0, cap)], k)} for k, cap in enumerate(self.capacities)]


def by_shard(shard: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(shard, positions of the starts it serves) for every shard that serves any, in shard order."""
    for k in np.unique(shard):
        yield int(k), np.flatnonzero(shard == k)


def same_labels(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two label arrays (or two None) ask for the same draw."""
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def gather(m: int, shape: tuple[int, ...], positions: list[np.ndarray], values: list[np.ndarray]) -> np.ndarray:
    """The ``m`` chains of a draw or peek in the caller's order: ``values[i]`` goes to ``positions[i]``.
    One part holding them all in order, in an array of its own (from a link or by value: not a
    shared-memory view, which the next draw overwrites), is returned as it is: no 6 MB copy for an
    ImageNet-128 draw from one shard."""
    if len(values) == 1 and values[0].dtype == np.float32 and values[0].shape == (m, *shape):
        v = values[0]
        own = v.flags.owndata and v.flags.writeable and v.flags.c_contiguous
        if own and np.array_equal(positions[0], np.arange(m)):
            return v
    x = np.empty((m, *shape), dtype=np.float32)
    for pos, v in zip(positions, values):
        x[pos] = v
    return x


def shard_states(state: dict, capacities: list[int], num_classes: int) -> list[dict]:
    """The per-shard states of a buffer state (a global buffer's, or a local buffer's single one),
    re-split when their number or sizes differ from ``capacities``."""
    shards = state.get("shards") if "shards" in state else [state]
    if not shards:
        raise ValueError("this replay-buffer state holds no shards (a global buffer is saved by rank 0 only)")
    if len(shards) != len(capacities) or [len(s["data"]) for s in shards] != list(capacities):
        shards = resplit_states(list(shards), list(capacities), num_classes)
    return list(shards)
