"""Direct TCP links between a Ray buffer client and the shards on other nodes.

Chains to and from a shard on the client's own node pass through shared memory
(:mod:`ebmscale.buffer.mailbox`). To a shard on another node they went by value through Ray's
object manager, which moved 6.3 MB between two object stores at only 210-470 MB/s here (a
loaded 2-core AMD EPYC, Zen 4). So the bulk bytes take a plain socket instead: the control
(which shard, how many, labels, the RNG seed, slot indices) still goes through the Ray actor call,
and only the arrays, in the storage dtype (the same encoding as by value: the client decodes a
draw, encodes a write-back), travel raw on a TCP connection the shard opens to the client.

* Setting up: the client listens on its node's address (the one Ray knows it by, never 0.0.0.0,
  port 0) just for the set-up, hands the shard the address and a random per-link secret in the
  (authenticated) Ray call, and the shard connects. Both prove they know the secret (HMAC-SHA256
  of the other's nonce) before anything else passes: a peer that cannot is dropped and the
  client keeps waiting for the right one.
* A draw goes over the link alone, without a Ray call (whose round trip was 1.5 to 3 ms of a
  32-chain ImageNet-128 draw's 7 to 9 ms): the client's request (n, seed, labels) is a message;
  the shard's reader thread answers it with the stored chains, the noise of re-initialised
  starts, the slot indices and the reinit mask, under the shard's lock (its Ray thread serves the
  other calls). A reader thread on the client takes every message off the socket as it comes (so
  a shard never waits on a client busy elsewhere, e.g. with a prefetched draw it has not asked
  for yet) and the draw picks its answer by request id. The request names the client's last
  write-back to that shard (``after``), and the shard answers only once that one has landed: a
  client's draws see its earlier write-backs, as calls through Ray do. (After a write-back by
  value the next draw goes through Ray as well, whose calls keep their order.)
* A write-back: a writer thread on the client sends the chains (fire-and-forget, as by value)
  and the shard's Ray call (slot indices, reinit mask) takes them from the shard's reader; calls
  from one client to one shard run in order, and so do the messages on the link (each carries
  the id the call expects).
* Failure: a shard that cannot send or read a message drops the link and answers by value (a
  draw) or with :data:`RESEND` (a write-back, which the client then sends by value); a restarted
  shard has no link and does the same; the client re-opens a broken link on its next use, at
  most :data:`MAX_OPENS` times per shard, and otherwise (or when the first set-up fails) goes by
  value with one log line.

The handshake and the framing of a message: :mod:`ebmscale.buffer.wire`. NumPy and the standard
library only (no Ray, no torch): the shard actors import this module.
"""
from __future__ import annotations

import logging
import queue
import secrets
import socket
import threading
import time
import uuid
from typing import Callable

import numpy as np

from ebmscale.buffer.wire import LinkError, accept_peer, connect_peer, recv_arrays, send_arrays

__all__ = ["RESEND", "MAX_OPENS", "LinkError", "Link", "ClientLinks", "Served", "accept_peer", "connect_peer"]

log = logging.getLogger(__name__)

RESEND = "resend"  # a shard's answer to a write-back whose chains did not come over the link
MAX_OPENS = 3  # link set-ups per shard before the client sends by value for good
SETUP_TIMEOUT_S = 30.0  # a whole set-up: the shard's call queued behind others, connect, handshake
IO_TIMEOUT_S = 60.0  # a shard waiting for a write-back's message, or on a client that stopped reading


def _wait(cond: threading.Condition, done: Callable[[], bool], live: Callable[[], bool], timeout: float) -> bool:
    """Wait on ``cond`` (held by the caller) until ``done()``, the link dies (``live()`` False) or
    ``timeout`` seconds pass; returns ``done()``."""
    deadline = time.monotonic() + timeout
    while not done() and live() and (left := deadline - time.monotonic()) > 0:
        cond.wait(left)
    return done()


