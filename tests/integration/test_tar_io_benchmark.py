"""benchmarks/tar_io.py at toy size: every reader reads every sample, every writer's shards read back
to the same members (the script checks both and exits non-zero otherwise), one row per op and
implementation, and the JSON last line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "tar_io.py")


def test_tar_io_benchmark_runs_tiny():
    proc = subprocess.run([sys.executable, SCRIPT, "--shards", "2", "--samples", "10", "--repeats", "1",
                           "--formats", "png"], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("| op | members | impl |")
    report = json.loads(lines[-1])
    assert report["benchmark"] == "tar_io" and report["cpu"]
    rows = report["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {(op, impl) for op in ("read", "write")
                                                    for impl in ("hand", "tarfile", "webdataset")}
    for r in rows:
        assert (r["samples"], r["members"]) == (20, 40), r
        assert r["samples_per_s"] > 0 and r["mb_per_s"] > 0, r
