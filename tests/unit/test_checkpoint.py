"""Checkpoints in one process: step directories, marker, keep-k, damaged files and the auto-resume
fallback, exact resume through train(), rollback on an injected NaN, re-sharding helpers, export."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ebmscale import cli
from ebmscale.buffer import ReplayBuffer
from ebmscale.buffer.reshard import reshard_buffer_states
from ebmscale.checkpoint import (MARKER, CheckpointError, StepCheckpoint, find_resume, list_checkpoints,
                                 load_checkpoint, prune, step_dir)
from ebmscale.config import load_config
from ebmscale.data.memory import ArrayStream
from ebmscale.data.reshard import remap_stream_state
from ebmscale.eval.checkpoints import load_energy_model
from ebmscale.trainer import DivergenceError, train
from tests.faults import install

TOY = ["data.dataset=8gaussians", "model.arch=mlp", "model.width=8", "model.depth=2", "data.batch_size=16",
       "buffer.capacity=32", "data.toy_train_size=500", "sampler.steps=2", "sampler.kind=langevin",
       "sampler.step_size=0.1", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=2",
       "train.threads=1", "train.progress=false", "train.tensorboard=false", "train.device=cpu", "optim.ema=0.9",
       "optim.lr=1e-3", "buffer.backend=local"]


def cfg(*extra: str):
    return load_config(None, [*TOY, *extra])


def final_params(run_dir) -> dict:
    return load_checkpoint(str(run_dir))["model"]


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """8 steps without interruption (checkpoints every 2 steps, 3 kept)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(cfg("train.steps=8"), str(run))
    return run


def test_step_directories_marker_and_keep_k(straight):
    # step-0 (written first, to have something to roll back to) and step-2 were pruned.
    assert [(s, done) for s, _, done in list_checkpoints(str(straight))] == [(4, True), (6, True), (8, True)]
    ck = StepCheckpoint(find_resume(str(straight)))
    assert ck.step == 8 and ck.world == 1 and sorted(ck.files) == ["rank-00000.pt", "shared.pt"]
    shared = ck.read("shared.pt")
    assert shared["counters"] == {"rollbacks": 0, "seed": 0, "lr_scale": 1.0} and shared["ema"] is not None
    mine = ck.read("rank-00000.pt")
    assert mine["stream"]["position"] == 8 * 16 and mine["buffer"]["data"].shape == (32, 2)


