"""Losing a Ray node under the global buffer: two Ray nodes on loopback in one host
(``ray.cluster_utils.Cluster``: a head and a worker with their own raylets and object stores),
shards pinned one per node; the worker node is removed (its raylet and actors killed) and the
buffer goes on: its shard is re-created on the surviving node from the last restore point, once,
whichever rank notices first, and counted in ``buffer_restarts``.

The same under the real CLI, on network namespaces with a buffer-only Ray node (and then SIGKILL
of everything and ``--resume auto``), is in test_two_nodes.py.
"""
from __future__ import annotations

import secrets
import time

import numpy as np
import pytest

from ebmscale.config import load_config

ray = pytest.importorskip("ray")

from ebmscale.buffer import link, mailbox, ray_host  # noqa: E402
from ebmscale.buffer.ray_host import RayBuffer  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def two_node_cluster(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    token = tmp_path / "token"
    ray_host.write_token(str(token), secrets.token_hex(32))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    ray_host._refresh_auth()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def _client(address: str, rank: int, world: int, share, num_classes: int = 0, **buffer) -> RayBuffer:
    overrides = [f"buffer.{k}={v}" for k, v in buffer.items()]
    b = load_config(None, ["buffer.backend=ray", "data.batch_size=1", f"buffer.ray_address={address}",
                           *overrides]).buffer
    return RayBuffer(b, (2,), (5.0, 6.0), num_classes, rank, world, shard_seed=lambda k: 100 + k, share=share)


@pytest.mark.parametrize("storage", ["fp32", "uint8"])
def test_chains_to_another_nodes_shard_over_the_direct_link_equal_those_by_value(two_node_cluster, storage,
                                                                                 monkeypatch):
    """Draws and write-backs to the worker node's shard go over a direct TCP link (only slot
    indices through Ray): the same starts, slots and stored chains as by value through Ray (the
    link switched off by hand), back-to-back write-backs landing in order; uint8 with labels."""
    from tests.distributed.test_ray_buffer import assert_same_chains, draw_and_write_back

    cluster, worker = two_node_cluster
    monkeypatch.setattr(mailbox, "MIN_BYTES", 0)  # these toy batches would go by value
    labelled = storage == "uint8"
    c = _client(cluster.address, 0, 1, lambda o: o, num_classes=3 * labelled, capacity=60, shards=2,
                reinit_prob=0.3, storage=storage)
    try:
        assert [i["node"] for i in c.shard_info()][1] == worker.node_id  # shard 1 on the other node
        labels = np.array([0, 2, 1, 1, 0] * 6) if labelled else None
        draws, stored = [], []
        for direct in (True, False):
            if not direct:
                used = c._links.links[1]
                c._links.close()
                c._links.links = {1: False}  # by value, as before the links
            drawn, after = draw_and_write_back(c, labels)
            draws.append(drawn)
            stored.append(after)
            if direct:  # a draw sent while the write-back before it is in flight sees that write-back
                x, handle = c.draw(30, labels, np.random.default_rng(11))
                c.write_back(handle, np.full_like(x, 5.25))
                y, again = c.draw(30, labels, np.random.default_rng(12))
                written = {(k, int(slot)) for k, _, idx, _ in handle for slot in idx}
                seen = [y[p] for k, pos, idx, reinit in again for p, slot, r in zip(pos, idx, reinit)
                        if k == 1 and (k, int(slot)) in written and not r]
                assert seen and np.allclose(seen, 5.25, atol=1 / 255)
                c.flush()
        # Every draw (request and answer: no Ray call) and write-back went over the link (5 and 4 to
        # shard 1), and every draw's answer was taken (none was asked again by value).
        assert isinstance(used, link.Link) and used.received == 5 and used.sent == 5 + 4 and not used._got
        assert not c._route._payloads and not c._links._of
        assert_same_chains(draws, stored, storage)
    finally:
        c.close()


def test_a_dead_nodes_shard_comes_back_on_a_live_node_from_the_restore_point(two_node_cluster, tmp_path,
                                                                            monkeypatch):
    cluster, worker = two_node_cluster
    # Even toy batches through shared memory to the head node's shard (and to shard 1 once it has
    # moved there), by value to the worker node's.
    monkeypatch.setattr(mailbox, "MIN_BYTES", 0)
    box: dict = {}
    a = _client(cluster.address, 0, 2, lambda o: box.setdefault("i", o), capacity=20, reinit_prob=0.0)
    b = _client(cluster.address, 1, 2, lambda o: box["i"], capacity=20, reinit_prob=0.0)
    try:
        nodes = [i["node"] for i in a.shard_info()]
        assert nodes[1] == worker.node_id != nodes[0]  # one shard per node
        state = a.state_dict()
        for k, s in enumerate(state["shards"]):
            s["data"][:] = 1.0 + k
        a.load_state_dict(state)
        step = tmp_path / "step"
        step.mkdir()
        a.save_shards(str(step))  # the restore point: shard files
        x, handle = b.draw(16, None, np.random.default_rng(0))
        b.write_back(handle, np.full_like(x, 7.5))  # after the restore point: lost with the node
        b.flush()
        assert b._links.links[1].sent == 2  # the draw and write-back to the worker node's shard over the direct link


        cluster.remove_node(worker)
        # Rank 1 notices first (a draw), re-creates the shard; rank 0's write-backs and reads go on.
        x, handle = b.draw(16, None, np.random.default_rng(1))
        assert np.isin(x, [1.0, 2.0, 7.5]).all()
        a.write_back(handle, np.full_like(x, 3.0))
        a.flush()
        info = a.shard_info()
        assert {i["node"] for i in info} == {nodes[0]}
        assert [i["incarnation"] > 0 for i in info] == [False, True]
        shard1 = a.state_dict()["shards"][1]["data"]
        written = np.concatenate([idx for k, _, idx, _ in handle if k == 1])
        assert np.all(shard1[written] == 3.0)
        rest = np.setdiff1d(np.arange(len(shard1)), written)
        assert np.all(shard1[rest] == 2.0)  # the restore point, not rank 1's later 7.5s
        # Re-created once (rank 0's stale handle finds it by name), counted once.
        seen = 0.0
        for _ in range(40):
            seen += a.counters()["buffer_restarts"]
            time.sleep(0.05)
        assert seen == 1
        assert b.health() is None and a.health()["slots"] == 40
        assert b._mail.boxes[(0, "draw")] and a._mail.boxes[(0, "write")]  # the head node's shard: /dev/shm
    finally:
        b.close()
        a.close()


TOY = ["data.dataset=8gaussians", "model.arch=mlp", "model.width=8", "model.depth=2", "data.toy_train_size=500",
       "data.batch_size=16", "sampler.steps=2", "sampler.step_size=0.1", "sampler.noise_std=0.05",
       "buffer.capacity=64", "train.progress=false", "train.tensorboard=false", "train.threads=1",
       "train.device=cpu", "train.sample_every=0", "buffer.backend=ray", "train.precision=fp32"]


def test_training_goes_on_when_a_ray_node_dies(two_node_cluster, tmp_path, monkeypatch):
    import json

    import ebmscale.trainer as trainer_module

    cluster, worker = two_node_cluster
    seen: dict = {}

    class NodeKiller(trainer_module.Trainer):
        def train_step(self):
            if self.step == 5:  # after the step-4 checkpoint (the restore point) was written
                seen["before"] = [i["node"] for i in self.buffer.shard_info()]
                cluster.remove_node(worker)
            return super().train_step()

    monkeypatch.setattr(trainer_module, "Trainer", NodeKiller)
    cfg = load_config(None, [*TOY, f"buffer.ray_address={cluster.address}", "buffer.shards=2", "train.steps=12",
                             "train.log_every=4", "train.checkpoint_every=4"])
    result = trainer_module.train(cfg, run_dir=str(tmp_path / "run"))
    assert result.steps == 12
    assert seen["before"][1] == worker.node_id != seen["before"][0]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert sum(r["buffer_restarts"] for r in records) == 1
    assert all(np.isfinite(r["loss"]) for r in records)


def test_throughput_benchmark_across_the_two_nodes(two_node_cluster):
    """benchmarks/ray_buffer.py --two-nodes at toy size: rank 1 on the worker node draws from and
    writes back to a shard on the head node (by value through the object stores), figures > 0."""
    from benchmarks.ray_buffer import two_node_throughput

    cluster, worker = two_node_cluster
    figures = two_node_throughput(cluster, worker, [((3, 8, 8), 4, "fp32"), ((3, 8, 8), 4, "uint8")], 2)
    assert len(figures) == 2 and all(draw > 0 and write > 0 for draw, write in figures)
