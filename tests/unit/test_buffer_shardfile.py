"""Buffer shard files without Ray: write/verify/load round trip, and re-splits that keep every
chain once (ebmscale.buffer.shardfile)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ebmscale.buffer import shardfile
from ebmscale.buffer.replay import ReplayBuffer


def _save(tmp_path, caps, num_classes=0, storage="fp32"):
    """Shards whose chains carry their global index (in shard order) as their value."""
    files, start = {}, 0
    for k, cap in enumerate(caps):
        buf = ReplayBuffer(cap, (3,), (0.0, 1e6), storage=storage, num_classes=num_classes, seed=k)
        buf.data[:] = (start + np.arange(cap, dtype=np.float32))[:, None]
        files.update(shardfile.write_shard(str(tmp_path), k, buf))
        start += cap
    return files


@pytest.mark.parametrize("old,new", [([5, 5], 2), ([7, 6, 6], 2), ([10, 10], 3), ([4, 4, 3], 5), ([9], 4)])
def test_resplit_keeps_every_chain_once_in_order(tmp_path, old, new):
    files = _save(tmp_path, old)
    assert shardfile.saved_shards(files) == list(range(len(old)))
    caps, plans = shardfile.plan_load(old, new)
    assert sum(caps) == sum(old) and max(caps) - min(caps) <= 1
    if new == len(old):
        assert plans == [[(k, 0, c)] for k, c in enumerate(old)]  # same layout: shard k reads file k
    states = [shardfile.load_state(str(tmp_path), parts, k % len(old)) for k, parts in enumerate(plans)]
    pooled = np.concatenate([s["data"][:, 0] for s in states])
    assert np.array_equal(pooled, np.arange(sum(old), dtype=np.float32))


def test_round_trip_restores_a_replay_buffer_exactly(tmp_path):
    buf = ReplayBuffer(12, (2, 2), (0.0, 1.0), storage="uint8", num_classes=3, seed=7)
    buf.sample(5)  # move the RNG
    buf.age[:] = np.arange(12) * 20  # chain ages (sampler steps) travel with the chains
    entries = shardfile.write_shard(str(tmp_path), 0, buf)
    assert set(entries) == {"buffer/shard-00000.npy", "buffer/shard-00000.labels.npy", "buffer/shard-00000.age.npy",
                            "buffer/shard-00000.json"}
    for name, e in entries.items():
        shardfile.verify(str(tmp_path), name, e)
    other = ReplayBuffer(12, (2, 2), (0.0, 1.0), storage="uint8", num_classes=3, seed=99)
    other.load_state_dict(shardfile.load_state(str(tmp_path), [(0, 0, 12)], 0))
    assert other.data.dtype == np.uint8 and np.array_equal(other.data, buf.data)
    assert np.array_equal(other.labels, buf.labels) and np.array_equal(other.age, buf.age)
    assert np.array_equal(other.sample(4)[1], buf.sample(4)[1])  # the same RNG state


def test_ages_follow_their_chains_through_a_resplit_and_old_files_load_as_fresh(tmp_path):
    files, start = {}, 0
    for k, cap in enumerate([5, 7]):
        buf = ReplayBuffer(cap, (3,), (0.0, 1e6), seed=k)
        buf.data[:] = (start + np.arange(cap, dtype=np.float32))[:, None]
        buf.age[:] = 10 * (start + np.arange(cap))
        files.update(shardfile.write_shard(str(tmp_path), k, buf))
        start += cap
    caps, plans = shardfile.plan_load([5, 7], 3)
    states = [shardfile.load_state(str(tmp_path), parts, k % 2) for k, parts in enumerate(plans)]
    for s in states:  # each chain keeps its own age, whichever new shard it lands in
        assert np.array_equal(s["age"], 10 * s["data"][:, 0].astype(np.int64))
    # A checkpoint written before ages were kept: no age file, no "age" in the meta.
    meta_path = tmp_path / "buffer" / "shard-00000.json"
    meta = json.loads(meta_path.read_text())
    del meta["age"]
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "buffer" / "shard-00000.age.npy").unlink()
    old = shardfile.load_state(str(tmp_path), [(0, 0, 5)], 0)
    assert old["age"] is None
    fresh = ReplayBuffer(5, (3,), (0.0, 1e6), seed=0)
    fresh.load_state_dict(old)
    assert np.array_equal(fresh.age, np.zeros(5, np.int64))


def test_damage_is_named(tmp_path):
    files = _save(tmp_path, [6, 6])
    path = tmp_path / "buffer" / "shard-00001.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(shardfile.ShardFileError, match="shard-00001.npy' does not match its recorded SHA-256"):
        shardfile.load_all(str(tmp_path), files)
    path.write_bytes(bytes(raw[:-4]))
    with pytest.raises(shardfile.ShardFileError, match="truncated"):
        shardfile.verify(str(tmp_path), "buffer/shard-00001.npy", files["buffer/shard-00001.npy"])


def test_resplit_that_would_leave_a_class_out_is_refused(tmp_path):
    _save(tmp_path, [4, 4], num_classes=4)
    caps, plans = shardfile.plan_load([4, 4], 4)  # 2 chains per new shard, 4 classes
    with pytest.raises(shardfile.ShardFileError, match="no chain of class .*fewer buffer.shards"):
        shardfile.load_state(str(tmp_path), plans[0], 0)
