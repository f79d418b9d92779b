"""The wire of a direct link (:mod:`ebmscale.buffer.link`): the mutual HMAC handshake that both
ends run before anything else passes, and the framing of a message (request id, a JSON spec of
the arrays and a few words, then the arrays' raw bytes: no pickle). NumPy and the standard
library only.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import struct
import time
from typing import Callable

import numpy as np

HANDSHAKE_TIMEOUT_S = 5.0  # one peer's handshake (a silent peer cannot hold the listener longer)
_HELLO = b"ebmscale-link-1\n"
_NONCE = 32
_MAC = hashlib.sha256().digest_size
_HEAD = struct.Struct("!4sQI")  # magic, request id, length of the JSON spec (arrays, a few words)
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


def send_arrays(sock: socket.socket, req: int, arrays: list[np.ndarray], meta: dict | None = None) -> None:
    """One message: request id ``req``, ``arrays`` (their raw bytes in C order: no pickle) and
    ``meta``, a few JSON words (a draw request's n, seed and so on)."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    spec = json.dumps({"a": [[a.dtype.str, list(a.shape)] for a in arrays], "m": meta or {}}).encode()
    sock.sendall(_HEAD.pack(_MAGIC, req, len(spec)) + spec)
    for a in arrays:
        if a.nbytes:
            sock.sendall(a.reshape(-1).view(np.uint8).data)


def recv_arrays(sock: socket.socket) -> tuple[int, list[np.ndarray], dict]:
    """The next message on ``sock`` (see :func:`send_arrays`): ``(request id, arrays, meta)``, each
    array read straight into a new one; a malformed message raises :class:`LinkError`."""
    magic, req, size = _HEAD.unpack(_recv_bytes(sock, _HEAD.size))
    if magic != _MAGIC or size > _MAX_SPEC:
        raise LinkError("not a link message")
    try:
        head = json.loads(_recv_bytes(sock, size))
        spec, meta = head["a"], head["m"]
        if not isinstance(meta, dict):
            raise TypeError("its words are not an object")
        arrays = [np.empty([int(d) for d in shape], dtype=np.dtype(dt)) for dt, shape in spec if dt in _DTYPES]
    except (ValueError, TypeError, KeyError) as exc:
        raise LinkError(f"bad link message ({exc})") from None
    if len(arrays) != len(spec):
        raise LinkError("a link message with an unexpected dtype")
    for a in arrays:
        if a.nbytes:
            _recv_exact(sock, memoryview(a.reshape(-1).view(np.uint8)))
    return req, arrays, meta


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
