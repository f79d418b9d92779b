"""What one shard of the global buffer does, and the registry beside the shards, without Ray:
:mod:`ebmscale.buffer.ray_host` hosts these classes in Ray actors (and adds the restart logic that
needs Ray). NumPy only, no torch: the actors import this module.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable

import numpy as np

from ebmscale.buffer import link, mailbox, shardfile
from ebmscale.buffer.replay import ReplayBuffer


def _locked(method: Callable) -> Callable:
    """Run a :class:`Shard` method under the shard's lock: draws over a direct link are served on
    the link's thread (ebmscale.buffer.link) while the host's thread serves the other calls."""
    @functools.wraps(method)
    def run(self: "Shard", *args, **kwargs):
        with self.__dict__.setdefault("_lock", threading.RLock()):  # setdefault: atomic in CPython
            return method(self, *args, **kwargs)
    return run


class Shard:
    """One shard: a :class:`ReplayBuffer` (``self.buf``, set by the host) served by its methods;
    draws take their seed from the caller, so the shard's own RNG is never used for them. The
    methods that touch the buffer hold the shard's lock (see :func:`_locked`)."""

    shard_id: int
    buf: ReplayBuffer
    _attached: mailbox.Attached | None = None  # the callers' mailboxes mapped here, on first use
    _served: link.Served | None = None  # direct links to callers on other nodes, on first use

    @_locked
    def sample(self, n: int, labels: np.ndarray | None, seed: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Encoded starts (the client decodes): fp16/uint8 storage halves/quarters the transfer."""
        q, idx, _, reinit, noise = self.buf.sample_encoded(n, labels=labels, rng=np.random.default_rng(seed))
        return q, idx, reinit, noise

    @_locked
    def write(self, idx: np.ndarray, q: np.ndarray, reinit: np.ndarray | None = None, steps: int = 0) -> None:
        self.buf.write(idx, q, reinit, steps)

    # A client on this shard's node passes chains through shared memory (ebmscale.buffer.mailbox):
    # only the slot indices travel through Ray.
    def _mailboxes(self) -> mailbox.Attached:
        if self._attached is None:
            self._attached = mailbox.Attached()
        return self._attached

    def probe(self, box: tuple[str, str, int]) -> bool:
        """Whether this shard can map the caller's mailbox ``box`` (it shares the host)."""
        return self._mailboxes().probe(box)

    @_locked
    def sample_into(self, n: int, labels: np.ndarray | None, seed: int, box: tuple[str, str, int]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`sample`, the float32 starts written into the caller's mailbox ``box``; returns
        (slot indices, reinit mask)."""
        m = n if labels is None else len(labels)
        out = self._mailboxes().view(box, m, self.buf.shape)
        return self.buf.sample_into(out, m, labels=labels, rng=np.random.default_rng(seed))

    @_locked
    def write_from(self, idx: np.ndarray, box: tuple[str, str, int], reinit: np.ndarray | None = None,
                   steps: int = 0) -> None:
        """:meth:`write` of the float32 chains in the caller's mailbox ``box`` (encoded here)."""
        self.buf.write(idx, self._mailboxes().view(box, len(idx), self.buf.shape), reinit, steps)

    # A client on another node gets and sends the chains (in the storage dtype) over a direct TCP
    # link (ebmscale.buffer.link): only the slot indices travel through Ray.
    def _links(self) -> link.Served:
        if self._served is None:
            self._served = link.Served(serve=self._serve_draw)
        return self._served

    def connect_link(self, address: tuple[str, int], secret: bytes, key: str) -> bool:
        """Open the link to client ``key`` listening at ``address`` (both prove they know
        ``secret``); False when it cannot."""
        return self._links().connect(address, secret, key)

    def _serve_draw(self, n: int, labels: np.ndarray | None, seed: int) -> list[np.ndarray]:
        """A draw requested over a link: the encoded starts, their noise, slots and reinit mask."""
        q, idx, reinit, noise = self.sample(n, labels, seed)
        return [q, noise, np.asarray(idx, dtype=np.int64), np.asarray(reinit, dtype=np.bool_)]

    def sample_link(self, n: int, labels: np.ndarray | None, seed: int, key: str, req: int) -> tuple:
        """:meth:`sample`, the encoded starts and noise sent to client ``key`` as message ``req``;
        returns (slot indices, reinit mask), or all of :meth:`sample` by value when there is no
        link (a restarted shard) or it failed."""
        q, idx, reinit, noise = self.sample(n, labels, seed)
        if self._links().send(key, req, [q, noise]):
            return idx, reinit
        return q, idx, reinit, noise

    def write_link(self, idx: np.ndarray, reinit: np.ndarray | None, steps: int, key: str, req: int) -> str | None:
        """:meth:`write` of the encoded chains client ``key`` sends as message ``req``; returns
        :data:`~ebmscale.buffer.link.RESEND` when they did not come (no link, or it failed)."""
        got = self._links().recv(key, req)
        if got is None or len(got) != 1 or got[0].shape != (len(idx), *self.buf.shape):
            self._links().drop(key)  # its draws waiting for this one fail, and are asked by value
            return link.RESEND
        self.write(idx, got[0], reinit, steps)
        self._links().landed(key, req)
        return None

    @_locked
    def health(self, subsample: int) -> dict:
        """This shard's health counts (a few numbers: the chains stay here)."""
        return self.buf.health(subsample)

    @_locked
    def peek(self, n: int, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
        return self.buf.peek(n, np.random.default_rng(seed), labels)

    @_locked
    def state_dict(self) -> dict:
        return self.buf.state_dict()

    @_locked
    def load_state_dict(self, state: dict) -> None:
        self.buf.load_state_dict(state)

    @_locked
    def save(self, step_path: str) -> dict:
        """Write this shard's files into the checkpoint (straight from here, in parallel with the
        other shards); returns their marker entries."""
        return shardfile.write_shard(step_path, self.shard_id, self.buf)

    def verify(self, step_path: str, entries: dict) -> str | None:
        """Check saved files against their marker entries; the first problem as one line, or None."""
        try:
            for name, entry in entries.items():
                shardfile.verify(step_path, name, entry)
        except shardfile.ShardFileError as exc:
            return str(exc)
        return None

    @_locked
    def load(self, step_path: str, parts: list, rng_from: int) -> str | None:
        """Replace this shard's chains with the saved slices ``parts`` (read here, memory-mapped)."""
        try:
            self.buf.load_state_dict(shardfile.load_state(step_path, parts, rng_from))
        except shardfile.ShardFileError as exc:
            return str(exc)
        return None


class Registry:
    """Counts shard restarts and knows where each shard's last checkpointed state is: its files
    (``{"files": (step_path, parts, rng_from)}``) or a state in Ray's object store (``{"ref":
    [ref]}``, kept while rank 0, its owner, lives); and, to re-create a shard whose node died,
    each shard's name, namespace, creation kwargs, node and generation."""

    def __init__(self):
        self.sources: list = []
        self.restarts = 0
        self.shards: list[dict] = []

    def configure(self, shards: list[dict]) -> None:
        """What re-creating a shard needs: its name, namespace, kwargs and node."""
        self.shards = [dict(s, generation=0) for s in shards]

    def least_loaded(self, alive: set[str]) -> str:
        """Of the live nodes ``alive``, the one holding the fewest shards (ties: the first by id)."""
        load = {node: sum(1 for t in self.shards if t["node"] == node) for node in alive}
        return min(sorted(alive), key=lambda nd: load[nd])

    def source(self, shard_id: int) -> dict | None:
        return self.sources[shard_id] if shard_id < len(self.sources) else None

    def set_sources(self, sources: list) -> None:
        self.sources = list(sources)  # refs nested in a list arrive unresolved: no copy of the data here

    def restarted(self, shard_id: int) -> tuple[dict | None, int]:
        self.restarts += 1
        return self.source(shard_id), self.restarts

    def count(self) -> int:
        return self.restarts
