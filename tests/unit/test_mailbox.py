"""The Ray buffer client's mailbox bookkeeping (ebmscale.buffer.mailbox.ClientBoxes), without Ray:
which shard gets a mailbox, and which write mailbox is free while write-backs are in flight. The
same paths under Ray: tests/distributed/test_ray_buffer.py (mailbox tests) and test_node_loss.py."""
from __future__ import annotations

import os

import numpy as np

from ebmscale.buffer import mailbox


def _boxes(local=(0,), probe_ok=True, shape=(3, 4)):
    probed = []

    def probe(k, address):
        probed.append(k)
        return probe_ok and mailbox.Attached().probe(address)

    return mailbox.ClientBoxes(shape, int(np.prod(shape)) * 4, local=lambda k: k in local, probe=probe), probed


def test_a_mailbox_only_to_a_local_shard_that_maps_it_and_for_big_enough_batches(monkeypatch):
    boxes, probed = _boxes(local=(0,))
    try:
        assert boxes.get(1, "draw", 10_000) is None and 1 not in probed  # another node: no mailbox, no probe
        assert boxes.get(0, "draw", 8) is None and boxes.boxes == {}  # 8 x 48 bytes: by value (Ray inlines it)
        box = boxes.get(0, "draw", 4096)
        assert box is not None and probed == [0]
        view = box.view(4096, (3, 4))
        view[:] = 1.5
        assert (mailbox.Attached().view(box.address, 4096, (3, 4)) == 1.5).all()  # the shard's side sees it
        assert boxes.get(0, "draw", 3000) is box and probed == [0]  # kept, probed once
        assert boxes.by_key(box.address[0]) is box
    finally:
        boxes.close()
    assert not os.path.exists(box.address[1] or "/nonexistent")
    refused, probed = _boxes(probe_ok=False)
    monkeypatch.setattr(mailbox, "MIN_BYTES", 0)
    assert refused.get(0, "write", 1) is None and refused.boxes == {(0, "write"): False}
    assert refused.get(0, "write", 1) is None and probed == [0]  # not tried again


def test_write_mailboxes_alternate_and_wait_for_the_older_only_when_both_are_busy(monkeypatch):
    monkeypatch.setattr(mailbox, "MIN_BYTES", 0)
    boxes, _ = _boxes()
    inflight, finished, landed = [], set(), []

    def land(job):
        landed.append(job)
        inflight.remove(job)

    def write(name):
        kind, box = boxes.free_write(0, 2, lambda: inflight, lambda job: job in finished, land)
        boxes.writes[(0, kind)] = name
        inflight.append(name)
        return kind, box

    try:
        kind1, box1 = write("w1")
        assert kind1 == "write" and landed == []
        kind2, box2 = write("w2")  # w1 still in flight: the second mailbox
        assert kind2 == "write.1" and box2 is not box1 and landed == []
        kind3, box3 = write("w3")  # both busy: wait for the older (w1), reuse its mailbox
        assert (kind3, box3, landed) == ("write", box1, ["w1"])
        finished.add("w2")  # w3 busy, w2 finished: w2 lands without waiting and its mailbox is taken
        kind4, box4 = write("w4")
        assert (kind4, box4, landed) == ("write.1", box2, ["w1", "w2"])
        assert inflight == ["w3", "w4"]
    finally:
        boxes.close()
    none, _ = _boxes(local=())
    assert none.free_write(0, 2, lambda: [], lambda job: True, lambda job: None) is None  # no mailbox to that shard
