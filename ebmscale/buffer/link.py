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
* A draw: the shard queues the message (request id, then the arrays) for its sender thread and
  returns the slot indices through Ray, so that the reply and the bytes travel at once; a reader
  thread on the client takes every message off the socket as it comes (so a shard never waits on
  a client busy elsewhere, e.g. with a prefetched draw it has not asked for yet) and the draw
  picks its message by request id.
* A write-back: a writer thread on the client sends the message (fire-and-forget, as by value)
  and the shard's call reads it; calls from one client to one shard run in order, and so do the
  messages on the link (each carries the id the call expects).
* Failure: a shard that cannot send or read a message drops the link and answers by value (a
  draw) or with :data:`RESEND` (a write-back, which the client then sends by value); a restarted
  shard has no link and does the same; the client re-opens a broken link on its next use, at
  most :data:`MAX_OPENS` times per shard, and otherwise (or when the first set-up fails) goes by
  value with one log line.

NumPy and the standard library only (no Ray, no torch): the shard actors import this module.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import secrets
import socket
import struct
import threading
import time
import uuid
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

RESEND = "resend"  # a shard's answer to a write-back whose chains did not come over the link
MAX_OPENS = 3  # link set-ups per shard before the client sends by value for good
SETUP_TIMEOUT_S = 30.0  # a whole set-up: the shard's call queued behind others, connect, handshake
HANDSHAKE_TIMEOUT_S = 5.0  # one peer's handshake (a silent peer cannot hold the listener longer)
IO_TIMEOUT_S = 60.0  # a shard waiting for a write-back's message, or on a client that stopped reading
_HELLO = b"ebmscale-link-1\n"
_NONCE = 32
_MAC = hashlib.sha256().digest_size
_HEAD = struct.Struct("!4sQI")  # magic, request id, length of the JSON array spec
_MAGIC = b"EBLK"
# What a message may carry (a peer that passed the handshake, still: no object arrays, no pickle).
_DTYPES = {np.dtype(t).str for t in (np.float32, np.float16, np.uint8, np.int64, np.bool_)}
_MAX_SPEC = 1 << 16


class LinkError(ConnectionError):
    """A link that cannot be set up or carry a message (bad peer, bad message, closed)."""


def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if not n:
            raise LinkError("the link was closed")
        got += n


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf))
    return bytes(buf)


def send_arrays(sock: socket.socket, req: int, arrays: list[np.ndarray]) -> None:
    """One message: request id ``req`` and ``arrays``, their raw bytes in C order (no pickle)."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    spec = json.dumps([[a.dtype.str, list(a.shape)] for a in arrays]).encode()
    sock.sendall(_HEAD.pack(_MAGIC, req, len(spec)) + spec)
    for a in arrays:
        if a.nbytes:
            sock.sendall(a.reshape(-1).view(np.uint8).data)


def recv_arrays(sock: socket.socket) -> tuple[int, list[np.ndarray]]:
    """The next message on ``sock`` (see :func:`send_arrays`): ``(request id, arrays)``, each read
    straight into a new array; a malformed one raises :class:`LinkError`."""
    magic, req, size = _HEAD.unpack(_recv_bytes(sock, _HEAD.size))
    if magic != _MAGIC or size > _MAX_SPEC:
        raise LinkError("not a link message")
    try:
        spec = json.loads(_recv_bytes(sock, size))
        arrays = [np.empty([int(d) for d in shape], dtype=np.dtype(dt)) for dt, shape in spec if dt in _DTYPES]
    except (ValueError, TypeError) as exc:
        raise LinkError(f"bad link message ({exc})") from None
    if len(arrays) != len(spec):
        raise LinkError("a link message with an unexpected dtype")
    for a in arrays:
        if a.nbytes:
            _recv_exact(sock, memoryview(a.reshape(-1).view(np.uint8)))
    return req, arrays


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers go out at once


def accept_peer(listener: socket.socket, secret: bytes, deadline: float,
                gave_up: Callable[[], bool] = lambda: False) -> socket.socket:
    """The client's side of a set-up: the first connection to ``listener`` that proves it knows
    ``secret`` (and to which the client proves it), before ``deadline`` (time.monotonic());
    connections that do not are closed. Raises :class:`LinkError` at the deadline, or once
    ``gave_up()`` (polled a few times a second: the shard answered that it could not connect)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LinkError("no authenticated peer connected in time")
        if gave_up():
            raise LinkError("the shard could not connect")
        listener.settimeout(min(left, 0.2))
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        try:
            conn.settimeout(min(HANDSHAKE_TIMEOUT_S, max(left, 0.1)))
            nonce = secrets.token_bytes(_NONCE)
            conn.sendall(_HELLO + nonce)
            answer = _recv_bytes(conn, _MAC + _NONCE)
            if not hmac.compare_digest(answer[:_MAC], _mac(secret, b"shard", nonce)):
                raise LinkError("the peer does not know the link's secret")
            conn.sendall(_mac(secret, b"client", answer[_MAC:]))
        except OSError:  # LinkError included: not our shard; wait for the next connection
            conn.close()
            continue
        conn.settimeout(None)
        _tune(conn)
        return conn


