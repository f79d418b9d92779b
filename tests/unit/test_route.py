"""Which way a buffer client's chains travel (ebmscale.buffer.route.Routes), without Ray: a client's
routes to a shard on "another node" (a :class:`Shard` in this process, its link a real socket on
loopback), the same chains as by value, and the fall-backs of a restarted shard that has no link.
Under Ray across two nodes: tests/distributed/test_node_loss.py."""
from __future__ import annotations

import threading

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


def test_link_draws_and_write_backs_equal_by_value_and_a_restarted_shard_falls_back():
    shards = [_shard(1)]
    routes = _routes(shards)
    try:
        method, args = routes.draw(0, (8, None, 5))
        assert method == "sample_link" and isinstance(routes.links.links[0], link.Link)
        x, idx, reinit = routes.starts(0, 8, method, args, getattr(shards[0], method)(*args), _no_by_value)
        q, idx2, reinit2, noise = shards[0].sample(8, None, 5)  # the same draw by value
        assert np.array_equal(x, starts_from_encoded(q, reinit2, noise, "uint8", BOUNDS))
        assert np.array_equal(idx, idx2) and np.array_equal(reinit, reinit2) and reinit.any()

        chains = np.clip(x * np.float32(0.5), *BOUNDS)
        method, args = routes.write(0, np.arange(8), idx, reinit, 2, chains, None)
        assert method == "write_link" and routes._payloads
        assert getattr(shards[0], method)(*args) is None
        routes.landed(method, args)
        assert not routes._payloads and not routes.links._of
        assert _stored(shards[0], idx, chains)

        # The shard restarts (a new process: no link). The draw comes back by value, the
        # write-back asks to be sent again, and goes by value with the chains the client kept.
        shards.append(_shard(2))
        method, args = routes.draw(0, (8, None, 6))
        result = getattr(shards[1], method)(*args)
        assert method == "sample_link" and len(result) == 4
        x, idx, reinit = routes.starts(0, 8, method, args, result, _no_by_value)
        q, _, reinit2, noise = shards[1].sample(8, None, 6)
        assert np.array_equal(x, starts_from_encoded(q, reinit2, noise, "uint8", BOUNDS))
        method, args = routes.write(0, np.arange(8), idx, reinit, 2, chains, None)
        assert getattr(shards[1], method)(*args) == link.RESEND
        method, args = routes.portable(0, method, args)
        assert method == "write" and getattr(shards[1], method)(*args) is None
        assert _stored(shards[1], idx, chains)
        assert not routes._payloads and not routes.links._of
    finally:
        routes.close()
