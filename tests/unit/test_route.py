"""Which way a buffer client's chains travel (ebmscale.buffer.route.Routes), without Ray: a client's
routes to a shard on "another node" (a :class:`Shard` in this process, its link a real socket on
loopback), the same chains as by value, and the fall-backs of a restarted shard that has no link.
Under Ray across two nodes: tests/distributed/test_node_loss.py."""
from __future__ import annotations

import threading
import time

import numpy as np

from ebmscale.buffer import link, mailbox
from ebmscale.buffer.replay import ReplayBuffer, encode, starts_from_encoded
from ebmscale.buffer.route import Routes
from ebmscale.buffer.shard import Shard

SHAPE, BOUNDS = (3, 4), (0.0, 1.0)


def _shard(seed: int) -> Shard:
    shard = Shard()
    shard.shard_id, shard.buf = 0, ReplayBuffer(40, SHAPE, BOUNDS, 0.3, "uint8", 0, seed=seed)
    return shard


def _routes(shards: list[Shard]) -> Routes:
    """Routes of a client whose shard 0 is ``shards[-1]`` (on another node), linked on first use."""
    def open_(k, address, secret, key):
        t = threading.Thread(target=lambda: shards[-1].connect_link(address, secret, key))
        t.start()
        return lambda timeout: None if (t.join(timeout), t.is_alive())[1] else True

    links = link.ClientLinks(12, "127.0.0.1", remote=lambda k: True, open=open_, min_bytes=lambda: 0)
    boxes = mailbox.ClientBoxes(SHAPE, 12, local=lambda k: False, probe=lambda k, a: False)
    return Routes(boxes, links, lambda k: False, SHAPE, "uint8", BOUNDS)


def _stored(shard: Shard, idx: np.ndarray, chains: np.ndarray) -> bool:
    """Shard holds ``chains`` in slots ``idx`` (a slot drawn twice keeps its last write)."""
    last = {int(slot): i for i, slot in enumerate(idx)}
    q = encode(chains, "uint8", BOUNDS)
    return all(np.array_equal(shard.buf.data[slot], q[i]) for slot, i in last.items())


def _no_by_value():
    raise AssertionError("asked again by value")


def _wait_dead(ln: link.Link) -> None:
    for _ in range(200):
        if not ln.alive:
            return
        time.sleep(0.05)
    raise AssertionError("the link did not notice the shard went away")


def test_link_draws_and_write_backs_equal_by_value_and_a_restarted_shard_falls_back():
    shards = [_shard(1)]
    routes = _routes(shards)
    try:
        # A draw over the link alone (no Ray call: no result to hand over).
        method, args = routes.draw(0, (8, None, 5))
        assert method == "link_draw" and isinstance(routes.links.links[0], link.Link)
        x, idx, reinit = routes.starts(0, 8, method, args, None, _no_by_value)
        q, idx2, reinit2, noise = shards[0].sample(8, None, 5)  # the same draw by value
        assert np.array_equal(x, starts_from_encoded(q, reinit2, noise, "uint8", BOUNDS))
        assert np.array_equal(idx, idx2) and np.array_equal(reinit, reinit2) and reinit.any()

        chains = np.clip(x * np.float32(0.5), *BOUNDS)
        method, args = routes.write(0, np.arange(8), idx, reinit, 2, chains, None)
        assert method == "write_link" and routes._payloads
        # The next draw is sent before the write-back's call runs at the shard, and sees it.
        draw_method, draw_args = routes.draw(0, (40, None, 9))
        assert draw_method == "link_draw" and draw_args[-1] > args[-1]
        assert getattr(shards[0], method)(*args) is None
        routes.landed(method, args)
        assert not routes._payloads
        assert _stored(shards[0], idx, chains)
        x, idx3, _ = routes.starts(0, 40, draw_method, draw_args, None, _no_by_value)
        assert np.array_equal(x, starts_from_encoded(*(lambda q, i, r, n: (q, r, n))(*shards[0].sample(40, None, 9)),
                                                     "uint8", BOUNDS))
        assert not routes.links._of

        # The shard restarts (a new process: no link). The client's link dies with the old one;
        # a draw over it comes back by value.
        shards.append(_shard(2))
        method, args = routes.draw(0, (8, None, 6))
        shards[0]._links().drop(routes.links.key)
        by_value = []
        x, idx, reinit = routes.starts(0, 8, method, args, None,
                                       lambda: by_value.append(1) or shards[1].sample(*args[:3]))
        q, _, reinit2, noise = shards[1].sample(8, None, 6)
        assert by_value == [1] and np.array_equal(x, starts_from_encoded(q, reinit2, noise, "uint8", BOUNDS))
        # The next use opens a link to the new shard; the last write-back went over the old link,
        # so the first draw's call goes through Ray (which orders it), its chains over the link.
        _wait_dead(routes.links.links[0])
        method, args = routes.draw(0, (8, None, 7))
        assert method == "sample_link" and routes.links.links[0].alive
        x, idx, reinit = routes.starts(0, 8, method, args, getattr(shards[1], method)(*args), _no_by_value)
        q, _, reinit2, noise = shards[1].sample(8, None, 7)
        assert np.array_equal(x, starts_from_encoded(q, reinit2, noise, "uint8", BOUNDS))
        # A write-back the restarted shard did not get (no link at all: a Ray-restarted actor)
        # asks to be sent again, and goes by value with the chains the client kept; the draws
        # after it go through Ray until a write-back goes over a link again.
        shards.append(_shard(3))
        method, args = routes.write(0, np.arange(8), idx, reinit, 2, chains, None)
        assert getattr(shards[2], method)(*args) == link.RESEND
        method, args = routes.portable(0, method, args)
        assert method == "write" and getattr(shards[2], method)(*args) is None
        assert _stored(shards[2], idx, chains)
        assert not routes._payloads
        assert routes.draw(0, (8, None, 8))[0] == "sample_link"
    finally:
        routes.close()


def test_the_starts_of_one_part_in_order_are_not_copied_unless_they_are_a_view():
    """placement.gather hands back a draw that came whole from one shard (an array of its own:
    from a link or by value) without a copy; a shared-memory view (which the next draw overwrites),
    a read-only array, or parts out of order are copied into a new array."""
    from ebmscale.buffer.placement import gather

    own = np.random.default_rng(0).random((4, *SHAPE), dtype=np.float32)
    assert gather(4, SHAPE, [np.arange(4)], [own]) is own
    backing = np.zeros((8, *SHAPE), np.float32)
    view = backing[:4]  # what a mailbox hands out
    out = gather(4, SHAPE, [np.arange(4)], [view])
    assert out is not view and not np.shares_memory(out, backing)
    frozen = own.copy()
    frozen.flags.writeable = False
    assert gather(4, SHAPE, [np.arange(4)], [frozen]) is not frozen
    out = gather(4, SHAPE, [np.array([1, 0, 3, 2])], [own])
    assert out is not own and np.array_equal(out[1], own[0]) and np.array_equal(out[0], own[1])
    out = gather(4, SHAPE, [np.array([0, 1]), np.array([2, 3])], [own[:2].copy(), own[2:].copy()])
    assert np.array_equal(out, own)
