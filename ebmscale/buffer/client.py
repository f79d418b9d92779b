"""The buffer interface the trainer talks to, and its in-process host.

Two hosts behind one interface (``build_buffer`` picks by ``buffer.backend``):

* :class:`LocalBuffer` -- one :class:`ReplayBuffer` per rank, in this process (the behaviour of the
  anchor codebases, bitwise exact across ranks and resumes);
* ``ebmscale.buffer.ray_host.RayBuffer`` -- one global buffer sharded across Ray actors that every
  rank draws from and writes back to.

The interface (what the trainer uses):

``draw(n, labels, rng) -> (x, handle)``
    ``n`` chain starts (float32 NumPy), class-conditional when ``labels`` is given. All randomness
    comes from ``rng`` (derived by the caller from (seed, rank, step)), so draws are reproducible.
``write_back(handle, x)``
    Store the evolved chains in the slots ``handle`` names (fire-and-forget on Ray).
``prefetch(n, rng)``
    Start the unlabelled draw the next ``draw(n, None, rng)`` with an equal ``rng`` will ask for.
``counters() -> dict``
    Per-step event counts for the metrics, summed over ranks (e.g. ``buffer_restarts``).
``health() -> dict | None``
    The :mod:`ebmscale.buffer.health` counts of the chains this rank reports (its own buffer; the
    whole global buffer on rank 0, gathered from the shards without moving chains; None elsewhere).
``flush()`` / ``close(clean)``
    Wait for writes in flight / release the host.
``state_dict()`` / ``load_state_dict(state)`` and ``is_global``
    A global buffer's state is the same for every rank: rank 0 alone saves and loads it.

No torch here (the module is imported inside Ray actors too); the trainer converts tensors.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ebmscale.buffer import health
from ebmscale.buffer.replay import ReplayBuffer, decode, encode
from ebmscale.utils import even_share

if TYPE_CHECKING:
    from ebmscale.buffer.ray_host import RayBuffer


class LocalBuffer:
    """This rank's own :class:`ReplayBuffer`, used directly (no prefetch: a draw is a slice)."""

    is_global = False

    def __init__(self, buffer: ReplayBuffer, chain_steps: int = 0):
        self.buffer = buffer
        self.chain_steps = int(chain_steps)  # sampler steps between a draw and its write-back (chain age)

    def __getattr__(self, name: str) -> Any:
        # Reads of the ReplayBuffer's own attributes (data, labels, capacity...) pass through.
        if name == "buffer":
            raise AttributeError(name)
        return getattr(self.buffer, name)

    def draw(self, n: int, labels: np.ndarray | None, rng: np.random.Generator
             ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """``n`` chain starts; the handle for :meth:`write_back` is (slot indices, reinit mask)."""
        x, idx, _, reinit = self.buffer.sample(n, labels=labels, rng=rng)
        return x, (idx, reinit)

    def write_back(self, handle: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> None:
        idx, reinit = handle
        self.buffer.write(idx, x, reinit, self.chain_steps)

    def health(self, subsample: int = health.DIVERSITY_SUBSAMPLE) -> dict:
        """This rank's buffer's health counts (see :mod:`ebmscale.buffer.health`)."""
        return self.buffer.health(subsample)

    def peek(self, n: int, rng: np.random.Generator, labels: np.ndarray | None = None) -> np.ndarray:
        """``n`` stored chains (one per label of ``labels`` when given), read-only (see
        :meth:`ReplayBuffer.peek`)."""
        return self.buffer.peek(n, rng, labels)

    def prefetch(self, n: int, rng: np.random.Generator, labels: np.ndarray | None = None) -> None:
        """Nothing to overlap: an in-process draw costs a memory copy."""

    def counters(self) -> dict[str, float]:
        return {}

    def flush(self) -> None:
        pass

    def close(self, clean: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """This rank's state; a global buffer's state (``{'shards': [...]}``) is pooled and dealt
        into this buffer's capacity, so a run can switch backends on resume."""
        state = as_numpy(state)
        if "shards" in state:
            b = self.buffer
            state = resplit_states(_shard_list(state), [b.capacity], b.num_classes)[0]
        self.buffer.load_state_dict(state)


def _shard_list(state: dict) -> list[dict]:
    shards = state.get("shards")
    if not shards:
        raise ValueError("this replay-buffer state holds no shards (a global buffer is saved by rank 0 only)")
    return list(shards)


def as_numpy(obj: Any) -> Any:
    """Tensors -> NumPy arrays, recursively (checkpoints store arrays as tensors). Duck-typed so
    this module needs no torch."""
    if isinstance(obj, dict):
        return {k: as_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_numpy(v) for v in obj)
    if not isinstance(obj, np.ndarray) and hasattr(obj, "detach") and hasattr(obj, "numpy"):
        return obj.detach().cpu().numpy()
    return obj


def split_capacity(total: int, parts: int) -> list[int]:
    """``total`` slots in ``parts`` near-equal shards (the first ones take the remainder)."""
    return [even_share(total, parts, k)[1] for k in range(parts)]


def resplit_states(states: list[dict], capacities: list[int], num_classes: int) -> list[dict]:
    """Pool the chains of several :meth:`ReplayBuffer.state_dict` states and deal them, in order
    and cyclically where there are fewer chains than slots, into states of ``capacities``
    (e.g. a checkpoint of 4 shards resumed with 8). Class-conditional chains go to slots of their
    own class (each new shard is partitioned as a fresh buffer of its capacity would be). The
    storage of the first state is kept; RNG states are reused in turn."""
    first = states[0]
    storage, bounds = first["storage"], tuple(first["bounds"])
    data = np.concatenate([s["data"] if s["storage"] == storage
                           else encode(decode(np.asarray(s["data"]), s["storage"], tuple(s["bounds"])), storage, bounds)
                           for s in states])
    # Chain ages travel with their chains (states from before ages were kept count as fresh).
    ages = np.concatenate([np.asarray(s["age"]) if s.get("age") is not None else np.zeros(len(s["data"]), np.int64)
                           for s in states])
    labels = None
    if num_classes:
        if any(s.get("labels") is None for s in states):
            raise ValueError("cannot load unlabelled buffer chains into a class-conditional buffer")
        labels = np.concatenate([s["labels"] for s in states])
    pools = ([np.flatnonzero(labels == c) for c in range(num_classes)] if num_classes
             else [np.arange(len(data))])
    if any(len(p) == 0 for p in pools):
        raise ValueError("the buffer state holds no chain of some class")
    cursor = [0] * len(pools)
    out = []
    for k, cap in enumerate(capacities):
        slot_labels = (np.arange(cap) % num_classes).astype(np.int64) if num_classes else np.zeros(cap, np.int64)
        take = np.empty(cap, dtype=np.int64)
        for c, pool in enumerate(pools):
            where = np.flatnonzero(slot_labels == c)
            take[where] = pool[(cursor[c] + np.arange(len(where))) % len(pool)]
            cursor[c] += len(where)
        state = dict(first, data=data[take], labels=slot_labels if num_classes else None, age=ages[take],
                     rng=states[k % len(states)]["rng"])
        out.append(state)
    return out


def build_buffer(cfg: Any, shape: tuple[int, ...], bounds: tuple[float, float], num_classes: int, rank: int,
                 world: int, seed: int, keeps_chains: bool = True) -> Union[LocalBuffer, "RayBuffer"]:
    """The replay buffer client for this rank (``cfg`` is the whole :class:`ebmscale.config.Config`).
    Short-run chains (``sampler.init=noise``) never draw, so they get the in-process buffer
    whatever the backend and start no Ray. An objective without persistent chains
    (``keeps_chains=False``) gets a one-slot in-process buffer: the state layout stays, no Ray."""
    from ebmscale import dist  # the driver's helpers (torch); actors never call this function

    b = cfg.buffer
    if b.backend == "local" or cfg.sampler.init != "buffer" or not keeps_chains:
        return LocalBuffer(ReplayBuffer(b.capacity if keeps_chains else 1, shape, bounds, b.reinit_prob, b.storage, num_classes,
                                        seed=dist.derive_seed(seed, rank, 0, "buffer")), cfg.sampler.steps)
    from ebmscale.buffer.ray_host import RayBuffer

    shard_seeds = lambda k: dist.derive_seed(seed, k, 0, "buffer")  # noqa: E731 - shard k seeds like rank k
    return RayBuffer(b, shape, bounds, num_classes, rank, world, shard_seeds,
                     share=dist.broadcast_object, barrier=dist.barrier, chain_steps=cfg.sampler.steps)
