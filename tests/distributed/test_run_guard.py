"""One writer per run directory, and ranks that stop with their launcher, under real processes
and real SIGKILLs (ebmscale.runguard).

* a second ``ebmscale train`` on a directory in use is refused with one line naming the holder
  (exit 2); after the first is killed with SIGKILL, ``--resume auto`` takes the lock over;
* SIGKILL of the ``accelerate launch`` process alone (not its ranks) stops both ranks within
  30 s, and the run then resumes on the same directory from its last complete checkpoint;
* without a lock service on the filesystem, the lock record alone decides (same host: the
  holder's pid and start time; another host: refused).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ebmscale import runguard
from ebmscale.checkpoint import find_resume, step_dir
from tests.distributed.dp_scenarios import REPO, _free_port
from tests.distributed.test_checkpoint_kill import TOY, _descendants, _env

pytestmark = pytest.mark.slow


def _holder(run_dir) -> subprocess.Popen:
    """A process that holds the run directory's lock until killed."""
    code = ("import sys, time; from ebmscale.runguard import RunLock; RunLock.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_live_holder_and_takes_over_a_killed_one(tmp_path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        with pytest.raises(runguard.RunDirBusy, match=f"in use by pid {holder.pid} on host "):
            runguard.RunLock.acquire(str(run_dir))
    finally:
        holder.kill()
        holder.wait()
    lock = runguard.RunLock.acquire(str(run_dir))  # the kernel dropped the dead holder's flock
    try:
        assert lock.taken_over["pid"] == holder.pid
        assert json.loads((run_dir / runguard.LOCK_FILE).read_text())["pid"] == os.getpid()
        assert runguard.RunLock.acquire(str(run_dir)) is lock  # the same process again: shared
        lock.release()
    finally:
        lock.release()
    assert (run_dir / runguard.LOCK_FILE).read_text() == ""  # released: no holder named


def test_record_decides_where_the_filesystem_has_no_locks(tmp_path, monkeypatch):
    def no_lock_service(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_lock_service)  # what filelock's UnixFileLock calls
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = run_dir / runguard.LOCK_FILE
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        record.write_text(json.dumps({"host": runguard.socket.gethostname(), "pid": live.pid, "time": 0,
                                      "start_ticks": runguard.process_start_ticks(live.pid)}))
        with pytest.raises(runguard.RunDirBusy, match=f"pid {live.pid}"):
            runguard.RunLock.acquire(str(run_dir))
        # The same pid with another start time is a reused pid: the recorded process is gone.
        record.write_text(json.dumps({"host": runguard.socket.gethostname(), "pid": live.pid, "time": 0,
                                      "start_ticks": runguard.process_start_ticks(live.pid) - 1}))
        runguard.RunLock.acquire(str(run_dir)).release()
    finally:
        live.kill()
        live.wait()
    record.write_text(json.dumps({"host": "node-elsewhere", "pid": 1234, "time": 0}))
    with pytest.raises(runguard.RunDirBusy, match="node-elsewhere.*delete '.*run.lock'"):
        runguard.RunLock.acquire(str(run_dir))


def _start(run_dir, launcher: str, *args: str, faults: tuple[str, ...] = ()) -> subprocess.Popen:
    """The CLI, through the test-only ``tests.faults`` when ``faults`` (e.g. ``--hang step:6``) are given."""
    entry = ["-m", "tests.faults", *faults] if faults else ["-m", "ebmscale.cli"]
    cli = [*entry, "train", "--run-dir", str(run_dir), *TOY, *args]
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(REPO, "launch", "accelerate", "cpu_gloo.yaml"), "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(_free_port()), *cli]
    else:
        cmd = [sys.executable, *cli]
    return subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(proc: subprocess.Popen, text: str, count: int) -> str:
    log = ""
    while log.count(text) < count:
        line = proc.stderr.readline()
        if not line:
            proc.wait(timeout=60)
            pytest.fail(f"run ended before '{text}':\n{log[-4000:]}")
        log += line
    return log


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a re-parented rank may wait unreaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_second_run_refused_then_resume_after_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    first = _start(run_dir, "single", "train.steps=10", faults=("--hang", "step:6"))
    try:
        _wait_for(first, "test hang (step:6)", 1)
        second = subprocess.run([sys.executable, "-m", "ebmscale.cli", "train", "--run-dir", str(run_dir), *TOY,
                                 "train.steps=10", "--resume", "auto"], env=_env(), cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = second.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("ebmscale: error: run directory ")
        assert f"in use by pid {first.pid} on host " in errors[0]
    finally:
        first.kill()  # SIGKILL: the lock file still names it, the flock is gone
        first.wait()
    third = subprocess.run([sys.executable, "-m", "ebmscale.cli", "train", "--run-dir", str(run_dir), *TOY,
                            "train.steps=10", "--resume", "auto"], env=_env(), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the run directory lock of pid {first.pid}" in third.stderr
    assert f"resumed from {step_dir(str(run_dir), 4)} at step 4" in third.stdout
    assert find_resume(str(run_dir)) == step_dir(str(run_dir), 10)


def test_killing_accelerate_launch_stops_its_ranks(tmp_path):
    run_dir = tmp_path / "run"
    launcher = _start(run_dir, "accelerate", "train.steps=10", faults=("--hang", "step:6"))
    ranks: list[int] = []
    try:
        _wait_for(launcher, "test hang (step:6)", 2)
        ranks = _descendants(launcher.pid)
        assert len(ranks) >= 2
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher only: each rank sits in a session of its own
        launcher.wait(timeout=60)
        t0 = time.monotonic()
        while any(_alive(p) for p in ranks) and time.monotonic() - t0 < 30:
            time.sleep(0.5)
        left = [p for p in ranks if _alive(p)]
        assert not left, f"ranks {left} outlived their launcher by 30 s"
        assert "the launcher (pid" in launcher.stderr.read()
    finally:
        for p in ranks:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    # The lock died with rank 0: a new launch resumes from the last complete checkpoint.
    resumed = _start(run_dir, "accelerate", "train.steps=10", "--resume", "auto")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, (out + err)[-4000:]
    assert f"resumed from {step_dir(str(run_dir), 4)} at step 4" in out
    assert find_resume(str(run_dir)) == step_dir(str(run_dir), 10)