class Link:
    """The client's end of one link to a shard: a reader thread that keeps every message it
    receives until :meth:`take` asks for it, and a writer thread that sends queued messages in
    order. Once either fails the link is dead (``alive`` False) and the socket shut down, so the
    shard sees it too."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._cond = threading.Condition()
        self._got: dict[int, list[np.ndarray]] = {}
        self.error: str | None = None
        self.sent = self.received = 0  # messages
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._read, daemon=True, name="ebmscale-link-read"),
                         threading.Thread(target=self._write, daemon=True, name="ebmscale-link-write")]
        for t in self._threads:
            t.start()

    @property
    def alive(self) -> bool:
        return self.error is None

    def _fail(self, why: str) -> None:
        with self._cond:
            if self.error is None:
                self.error = why
            self._cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read(self) -> None:
        try:
            while True:
                req, arrays, _ = recv_arrays(self.sock)
                with self._cond:
                    self._got[req] = arrays
                    self.received += 1
                    self._cond.notify_all()
        except OSError as exc:
            self._fail(str(exc) or type(exc).__name__)

    def _write(self) -> None:
        while (item := self._out.get()) is not None:
            if self.error is not None:
                continue  # the shard answers RESEND for these
            try:
                send_arrays(self.sock, *item)
                self.sent += 1
            except OSError as exc:
                self._fail(str(exc) or type(exc).__name__)

    def send(self, req: int, arrays: list[np.ndarray], meta: dict | None = None) -> None:
        """Queue message ``req`` for the shard (the arrays must not change until it is sent)."""
        self._out.put((req, arrays, meta))

    def take(self, req: int, timeout: float = IO_TIMEOUT_S) -> list[np.ndarray] | None:
        """The arrays of message ``req`` (waiting for them), or None when the link died first or
        they did not come within ``timeout``. Messages older than ``req`` (draws prefetched and
        then not asked for) are dropped."""
        with self._cond:
            _wait(self._cond, lambda: req in self._got, lambda: self.error is None, timeout)
            arrays = self._got.pop(req, None)
            for old in [r for r in self._got if r < req]:
                del self._got[old]
        return arrays

    def close(self) -> None:
        self._fail("closed")
        self._out.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self.sock.close()


class ClientLinks:
    """A buffer client's links to the shards on other nodes, by shard: a :class:`Link`, or False
    where none could be set up (by value to that shard from then on). ``key`` names this client to
    the shards; ``host`` is this node's address (the listener binds to it, never 0.0.0.0).

    The client supplies what needs Ray: ``remote(k)`` (shard ``k`` runs on another node) and
    ``open(k, address, secret, key)``, which asks shard ``k`` to connect to ``address`` and returns
    a function that waits up to the seconds given for the shard's answer: True once it has the
    link, False when it could not, None while it has not answered."""

    def __init__(self, chain_bytes: int, host: str, remote: Callable[[int], bool],
                 open: Callable[[int, tuple[str, int], bytes, str], Callable[[float], bool | None]],
                 min_bytes: Callable[[], int]):
        self.chain_bytes, self.host = int(chain_bytes), host
        self._remote, self._open, self._min_bytes = remote, open, min_bytes
        self.key = uuid.uuid4().hex
        self.links: dict[int, Link | bool] = {}
        self._opens: dict[int, int] = {}
        self._next = 0
        self._of: dict[int, Link] = {}  # request id -> the link its message comes on

    def get(self, k: int, n: int) -> Link | None:
        """A live link to shard ``k`` for a batch of ``n`` chains; None when the shard shares this
        node, the batch is small (Ray inlines it: see :data:`ebmscale.buffer.mailbox.MIN_BYTES`)
        or no link can be had."""
        if not self._remote(k) or n * self.chain_bytes < self._min_bytes():
            return None
        link = self.links.get(k)
        if link is False:
            return None
        if isinstance(link, Link):
            if link.alive:
                return link
            self.drop(k)
        if self._opens.get(k, 0) >= MAX_OPENS:
            log.warning("replay shard %d: its link broke %d times; chains to it go by value through Ray", k, MAX_OPENS)
            self.links[k] = False
            return None
        self._opens[k] = self._opens.get(k, 0) + 1
        try:
            link = self.links[k] = Link(self._setup(k))
        except OSError as exc:
            log.warning("replay shard %d: no direct link (%s); chains to it go by value through Ray", k, exc)
            self.links[k] = False
            return None
        return link

    def _setup(self, k: int) -> socket.socket:
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        secret = secrets.token_bytes(32)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.bind((self.host, 0))
            listener.listen(8)
            answer = self._open(k, listener.getsockname()[:2], secret, self.key)
            conn = accept_peer(listener, secret, deadline, gave_up=lambda: answer(0) is False)
        try:
            if not answer(max(deadline - time.monotonic(), 1.0)):
                raise LinkError("the shard could not connect")
        except BaseException:
            conn.close()
            raise
        return conn

    def request(self, k: int) -> int:
        """A new request id for a message on shard ``k``'s link (:meth:`get` returned it)."""
        self._next += 1
        self._of[self._next] = self.links[k]
        return self._next

    def take(self, req: int) -> list[np.ndarray] | None:
        """The arrays of draw ``req``, or None when its link died (the caller asks by value)."""
        link = self._of.pop(req, None)
        for old in [r for r, ln in self._of.items() if r < req and ln is link]:
            del self._of[old]  # prefetched draws not asked for
        return None if link is None else link.take(req)

    def forget(self, req: int) -> None:
        """Request ``req`` (a write-back) has landed, by link or by value."""
        self._of.pop(req, None)

    def drop(self, k: int) -> None:
        """Close shard ``k``'s link (it broke, or the shard moved)."""
        link = self.links.pop(k, None)
        if isinstance(link, Link):
            link.close()

    def close(self) -> None:
        for k in list(self.links):
            self.drop(k)


# What a shard does with a client's draw request: ``serve(n, labels, seed)`` returns the arrays of
# the answer (stored chains, noise of the re-initialised starts, slot indices, reinit mask).
Serve = Callable[[int, "np.ndarray | None", int], list]


