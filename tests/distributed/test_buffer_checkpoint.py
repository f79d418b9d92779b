"""Sharded checkpoints of the Ray-hosted buffer on a real local Ray: every shard writes its own
files straight from its actor, the marker lists and hashes them, restore has each shard read its
part (re-split across a different shard count keeping every chain), a crashed shard restarts from
its files, a damaged shard file makes ``--resume auto`` fall back, and rank 0 never gathers the
buffer on the way."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ebmscale.buffer import shardfile
from ebmscale.checkpoint import MARKER, StepCheckpoint, find_resume, load_buffer_state, step_dir
from ebmscale.config import load_config

pytest.importorskip("ray")

from ebmscale.buffer.ray_host import RayBuffer  # noqa: E402
from tests.distributed.test_ray_buffer import TOY, _client, _wait_restarted, ray_session  # noqa: E402,F401


def _numbered(c: RayBuffer) -> np.ndarray:
    """Give every chain its global index (in shard order) as its value; returns those values."""
    state = c.state_dict()
    start = 0
    for s in state["shards"]:
        s["data"][:] = (start + np.arange(len(s["data"]), dtype=np.float32))[:, None]
        start += len(s["data"])
    c.load_state_dict(state)
    return np.arange(start, dtype=np.float32)


def _pooled(c: RayBuffer) -> np.ndarray:
    return np.concatenate([s["data"][:, 0] for s in c.state_dict()["shards"]])


def test_shards_write_their_own_files_and_restore_resplit(ray_session, tmp_path):
    step = str(tmp_path / "step-1")
    c = _client(ray_session, capacity=30, shards=4, reinit_prob=0.0)
    try:
        values = _numbered(c)
        entries = c.save_shards(step)
        assert sorted(entries) == sorted(n for k in range(4) for n in (f"buffer/shard-{k:05d}.npy",
                                                                         f"buffer/shard-{k:05d}.age.npy",
                                                                         f"buffer/shard-{k:05d}.json"))
        pids = {i["pid"] for i in c.shard_info()}
        assert len(pids) == 4 and os.getpid() not in pids  # written by the actors, not by this process
        assert c.verify_saved(step, entries) is None
    finally:
        c.close()
    for shards in (4, 3, 6):  # same count, fewer, more: every chain once, in order
        d = _client(ray_session, capacity=30, shards=shards, reinit_prob=0.0)
        try:
            d.load_state_dict({"sharded": step, "files": entries})
            assert sum(d.capacities) == 30 and len(d.capacities) == shards
            assert np.array_equal(_pooled(d), values)
            x, _ = d.draw(50, None, np.random.default_rng(0))  # draws follow the new sizes
            assert set(np.unique(x[:, 0])) <= set(values)
        finally:
            d.close()


def test_damaged_shard_file_is_named(ray_session, tmp_path):
    step = str(tmp_path / "step-1")
    c = _client(ray_session, capacity=20, shards=2)
    try:
        entries = c.save_shards(step)
        entries["buffer/shard-00001.npy"]["sha256"] = "0" * 64  # what a flipped byte would look like
        assert "shard-00001.npy' does not match its recorded SHA-256" in c.verify_saved(step, entries)
    finally:
        c.close()


def test_restarted_shard_restores_from_its_checkpoint_files(ray_session, tmp_path):
    c = _client(ray_session, capacity=20, shards=2, reinit_prob=0.0)
    try:
        _numbered(c)
        c.save_shards(str(tmp_path / "step-1"))
        saved = c.state_dict()["shards"]
        c._take_snapshot = lambda refs: None  # keep the files as the restore point (state_dict() sets refs)
        x, handle = c.draw(10, None, np.random.default_rng(0))
        c.write_back(handle, np.full_like(x, 5.25))  # after the checkpoint: lost with the shard
        c.flush()
        _wait_restarted(c, 0)
        now = c.state_dict()["shards"]
        assert np.array_equal(now[0]["data"], saved[0]["data"]) and now[0]["rng"] == saved[0]["rng"]
    finally:
        c.close()


def test_training_checkpoints_are_sharded_and_resume_on_another_shard_count(ray_session, tmp_path, monkeypatch):
    import ebmscale.trainer as trainer_module

    def no_gather(self):  # the save path must not pull the buffer into this process
        raise AssertionError("RayBuffer.state_dict() called during a checkpoint")

    monkeypatch.setattr(RayBuffer, "state_dict", no_gather)
    run = str(tmp_path / "run")
    base = [*TOY, "train.checkpoint_every=2", "train.log_every=2", "train.precision=fp32"]
    trainer_module.train(load_config(None, [*base, "buffer.shards=2", "train.steps=4"]), run_dir=run)
    ck = StepCheckpoint(find_resume(run))
    assert ck.step == 4 and not ck.has("buffer.pt")
    assert sorted(shardfile.shard_entries(ck.files)) == sorted(
        f"buffer/shard-{k:05d}{ext}" for k in range(2) for ext in (".json", ".npy", ".age.npy"))
    saved = load_buffer_state(run)["data"]
    assert len(saved) == 64
    # Damage the newest checkpoint's shard: resume falls back to step 2; 2 shards -> 3, 64 chains kept.
    with open(os.path.join(ck.path, "buffer", "shard-00001.npy"), "ab") as fh:
        fh.write(b"x")
    seen = {}

    class Spy(trainer_module.Trainer):
        def load_latest(self, max_step=None):
            path = super().load_latest(max_step)
            seen.update(path=path, capacities=list(self.buffer.capacities))
            return path

    monkeypatch.setattr(trainer_module, "Trainer", Spy)
    res = trainer_module.train(load_config(None, [*base, "buffer.shards=3", "train.steps=6"]), run_dir=run,
                               resume="auto")
    assert res.steps == 6 and seen["path"] == step_dir(run, 2)
    assert seen["capacities"] == [22, 21, 21]
    assert len(load_buffer_state(run)["data"]) == 64
    with open(os.path.join(step_dir(run, 6), MARKER)) as fh:
        assert len(shardfile.shard_entries(json.load(fh)["files"])) == 9  # 3 shards x (.npy, .age.npy, .json)
