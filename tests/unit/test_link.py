"""Direct TCP links between a buffer client and a shard on another node (ebmscale.buffer.link),
without Ray: real sockets on loopback, both ends in this process (the shard's end on a thread
where it must run while the client waits). Under Ray, across two nodes: tests/distributed/
test_node_loss.py."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from ebmscale.buffer import link


def _pair(secret: bytes = b"s" * 32, serve=None) -> tuple[link.Link, link.Served, str]:
    """A client Link and the shard's Served end (answering draws with ``serve``) joined by an
    authenticated link."""
    served, key = link.Served(serve), "client-1"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ok: list = []
        t = threading.Thread(target=lambda: ok.append(served.connect(listener.getsockname(), secret, key)))
        t.start()
        conn = link.accept_peer(listener, secret, time.monotonic() + 10)
        t.join()
    assert ok == [True]
    return link.Link(conn), served, key


def test_messages_carry_raw_arrays_both_ways_in_order():
    client, served, key = _pair()
    try:
        rng = np.random.default_rng(0)
        q8 = rng.integers(0, 256, (32, 3, 16, 16), dtype=np.uint8)
        q32 = rng.random((5, 3, 16, 16), dtype=np.float32)
        noise = rng.random((0, 3, 16, 16), dtype=np.float32)  # no fresh starts: an empty array
        # A draw: the shard sends, the client's reader keeps it until asked; an older message
        # nobody asks for (a prefetch not used) is dropped when a newer one is taken.
        assert served.send(key, 1, [q32, noise]) and served.send(key, 2, [q8, noise])
        got = client.take(2)
        assert got[0].dtype == np.uint8 and np.array_equal(got[0], q8) and got[1].shape == (0, 3, 16, 16)
        assert client.take(1, timeout=0.2) is None
        # Back-to-back write-backs: sent by the client's writer, read by the shard in order.
        for req, a in ((3, q32), (4, q8)):
            client.send(req, [a])
        first, second = served.recv(key, 3), served.recv(key, 4)
        assert np.array_equal(first[0], q32) and first[0].dtype == np.float32 and np.array_equal(second[0], q8)
    finally:
        client.close()
        served.drop(key)


def test_a_draw_request_is_answered_on_the_link_once_the_write_back_it_follows_has_landed(monkeypatch):
    served_draws = []

    def serve(n, labels, seed):
        served_draws.append((n, None if labels is None else labels.tolist(), seed))
        if seed < 0:
            raise ValueError("a draw the shard cannot serve")
        return [np.full((n, 2), seed, np.float32), np.arange(n)]

    client, served, key = _pair(serve=serve)
    try:
        chains = np.ones((4, 2), np.uint8)
        client.send(1, [chains])  # a write-back's chains; its Ray call has not run at the shard yet
        client.send(2, [], {"op": "draw", "n": 3, "seed": 7, "after": 1, "labels": False})
        assert client.take(2, timeout=0.3) is None and served_draws == []  # waits for write-back 1
        assert np.array_equal(served.recv(key, 1)[0], chains)
        served.landed(key, 1)  # the shard's call for write-back 1 has written them
        got = client.take(2)
        assert served_draws == [(3, None, 7)] and np.array_equal(got[0], np.full((3, 2), 7, np.float32))
        client.send(3, [np.array([2, 0])], {"op": "draw", "n": 2, "seed": 5, "after": 1, "labels": True})
        assert client.take(3)[1].tolist() == [0, 1] and served_draws[-1] == (2, [2, 0], 5)
        # A draw the shard cannot serve: an empty answer (the client asks by value, where Ray
        # carries the error), and the link lives on.
        client.send(4, [], {"op": "draw", "n": 1, "seed": -1, "after": 1, "labels": False})
        assert client.take(4) == [] and client.alive
        # A request without its words (a bug at the other end): the link is closed, not left
        # without a reader, so the client asks by value at once.
        client.send(5, [], {"op": "draw", "n": 1})
        assert client.take(5, timeout=10) is None and not client.alive
    finally:
        client.close()
        served.drop(key)
    # A write-back that never lands (its call refused it, say): the draw after it gives up at
    # the I/O timeout and the link dies, so the client asks by value.
    monkeypatch.setattr(link, "IO_TIMEOUT_S", 0.5)
    client, served, key = _pair(serve=serve)
    client.send(9, [], {"op": "draw", "n": 1, "seed": 1, "after": 8, "labels": False})
    assert client.take(9, timeout=10) is None and not client.alive
    client.close()
    served.drop(key)


def test_an_unauthenticated_peer_is_refused_and_the_right_one_still_gets_in():
    secret = b"k" * 32
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = listener.getsockname()
        result: dict = {}

        def client_side():
            try:
                result["conn"] = link.accept_peer(listener, secret, time.monotonic() + 20)
            except OSError as exc:
                result["error"] = exc

        t = threading.Thread(target=client_side)
        t.start()
        # A peer with the wrong secret: the client closes it; so does one that sends garbage.
        with pytest.raises(OSError):
            link.connect_peer(address, b"x" * 32)
        with socket.create_connection(address) as raw:
            raw.settimeout(10)
            raw.recv(100)  # the hello and nonce
            raw.sendall(b"\0" * 64)
            assert raw.recv(100) == b""  # refused: closed without an answer
        good = link.connect_peer(address, secret)
        t.join()
        assert "conn" in result
        result["conn"].close()
        good.close()
    # A shard never accepts a "client" that does not know the secret either.
    with socket.create_server(("127.0.0.1", 0)) as fake:
        def fake_client():
            conn, _ = fake.accept()
            with conn:
                conn.sendall(b"ebmscale-link-1\n" + b"n" * 32)
                conn.recv(64)
                conn.sendall(b"\0" * 32)  # a wrong proof
                time.sleep(0.5)

        t = threading.Thread(target=fake_client)
        t.start()
        assert link.Served().connect(fake.getsockname(), secret, "k") is False
        t.join()


def test_a_broken_link_fails_cleanly_on_both_ends():
    client, served, key = _pair()
    served.send(key, 1, [np.ones((2, 3), np.float32)])
    assert client.take(1) is not None
    served.drop(key)  # the shard's process died, say
    assert client.take(2, timeout=10) is None and not client.alive
    assert served.send(key, 3, [np.ones(2, np.float32)]) is False and served.recv(key, 3) is None
    client.close()
    client, served, key = _pair()
    client.close()  # the client went away: a write-back's message never comes
    assert served.recv(key, 1) is None and served.send(key, 2, [np.ones(2, np.float32)]) is False
    # A client that went away without anyone asking its shard for anything: its link is closed
    # when the next client links to the shard (its socket is not kept open for ever).
    client, served, key = _pair()
    gone = served._peers[key]
    client.close()
    for _ in range(100):
        if not gone.alive:
            break
        time.sleep(0.05)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        t = threading.Thread(target=lambda: served.connect(listener.getsockname(), b"s" * 32, "client-2"))
        t.start()
        other = link.Link(link.accept_peer(listener, b"s" * 32, time.monotonic() + 10))
        t.join()
    assert list(served._peers) == ["client-2"] and gone.sock.fileno() == -1
    other.close()
    served.drop("client-2")


def test_client_links_only_to_other_nodes_for_big_batches_and_fall_back_once(caplog):
    served = link.Served()
    opened = []

    def open_(k, address, secret, key):
        opened.append(k)
        if k == 2:  # a shard that cannot connect (answers at once: the client does not wait 30 s)
            return lambda timeout: False
        t = threading.Thread(target=lambda: served.connect(address, secret, key))
        t.start()
        return lambda timeout: None if (t.join(timeout), t.is_alive())[1] else served._peers.get(key) is not None

    links = link.ClientLinks(4 * 48, "127.0.0.1", remote=lambda k: k != 0, open=open_, min_bytes=lambda: 1024)
    try:
        assert links.get(0, 1000) is None and opened == []  # this node's shard: the mailbox
        assert links.get(1, 2) is None and opened == []  # 384 bytes: by value, Ray inlines it
        ln = links.get(1, 100)
        assert ln is not None and ln.alive and links.get(1, 100) is ln and opened == [1]
        req = links.request(1)
        served.send(links.key, req, [np.arange(6, dtype=np.int64)])
        assert np.array_equal(links.take(req)[0], np.arange(6))
        with caplog.at_level("WARNING", logger="ebmscale.buffer.link"):
            assert links.get(2, 100) is None and links.get(2, 100) is None
        assert opened == [1, 2] and links.links[2] is False  # tried once, then by value
        assert sum("replay shard 2: no direct link" in r.getMessage() for r in caplog.records) == 1
        # A link that broke is opened again on its next use, at most MAX_OPENS times in all.
        for _ in range(link.MAX_OPENS - 1):
            served.drop(links.key)
            assert links.take(links.request(1)) is None
            assert links.get(1, 100) is not None
        served.drop(links.key)
        assert links.take(links.request(1)) is None
        assert links.get(1, 100) is None and opened.count(1) == link.MAX_OPENS
    finally:
        links.close()