class _Peer:
    """One client's link at the shard: a reader thread that takes every message off the socket
    (write-backs' chains, kept until the shard's call for them takes them; draw requests, answered
    at once through ``serve`` once the client's write-back ``after`` has landed) and a sender
    thread that writes the answers in order."""

    def __init__(self, sock: socket.socket, serve: Serve | None):
        self.sock, self.alive, self._serve = sock, True, serve
        self._cond = threading.Condition()
        self._got: dict[int, list[np.ndarray]] = {}
        self._landed = 0  # the latest write-back request of this client that has landed here
        self._sending = threading.Lock()  # two writers: the sender thread, and the reader's answers
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._send, daemon=True, name="ebmscale-link-send"),
                         threading.Thread(target=self._read, daemon=True, name="ebmscale-link-serve")]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        while (item := self._out.get()) is not None:
            self._write(*item)

    def _write(self, req: int, arrays: list[np.ndarray], meta: dict | None = None) -> None:
        if not self.alive:
            return
        try:
            with self._sending:
                send_arrays(self.sock, req, arrays, meta)
        except OSError:
            self.close()  # the client sees the link die and asks again by value

    def _read(self) -> None:
        try:
            while self.alive:
                req, arrays, meta = recv_arrays(self.sock)
                if meta.get("op") == "draw":
                    self._answer(req, arrays, meta)
                    continue
                with self._cond:
                    self._got[req] = arrays
                    self._cond.notify_all()
        except (OSError, KeyError, TypeError, ValueError):  # the socket, or a request without its words
            self.close()

    def _answer(self, req: int, arrays: list[np.ndarray], meta: dict) -> None:
        """Serve draw request ``req`` once write-back ``meta["after"]`` has landed; an answer
        without arrays tells the client to ask by value (which raises what went wrong here)."""
        after = int(meta["after"])
        with self._cond:
            landed = _wait(self._cond, lambda: self._landed >= after, lambda: self.alive, IO_TIMEOUT_S)
        if not landed:
            raise LinkError("a draw waited in vain for the write-back before it")
        try:
            labels = arrays[0] if meta.get("labels") else None
            answer = self._serve(int(meta["n"]), labels, int(meta["seed"])) if self._serve else []
        except Exception:  # noqa: BLE001 - the client asks again by value, and Ray carries the error
            answer = []
        self._write(req, answer)  # from this thread: a hand-over to the sender would cost a wake-up

    def send(self, req: int, arrays: list[np.ndarray]) -> None:
        self._out.put((req, arrays, None))

    def take(self, req: int) -> list[np.ndarray] | None:
        """The chains of write-back ``req`` (waiting for them), or None when the link died first
        or they did not come in time."""
        with self._cond:
            _wait(self._cond, lambda: req in self._got, lambda: self.alive, IO_TIMEOUT_S)
            return self._got.pop(req, None)

    def landed(self, req: int) -> None:
        with self._cond:
            self._landed = max(self._landed, int(req))
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if self.alive:
                self.alive = False
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._cond.notify_all()
        self._out.put(None)

    def join(self) -> None:
        for t in self._threads:  # the shut-down socket stops a send or read under way at once
            if t is not threading.current_thread():
                t.join(timeout=5)


class Served:
    """The shard's side: its links to clients, by client key; ``serve`` answers draw requests
    (:data:`Serve`). A message that cannot be read, or a link whose sending failed, drops the link
    (the shard answers by value, or :data:`RESEND`)."""

    def __init__(self, serve: Serve | None = None):
        self._peers: dict[str, _Peer] = {}
        self._serve = serve

    def connect(self, address: tuple[str, int], secret: bytes, key: str) -> bool:
        """Open client ``key``'s link (replacing an older one); False when it cannot. Links whose
        client went away (their reader saw the socket close) are closed here too."""
        for gone in [k for k, peer in self._peers.items() if k == key or not peer.alive]:
            self.drop(gone)
        try:
            sock = connect_peer(address, secret)
        except OSError:
            return False
        sock.settimeout(None)  # the reader waits for the client's next message as long as it takes
        self._peers[key] = _Peer(sock, self._serve)
        return True

    def _live(self, key: str) -> _Peer | None:
        peer = self._peers.get(key)
        if peer is not None and not peer.alive:
            self.drop(key)
            return None
        return peer

    def send(self, key: str, req: int, arrays: list[np.ndarray]) -> bool:
        """Queue message ``req`` (the arrays must not change) for client ``key``; False when there
        is no live link (the caller answers by value)."""
        peer = self._live(key)
        if peer is None:
            return False
        peer.send(req, arrays)
        return True

    def recv(self, key: str, req: int) -> list[np.ndarray] | None:
        """Message ``req`` from client ``key``, or None (no link, or it failed: dropped)."""
        peer = self._live(key)
        arrays = None if peer is None else peer.take(req)
        if arrays is None:
            self.drop(key)
        return arrays

    def landed(self, key: str, req: int) -> None:
        """Client ``key``'s write-back ``req`` has landed (or was refused): its draws after it may
        be served."""
        peer = self._peers.get(key)
        if peer is not None:
            peer.landed(req)

    def drop(self, key: str) -> None:
        peer = self._peers.pop(key, None)
        if peer is not None:
            peer.close()
            peer.join()
            peer.sock.close()
