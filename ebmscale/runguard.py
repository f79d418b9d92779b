"""One writer per run directory, and no rank outliving its launcher.

* :class:`RunLock` -- the training process of rank 0 holds ``<run_dir>/run.lock`` for the whole
  run. The lock is an exclusive ``flock`` on that file, taken with ``filelock``'s
  ``UnixFileLock`` (the kernel drops it when the holder dies, however it dies: a SIGKILLed run
  leaves no live lock behind; no soft-lock fallback, see below), and the file records the holder
  (host, pid, process start time, when it started) so that a second run on the same directory is
  refused with one line naming it. A record left by a killed run is reported and taken over, so
  ``--resume auto`` after a crash just works.

  Across hosts (a run directory on NFS or Lustre): ``flock`` goes through the filesystem's lock
  service (NFSv4 byte-range locks, Lustre mounted with ``-o flock``), so a run on another node is
  refused too, and a holder whose node died is released when the server's lease expires (NFSv4:
  about 90 s). Where the filesystem has no lock service (``flock`` fails with ENOLCK/EOPNOTSUPP),
  the record alone decides: a holder on this host whose process is gone (or whose pid now belongs
  to a process started later) is stale and taken over; a holder on another host cannot be checked
  from here, so the run is refused and the message names the file to delete once that run is known
  to be gone.

* :func:`watch_parent` -- a rank started by a launcher (torchrun, ``accelerate launch``: the ranks
  are children of the launcher process, each in a session of its own, so a SIGKILL of the launcher
  reaches none of them) exits within a few seconds of its launcher's death instead of training on
  unsupervised. A daemon thread polls the parent pid; a change means the launcher is gone (the
  rank was re-parented to init or a subreaper). Polling rather than ``PR_SET_PDEATHSIG`` because
  the latter fires when the *thread* that forked the rank exits, and because it is lost if the
  launcher died before the rank set it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from typing import Iterator

from filelock import Timeout, UnixFileLock

from ebmscale.config import ConfigError

LOCK_FILE = "run.lock"
EXIT_LAUNCHER_GONE = 1
_NO_LOCK_SERVICE = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirBusy(ConfigError):
    """The run directory is held by another live training process; the message names it (bad
    input: the CLI prints it as one line and exits 2)."""


def process_start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), or
    None when there is no such process: a pid plus its start time names a process uniquely, even
    after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def describe(rec: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec.get("time", 0)))
    return f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')} (since {since})"


def _alive_here(rec: dict) -> bool:
    """Whether the holder ``rec`` (a record written on this host) is still running."""
    try:
        pid = int(rec["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    ticks = process_start_ticks(pid)
    return ticks is not None and (rec.get("start_ticks") is None or ticks == rec["start_ticks"])


class RunLock:
    """The exclusive lock of one run directory (see the module docstring). ``acquire()`` raises
    :class:`RunDirBusy` naming the holder; ``release()`` frees it; a lock taken twice in one process
    (``train()`` called again on the same directory) is shared, not refused."""

    _held: dict[str, "RunLock"] = {}  # realpath -> this process's lock on it

    def __init__(self, run_dir: str):
        self.run_dir = os.path.realpath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self.fd: int | None = None  # where the record is written (and emptied on release)
        self.flock: UnixFileLock | None = None
        self.taken_over: dict | None = None  # the stale record replaced, if any
        self.uses = 0

    @classmethod
    def acquire(cls, run_dir: str) -> "RunLock":
        key = os.path.realpath(run_dir)
        lock = cls._held.get(key)
        if lock is None:
            lock = cls(run_dir)
            lock._take()
            cls._held[key] = lock
        lock.uses += 1
        return lock

    def record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": process_start_ticks(os.getpid()),
                "time": time.time(), "argv": sys.argv[:8]}

    def _read(self, fd: int) -> dict | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        try:
            rec = json.loads(raw) if raw.strip() else None
        except ValueError:
            rec = None
        return rec if isinstance(rec, dict) else None

    def _take(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        # Non-blocking, one process-wide hold, the file kept on release (it is the record); no soft
        # fallback: filelock's marker files outlive a SIGKILLed holder, the record check below does not.
        flock = UnixFileLock(self.path, timeout=0, blocking=False, thread_local=False, fallback_to_soft=False,
                             preserve_lock_file=True)
        try:
            flock.acquire()
        except Timeout:
            rec = self._read_path()
            who = describe(rec) if rec else "another process (it is starting up)"
            raise RunDirBusy(f"run directory '{self.run_dir}' is in use by {who}; stop that run first or "
                             f"choose another --run-dir") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCK_SERVICE:
                raise
            flock = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # A record left behind by a run that died holding the lock, or (no lock service) the
            # record alone decides.
            previous = self._read(fd) if flock is not None else self._check_record_only(fd)
            if previous and previous.get("pid") is not None:
                self.taken_over = previous
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(self.record()).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            if flock is not None:
                flock.release()
            raise
        self.fd, self.flock = fd, flock

    def _read_path(self) -> dict | None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            return self._read(fd)
        finally:
            os.close(fd)

    def _check_record_only(self, fd: int) -> dict | None:
        """No lock service on this filesystem: the record decides (see the module docstring)."""
        rec = self._read(fd)
        if not rec:
            return None
        if rec.get("host") == socket.gethostname():
            if _alive_here(rec):
                raise RunDirBusy(f"run directory '{self.run_dir}' is in use by {describe(rec)}; stop that run "
                                 "first or choose another --run-dir")
            return rec
        raise RunDirBusy(f"run directory '{self.run_dir}' is in use by {describe(rec)} (this filesystem has no "
                         f"file locks, so that host's process cannot be checked from here); once that run is gone, "
                         f"delete '{self.path}'")

    def release(self) -> None:
        """Give the lock up (the last of this process's uses): the record is emptied first, so a
        reader never sees a free lock that names a holder."""
        self.uses -= 1
        if self.uses > 0 or self.fd is None:
            return
        RunLock._held.pop(self.run_dir, None)
        fd, self.fd, flock, self.flock = self.fd, None, self.flock, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)
            if flock is not None:
                flock.release()


def launched_rank() -> bool:
    """Whether this process is a rank started by a launcher (torchrun / ``accelerate launch``
    set TORCHELASTIC_RUN_ID, torch.distributed.launch sets LOCAL_RANK): only then is a dead
    parent a dead launcher. A plain ``ebmscale train`` keeps running when its shell goes away."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("LOCAL_RANK"))


_watcher: threading.Thread | None = None


def watch_parent(interval_s: float = 2.0) -> threading.Thread | None:
    """Start (once per process) a daemon thread that ends this process when its parent (the
    launcher) dies: one line on stderr, then ``os._exit(1)`` -- immediately, even while the main
    thread waits in a collective that will never complete. Children started with Ray's fate
    sharing (the embedded Ray) and DataLoader workers follow their own parent's death. Returns the
    thread, or None when one is already running."""
    global _watcher
    if _watcher is not None and _watcher.is_alive():
        return None
    parent = os.getppid()

    def gone(old: int) -> None:
        print(f"ebmscale: error: the launcher (pid {old}) of this rank (pid {os.getpid()}) has gone; stopping",
              file=sys.stderr, flush=True)
        os._exit(EXIT_LAUNCHER_GONE)

    def loop() -> None:
        while True:
            if os.getppid() != parent:
                gone(parent)
                return
            time.sleep(interval_s)

    _watcher = threading.Thread(target=loop, name="ebmscale-parent-watch", daemon=True)
    _watcher.start()
    return _watcher


@contextlib.contextmanager
def guard(run_dir: str, main: bool) -> Iterator[None]:
    """What ``train()`` runs inside: the parent watch on a launched rank, and on the main rank
    (``main``) the run directory's lock (a note on stderr when it replaces a killed run's)."""
    if launched_rank():
        watch_parent()
    lock = RunLock.acquire(run_dir) if main else None
    if lock is not None and lock.taken_over:
        print(f"ebmscale: taking over the run directory lock of {describe(lock.taken_over)}, which is gone",
              file=sys.stderr, flush=True)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