def connect_peer(address: tuple[str, int], secret: bytes, timeout: float = HANDSHAKE_TIMEOUT_S) -> socket.socket:
    """The shard's side of a set-up: connect to the client at ``address`` and prove, both ways,
    that each knows ``secret``. Raises OSError (:class:`LinkError` for a peer that does not)."""
    sock = socket.create_connection(tuple(address), timeout=timeout)
    try:
        hello = _recv_bytes(sock, len(_HELLO) + _NONCE)
        if not hello.startswith(_HELLO):
            raise LinkError("not an ebmscale link")
        nonce = secrets.token_bytes(_NONCE)
        sock.sendall(_mac(secret, b"shard", hello[len(_HELLO):]) + nonce)
        if not hmac.compare_digest(_recv_bytes(sock, _MAC), _mac(secret, b"client", nonce)):
            raise LinkError("the client does not know the link's secret")
    except BaseException:
        sock.close()
        raise
    _tune(sock)
    return sock


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
                req, arrays = recv_arrays(self.sock)
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

    def send(self, req: int, arrays: list[np.ndarray]) -> None:
        """Queue message ``req`` for the shard (the arrays must not change until it is sent)."""
        self._out.put((req, arrays))

    def take(self, req: int, timeout: float = IO_TIMEOUT_S) -> list[np.ndarray] | None:
        """The arrays of message ``req`` (waiting for them), or None when the link died first or
        they did not come within ``timeout``. Messages older than ``req`` (draws prefetched and
        then not asked for) are dropped."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while req not in self._got and self.error is None and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
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


class _Peer:
    """One client's link at the shard: the socket, and a sender thread that writes the draws'
    messages in order while the shard answers the call (the reply through Ray and the bytes on
    the link travel at once) and goes on to its next call."""

    def __init__(self, sock: socket.socket):
        self.sock, self.alive = sock, True
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send, daemon=True, name="ebmscale-link-send")
        self._thread.start()

    def _send(self) -> None:
        while (item := self._out.get()) is not None:
            if not self.alive:
                continue
            try:
                send_arrays(self.sock, *item)
            except OSError:
                self.close()  # the client sees the link die and asks again by value

    def send(self, req: int, arrays: list[np.ndarray]) -> None:
        self._out.put((req, arrays))

    def close(self) -> None:
        if self.alive:
            self.alive = False
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._out.put(None)

    def join(self) -> None:
        self._thread.join(timeout=5)  # the shut-down socket stops a send under way at once


class Served:
    """The shard's side: its links to clients, by client key. A message that cannot be read, or
    a link whose sending failed, drops the link (the shard answers by value, or :data:`RESEND`)."""

    def __init__(self):
        self._peers: dict[str, _Peer] = {}

    def connect(self, address: tuple[str, int], secret: bytes, key: str) -> bool:
        """Open client ``key``'s link (replacing an older one); False when it cannot."""
        self.drop(key)
        try:
            sock = connect_peer(address, secret)
        except OSError:
            return False
        sock.settimeout(IO_TIMEOUT_S)
        self._peers[key] = _Peer(sock)
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
        if peer is None:
            return None
        try:
            got, arrays = recv_arrays(peer.sock)
            if got != req:
                raise LinkError(f"link message {got} where {req} was expected")
        except OSError:
            self.drop(key)
            return None
        return arrays

    def drop(self, key: str) -> None:
        peer = self._peers.pop(key, None)
        if peer is not None:
            peer.close()
            peer.join()
            peer.sock.close()
