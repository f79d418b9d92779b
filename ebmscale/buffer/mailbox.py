"""Shared-memory mailboxes between a Ray buffer client and the shards on its own node.

Ray hands large NumPy arrays between processes through its object store, but every such transfer
costs an object creation, a seal and a lookup on top of the copy: measured on a loaded 2-core AMD
EPYC (Zen 4), an actor returning a 6.3 MB array took 9-13 ms, the same bytes through a file in
``/dev/shm`` 5-6 ms, call included. So where a client and a shard share a node, the chains skip
the object store: the client owns one mailbox per shard and direction (a float32 array in a
``/dev/shm`` file, grown as needed), the shard maps it once and writes a draw's starts into it or
reads a write-back's chains from it, and only slot indices travel through Ray. A shard on another
node gets the chains by value, as before.

:class:`ClientBoxes` is the client's bookkeeping: which mailbox goes to which shard and which
write-back is using it (the Ray calls stay in :mod:`ebmscale.buffer.ray_host`).

NumPy and the standard library only (no Ray, no torch): the shard actors import this module.
"""
from __future__ import annotations

import mmap
import os
import socket
import uuid
from typing import Any, Callable

import numpy as np

SHM_DIR = "/dev/shm"
_PREFIX = "ebmscale-box-"
# Below this many bytes (in the storage dtype) a batch goes by value even on the shard's node: Ray
# inlines such arguments and results into the call itself (its max_direct_call_object_size,
# 100 KiB), which costs no more than a mailbox and keeps write-backs fire-and-forget.
MIN_BYTES = 100 * 1024
WRITE_KINDS = ("write", "write.1")  # two write mailboxes per shard: one is copied while the other lands