def test_resume_in_process_is_bitwise_identical(straight, tmp_path):
    run = tmp_path / "run"
    train(cfg("train.steps=8"), str(run), max_steps=5)  # stops at 5: checkpoints at 4 and (final) 5
    assert find_resume(str(run)).endswith("step-5")
    result = train(cfg("train.steps=8"), str(run), resume="auto")
    assert result.steps == 8
    assert_same(final_params(run), final_params(straight))
    assert np.array_equal(load_checkpoint(str(run))["buffer"]["data"], load_checkpoint(str(straight))["buffer"]["data"])


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_files_fail_naming_them_and_auto_falls_back(straight, tmp_path, capsys):
    run = _copy(straight, tmp_path / "run")
    newest = step_dir(str(run), 8)
    shared = os.path.join(newest, "shared.pt")
    with open(shared, "r+b") as fh:
        fh.truncate(os.path.getsize(shared) // 2)
    with pytest.raises(CheckpointError, match=f"'{shared}' is truncated"):
        StepCheckpoint(newest).read("shared.pt")
    # Tampered: same size, one byte changed.
    rank = os.path.join(step_dir(str(run), 6), "rank-00000.pt")
    raw = bytearray(open(rank, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(rank, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match=f"'{rank}' does not match its recorded SHA-256"):
        StepCheckpoint(step_dir(str(run), 6)).read("rank-00000.pt")
    # An interrupted save: a newer directory without its marker is ignored.
    os.makedirs(step_dir(str(run), 10))
    # The CLI with an explicit damaged checkpoint: one line naming the file, exit 2.
    assert cli.main(["train", "--resume", newest, "--run-dir", str(run), *TOY, "train.steps=10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shared in err[0]
    # --resume auto skips step-10 (incomplete), step-8 and step-6 (damaged) and resumes from 4.
    result = train(cfg("train.steps=8"), str(run), resume="auto")
    out = capsys.readouterr()
    assert "resumed from" in out.out and out.out.split("resumed from ")[1].startswith(step_dir(str(run), 4))
    assert shared in out.err and rank in out.err
    assert result.steps == 8
    assert_same(final_params(run), final_params(straight))


def test_prune_removes_stale_incomplete_directories(tmp_path):
    run = str(tmp_path)
    for step, complete in ((1, True), (2, False), (3, True), (4, True), (5, False)):
        os.makedirs(step_dir(run, step))
        if complete:
            json.dump({"step": step, "world": 1, "files": {}}, open(os.path.join(step_dir(run, step), MARKER), "w"))
    prune(run, keep=2)
    # step-5 may be a save in progress (newer than every complete one): kept.
    assert [(s, c) for s, _, c in list_checkpoints(run)] == [(3, True), (4, True), (5, False)]


def test_injected_nan_rolls_back_and_training_continues(tmp_path, monkeypatch):
    install(monkeypatch.setattr, nan_at=7)
    run = tmp_path / "run"
    result = train(cfg("train.steps=8", "train.rollback_lr_factor=0.25"), str(run))
    assert result.steps == 8
    m = metrics(run)
    # Steps 5 and 6 ran, step 7 diverged, back to the checkpoint at step 6, steps 7 and 8 again.
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["rollbacks"] for r in m] == [0] * 6 + [1, 1]
    assert m[5]["lr"] == pytest.approx(1e-3) and m[-1]["lr"] == pytest.approx(0.25e-3)
    counters = load_checkpoint(str(run))["counters"]
    assert counters["rollbacks"] == 1 and counters["lr_scale"] == 0.25 and counters["seed"] != 0
    # Reproducible: the same run again gives the same weights.
    again = tmp_path / "again"
    train(cfg("train.steps=8", "train.rollback_lr_factor=0.25"), str(again))
    assert_same(final_params(run), final_params(again))


def test_gives_up_after_rollback_max(tmp_path, monkeypatch):
    install(monkeypatch.setattr, nan_at=3, nan_repeats=5)
    c = cfg("train.steps=6", "train.rollback_max=2")
    with pytest.raises(DivergenceError, match=r"diverged at step 2: loss=nan.*gave up after 2 rollback\(s\) "
                                              r"\(train.rollback_max\)"):
        train(c, str(tmp_path / "run"))


def test_rollback_off_stops_at_once(tmp_path, monkeypatch):
    install(monkeypatch.setattr, nan_at=3)
    c = cfg("train.steps=6", "train.rollback_max=0")
    with pytest.raises(DivergenceError, match=r"gave up after 0 rollback"):
        train(c, str(tmp_path / "run"))
    assert [s for s, _, _ in list_checkpoints(str(tmp_path / "run"))] == [2]  # rollback off: no step-0 one


def test_export_ema_weights_as_safetensors(straight, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert cli.main(["export", "--run", str(straight), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["weights"] == "ema" and summary["step"] == 8
    assert (tmp_path / "model.yaml").read_text().startswith("data:")
    c, model, state = load_energy_model(str(out))
    assert c.model.arch == "mlp" and state["step"] == 8
    ema = load_checkpoint(str(straight))["ema"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    _, from_run, _ = load_energy_model(str(straight))
    x = torch.randn(5, 2)
    assert torch.equal(model(x), from_run(x))
    out.write_bytes(out.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(out)):
        load_energy_model(str(out))


# --------------------------------------------------------------------------- re-sharding helpers

def _buffer_states(world: int, capacity: int, num_classes: int = 0) -> list[dict]:
    states = []
    for r in range(world):
        b = ReplayBuffer(capacity, (2,), (-1.0, 1.0), num_classes=num_classes, seed=r)
        states.append(b.state_dict())
    return states


def _rows(data: np.ndarray) -> list:
    return sorted(map(tuple, data.tolist()))


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (3, 2)])
def test_buffer_reshard_keeps_every_chain(old, new):
    states = _buffer_states(old, 12)
    parts = [reshard_buffer_states(states, new, r) for r in range(new)]
    assert _rows(np.concatenate([p["data"] for p in parts])) == _rows(np.concatenate([s["data"] for s in states]))
    assert all(abs(len(p["data"]) - 12 * old / new) < 1 for p in parts)
    for r, p in enumerate(parts):
        b = ReplayBuffer(12, (2,), (-1.0, 1.0))
        b.load_state_dict(p)
        assert len(b) == len(p["data"]) and b.rng.bit_generator.state == states[r % old]["rng"]


def test_buffer_reshard_labelled_gives_every_rank_every_class():
    states = _buffer_states(1, 40, num_classes=4)
    for r in range(2):
        p = reshard_buffer_states(states, 2, r)
        b = ReplayBuffer(40, (2,), (-1.0, 1.0), num_classes=4)
        b.load_state_dict(p)
        x, _, labels, _ = b.sample(8, labels=np.array([0, 1, 2, 3] * 2), rng=np.random.default_rng(0))
        assert (labels == np.array([0, 1, 2, 3] * 2)).all() and len(b) == 20
    with pytest.raises(ValueError, match="3 buffer chains cannot be split across 4 ranks"):
        reshard_buffer_states(_buffer_states(1, 3), 4, 0)


def test_stream_position_maps_to_the_next_epoch():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    old = [ArrayStream(x, None, 8, seed=1, rank=r, world=2) for r in range(2)]
    for s in old:
        for _ in range(3):
            next(s)
    new = ArrayStream(x, None, 8, seed=1, rank=0, world=1)
    state = remap_stream_state([s.state_dict() for s in old], new.state_dict())
    assert (state["epoch"], state["position"], state["world"]) == (1, 0, 1)
    new.load_state_dict(state)
    reference = ArrayStream(x, None, 8, seed=1, rank=0, world=1)
    reference.load_state_dict({"epoch": 1, "position": 0})
    assert torch.equal(next(new)[0], next(reference)[0])
    # Nobody had read from the newest epoch yet: start at that epoch itself.
    fresh = [ArrayStream(x, None, 8, seed=1, rank=r, world=2).state_dict() for r in range(2)]
    assert remap_stream_state(fresh, new.state_dict())["epoch"] == 0


def test_run_dir_of_every_kind_of_checkpoint_path(straight, tmp_path):
    from ebmscale.checkpoint import run_dir_of

    run = str(straight)
    assert run_dir_of(step_dir(run, 8)) == run_dir_of(run) == os.path.abspath(run)
    assert run_dir_of(step_dir(run, 8) + "/") == os.path.abspath(run)
    export = tmp_path / "model.safetensors"
    export.write_bytes(b"")
    assert run_dir_of(str(export)) == str(tmp_path)
