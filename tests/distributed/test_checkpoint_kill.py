"""Checkpoints under real processes and real kill signals (1 process, and 2 gloo ranks under
torchrun): kill -9 and resume is bitwise identical to an uninterrupted run; a kill during a save
leaves the previous checkpoint loadable; resuming on a different number of processes works; an
injected NaN rolls back across both ranks and training continues.

The kill lands at a known point through the test-only faults of ``tests.faults`` (every rank
announces itself on stderr and sleeps); the whole process group then gets SIGKILL.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from ebmscale.checkpoint import StepCheckpoint, find_resume, list_checkpoints, step_dir
from tests.distributed.dp_scenarios import REPO, _free_port

pytestmark = pytest.mark.slow

TOY = ["--config", "configs/toy_8gaussians.yaml", "model.width=16", "model.depth=2", "data.batch_size=16",
       "buffer.capacity=64", "data.toy_train_size=1000", "sampler.steps=3", "train.log_every=2",
       "train.checkpoint_every=4", "train.sample_every=0", "train.threads=1", "train.progress=false",
       "train.tensorboard=false", "optim.ema=0.9", "buffer.backend=local"]
N = 10


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               **extra)
    return env


def _start(run_dir, nproc: int, *args: str, faults: tuple[str, ...] = ()) -> subprocess.Popen:
    """The CLI, through ``tests.faults`` when ``faults`` (its options, e.g. ``--hang step:6``) are given."""
    entry = ["-m", "tests.faults", *faults, "--"] if faults else ["-m", "ebmscale.cli"]
    cli = [*entry, "train", "--run-dir", str(run_dir), *TOY, *args]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                      "--master_port", str(_free_port())]
    # A session of its own for the launcher (torchrun puts every rank in a session of its own too:
    # see _kill_tree).
    return subprocess.Popen([sys.executable, *launcher, *cli], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(run_dir, nproc: int, *args: str, faults: tuple[str, ...] = ()) -> str:
    proc = _start(run_dir, nproc, *args, faults=faults)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out + err)[-4000:]
    return out


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_tree(pid: int) -> None:
    """kill -9 the launcher and every rank at once, as a preempted node would. A killpg of the
    launcher's group is not enough: torchrun starts each rank in a session of its own, and ranks
    left behind would sleep on as orphans."""
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_and_kill(run_dir, nproc: int, hang: str, *args: str) -> None:
    """Start a run, wait until every rank sits at ``hang`` (e.g. 'step:6'), then kill -9 them all."""
    proc = _start(run_dir, nproc, *args, faults=("--hang", hang))
    log: list[str] = []
    # Count announcements in everything read so far: two ranks writing at once can share a line.
    while "".join(log).count(f"test hang ({hang})") < nproc:
        line = proc.stderr.readline()
        if not line:  # the run ended without reaching the hang point
            proc.wait(timeout=60)
            pytest.fail("run ended before the kill point:\n" + "".join(log)[-4000:] + proc.stdout.read()[-2000:])
        log.append(line)
    _kill_tree(proc.pid)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()


def state(run_dir) -> tuple[dict, list[dict]]:
    """(shared state, every rank's state) of the run's newest complete checkpoint."""
    ck = StepCheckpoint(find_resume(str(run_dir)))
    return ck.read("shared.pt"), [ck.read(f"rank-{r:05d}.pt") for r in range(ck.world)]


def assert_bitwise_equal(run_a, run_b) -> None:
    (sa, ra), (sb, rb) = state(run_a), state(run_b)
    assert sa["step"] == sb["step"] == N
    for part in ("model", "ema"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), (part, k)
    for k, v in sa["optimizer"]["state"].items():
        assert all(torch.equal(t, sb["optimizer"]["state"][k][n]) for n, t in v.items()), k
    assert len(ra) == len(rb)
    for a, b in zip(ra, rb):
        assert torch.equal(a["buffer"]["data"], b["buffer"]["data"])
        assert a["stream"] == b["stream"] and torch.equal(a["torch_rng"], b["torch_rng"])


_STRAIGHT: dict = {}


def straight(tmp_path_factory, nproc: int):
    """N steps without interruption (computed once per process count)."""
    if nproc not in _STRAIGHT:
        run_dir = tmp_path_factory.mktemp(f"straight{nproc}") / "run"
        run(run_dir, nproc, f"train.steps={N}")
        _STRAIGHT[nproc] = run_dir
    return _STRAIGHT[nproc]


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_9_then_resume_is_bitwise_identical(tmp_path, tmp_path_factory, nproc):
    run_dir = tmp_path / "run"
    run_and_kill(run_dir, nproc, "step:6", f"train.steps={N}")  # steps 5 and 6 are lost with the process
    assert find_resume(str(run_dir)) == step_dir(str(run_dir), 4)
    out = run(run_dir, nproc, f"train.steps={N}", "--resume", "auto")
    assert f"resumed from {step_dir(str(run_dir), 4)} at step 4" in out
    assert_bitwise_equal(run_dir, straight(tmp_path_factory, nproc))
    with open(run_dir / "metrics.jsonl") as fh:  # step 6 was logged before the kill, and again after
        assert [json.loads(line)["step"] for line in fh] == [2, 4, 6, 6, 8, 10]


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, tmp_path_factory):
    run_dir = tmp_path / "run"
    run_and_kill(run_dir, 1, "save:8", f"train.steps={N}")
    # Every file of step 8 is on disk, but not the marker: the directory does not count.
    assert sorted(os.listdir(step_dir(str(run_dir), 8))) == ["rank-00000.pt", "shared.pt"]
    assert [(s, done) for s, _, done in list_checkpoints(str(run_dir))] == [(0, True), (4, True), (8, False)]
    out = run(run_dir, 1, f"train.steps={N}", "--resume", "auto")
    assert f"resumed from {step_dir(str(run_dir), 4)} at step 4" in out
    assert_bitwise_equal(run_dir, straight(tmp_path_factory, 1))


def test_resume_on_a_different_number_of_processes_and_rollback_on_two(tmp_path):
    run_dir = tmp_path / "run"
    run(run_dir, 1, "train.steps=4")
    # 1 -> 2 processes; rank 0's loss turns NaN at step 7: both ranks roll back to the newest
    # checkpoint, step 4 (written by the one process, so it is re-sharded again).
    out = run(run_dir, 2, "train.steps=8", "--resume", "auto", faults=("--nan-at", "7"))
    assert "training diverged at step 6: loss=nan on some rank" in out
    assert f"rollback 1/3 from step 6 to {step_dir(str(run_dir), 4)}" in out
    shared, ranks = state(run_dir)
    assert shared["step"] == 8 and shared["counters"]["rollbacks"] == 1 and shared["counters"]["lr_scale"] == 0.5
    # The 64 chains of the one old rank were dealt out, 32 each; the data restarted at the next
    # epoch (the old rank had read 4 x 16 samples of epoch 0): 4 batches into epoch 1 at step 8.
    assert [len(r["buffer"]["data"]) for r in ranks] == [32, 32]
    assert [(r["stream"]["epoch"], r["stream"]["position"], r["stream"]["world"]) for r in ranks] == [(1, 64, 2)] * 2
    # 2 -> 1 process: the 64 chains are gathered again; epoch 1 was begun, so epoch 2.
    run(run_dir, 1, "train.steps=12", "--resume", "auto")
    shared, ranks = state(run_dir)
    assert shared["step"] == 12 and len(ranks) == 1 and len(ranks[0]["buffer"]["data"]) == 64
    assert (ranks[0]["stream"]["epoch"], ranks[0]["stream"]["position"]) == (2, 64)
    with open(run_dir / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["step"] for r in rows] == [2, 4, 6, 6, 8, 10, 12]
    assert [r["rollbacks"] for r in rows] == [0, 0, 0, 1, 1, 1, 1] and np.isfinite(rows[-1]["loss"])