def _map(path: str, nbytes: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            # Reserve the pages now: a full /dev/shm (Docker's default is 64 MB) fails here with
            # an OSError the client falls back on, not later with a SIGBUS on first write.
            os.ftruncate(fd, nbytes)
            os.posix_fallocate(fd, 0, nbytes)
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace("/", "_") or "host"


def sweep_stale(shm_dir: str = SHM_DIR) -> None:
    """Remove mailboxes of processes of this host that no longer run (a client killed before its
    close); the host name in the file name keeps containers that share /dev/shm apart."""
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return
    for name in names:
        if not name.startswith(_PREFIX) or f"-{_host()}-" not in name:
            continue
        try:
            pid = int(name[len(_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(shm_dir, name))
            except OSError:
                pass
        except (ValueError, PermissionError):
            pass


class Mailbox:
    """One client-owned mailbox: ``view(n, shape)`` is a float32 array of ``n`` chains in shared
    memory (the file is replaced by a larger one when ``n`` chains do not fit); ``address`` names
    it for the shard (:class:`Attached`). ``close()`` removes the file."""

    def __init__(self, shm_dir: str = SHM_DIR):
        self.shm_dir, self.path, self.nbytes = shm_dir, "", 0
        self._key = f"{_PREFIX}{os.getpid()}-{_host()}-{uuid.uuid4().hex[:12]}"
        self._mem: mmap.mmap | None = None
        self._grown = 0

    def view(self, n: int, shape: tuple[int, ...]) -> np.ndarray:
        need = int(n) * int(np.prod(shape)) * 4
        if need > self.nbytes:
            self.close()
            self._grown += 1
            self.path, self.nbytes = os.path.join(self.shm_dir, f"{self._key}-{self._grown}"), max(need, 4096)
            try:
                self._mem = _map(self.path, self.nbytes, create=True)
            except OSError:
                self.close()
                raise
        return np.frombuffer(self._mem, dtype=np.float32, count=need // 4).reshape(int(n), *shape)

    @property
    def address(self) -> tuple[str, str, int]:
        """(key, path, bytes): what a shard needs to map the current file (key: same mailbox)."""
        return self._key, self.path, self.nbytes

    def close(self) -> None:
        if self._mem is not None:
            try:
                self._mem.close()
            except BufferError:  # a view of it is still referenced: the mapping goes with it
                pass
            self._mem = None
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.path, self.nbytes = "", 0


class Attached:
    """The shard's side: the mailboxes it has mapped, by key (a grown mailbox replaces its
    mapping; a shard holds a handful, one per client and direction)."""

    def __init__(self):
        self._maps: dict[str, tuple[str, mmap.mmap]] = {}

    def view(self, address: tuple[str, str, int], n: int, shape: tuple[int, ...]) -> np.ndarray:
        key, path, nbytes = address
        held = self._maps.get(key)
        if held is None or held[0] != path:
            self._maps[key] = (path, _map(path, nbytes, create=False))
        count = int(n) * int(np.prod(shape))
        return np.frombuffer(self._maps[key][1], dtype=np.float32, count=count).reshape(int(n), *shape)

    def probe(self, address: tuple[str, str, int]) -> bool:
        """Whether this process can map the mailbox (same host, same /dev/shm)."""
        try:
            self.view(address, 0, (1,))
        except OSError:
            return False
        return True


class ClientBoxes:
    """A buffer client's mailboxes to the shards on its own node, by ``(shard, kind)`` with kind
    ``"draw"``, ``"write"`` or ``"write.1"``: a :class:`Mailbox`, or False where that shard cannot
    map one or /dev/shm had no room (no more mailboxes to it then). A write mailbox carries one
    write-back at a time: ``writes[(k, kind)]`` is the job using it.

    The client supplies what needs Ray: ``local(k)`` (shard ``k`` runs on this node) and
    ``probe(k, address)`` (shard ``k`` can map the mailbox at ``address``)."""

    def __init__(self, shape: tuple[int, ...], chain_bytes: int, local: Callable[[int], bool],
                 probe: Callable[[int, tuple], bool]):
        self.shape, self.chain_bytes = tuple(shape), int(chain_bytes)
        self._local, self._probe = local, probe
        self.boxes: dict[tuple[int, str], Mailbox | bool] = {}
        self.writes: dict[tuple[int, str], Any] = {}

    def get(self, k: int, kind: str, n: int) -> Mailbox | None:
        """The ``kind`` mailbox to shard ``k``, large enough for ``n`` chains; None when the shard
        runs on another node, cannot map it (checked once per shard and kind), the batch is small
        (under :data:`MIN_BYTES`) or /dev/shm has no room."""
        if not self._local(k) or self.boxes.get((k, kind)) is False or n * self.chain_bytes < MIN_BYTES:
            return None
        box = self.boxes.get((k, kind))
        new = box is None
        try:
            if new:
                box = self.boxes[(k, kind)] = Mailbox()
            box.view(n, self.shape)  # sized before the shard's first look at it
            if new and not self._probe(k, box.address):
                raise OSError("the shard cannot map the mailbox")
        except OSError:
            box.close()
            self.boxes[(k, kind)] = False
            return None
        return box

    def free_write(self, k: int, n: int, inflight: Callable[[], list], done: Callable[[Any], bool],
                   land: Callable[[Any], None]) -> tuple[str, Mailbox] | None:
        """A free write mailbox to shard ``k`` (its last write-back has landed) and its kind; None
        where there is none. ``inflight()``: the client's unfinished jobs, oldest first; ``done(job)``
        whether one has finished; ``land(job)`` waits for it and takes it out of the jobs. In
        training the first mailbox is always free (the next step's draw came after its
        write-back); back-to-back write-backs alternate with the second, so that one is copied
        while the other lands, and wait for the older only when both are busy (which costs less
        than sending the chains by value)."""
        busy = []
        for kind in WRITE_KINDS:
            last = self.writes.get((k, kind))
            if last is not None and any(job is last for job in inflight()):
                if not done(last):
                    busy.append(last)
                    continue
                land(last)
            box = self.get(k, kind, n)
            if box is not None:
                return kind, box
            if kind == WRITE_KINDS[0]:  # no mailbox to this shard
                return None
        oldest = next(job for job in inflight() if any(job is b for b in busy))
        land(oldest)
        kind = next(kd for kd in WRITE_KINDS if self.writes.get((k, kd)) is oldest)
        box = self.get(k, kind, n)
        return None if box is None else (kind, box)

    def by_key(self, key: str) -> Mailbox:
        """The open mailbox whose address has ``key`` (a call to re-send by value)."""
        return next(b for b in self.boxes.values() if b and b.address[0] == key)

    def close(self) -> None:
        for box in self.boxes.values():
            if box:
                box.close()
