"""Checkpointing the Ray-hosted global buffer: save and load time, and rank 0's peak memory,
against the buffer's size -- sharded (each shard actor writes and reads its own files; what
``Trainer.save`` does) against gathered (every shard pulled into rank 0 and written as one
``torch.save`` file; the format before sharded checkpoints).

Each configuration runs in a fresh process (it is rank 0: the driver of a fresh embedded Ray), so
its peak RSS (``ru_maxrss``) is its own; ``+peak`` is how much the save and load raised that peak
(peak after them minus peak before them).

    .venv/bin/python benchmarks/buffer_checkpoint.py [--chains 2048 8192 32768] [--shards 2 4]
        [--shape 3 64 64] [--storage uint8] [--modes sharded gathered]

Prints a Markdown table and, as its last line, one JSON object with all figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one(chains: int, shards: int, shape: list[int], storage: str, mode: str, out_dir: str) -> dict:
    """One configuration in this process; returns its figures."""
    import numpy as np
    import torch  # noqa: F401 - a training rank 0 has torch loaded: same baseline for both modes

    from ebmscale.buffer.client import as_numpy
    from ebmscale.buffer.ray_host import RayBuffer, start_embedded
    from ebmscale.checkpoint import StepCheckpoint, write_file
    from ebmscale.config import load_config

    session = start_embedded("bench", temp_dir=tempfile.mkdtemp(prefix="ebr", dir="/tmp"))
    b = load_config(None, ["buffer.backend=ray", f"buffer.capacity={chains}", f"buffer.shards={shards}",
                           f"buffer.storage={storage}", "data.batch_size=1"]).buffer
    c = RayBuffer(b, tuple(shape), (0.0, 1.0), 0, 0, 1, shard_seed=lambda k: k)
    step = os.path.join(out_dir, "step-1")
    os.makedirs(step)
    try:
        peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        if mode == "sharded":
            entries = c.save_shards(step)
        else:
            entries = {"buffer.pt": write_file(os.path.join(step, "buffer.pt"), as_numpy(c.state_dict()))}
        t1 = time.perf_counter()
        nbytes = sum(e["bytes"] for e in entries.values())
        if mode == "sharded":
            assert c.verify_saved(step, entries) is None
            c.load_state_dict({"sharded": step, "files": entries})
        else:
            with open(os.path.join(step, "COMPLETE"), "w") as fh:
                json.dump({"step": 1, "world": 1, "files": entries}, fh)
            c.load_state_dict(as_numpy(StepCheckpoint(step).read("buffer.pt")))
        t2 = time.perf_counter()
        c.draw(4, None, np.random.default_rng(0))  # the shards are alive and loaded
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"mode": mode, "chains": chains, "shards": shards, "mb": nbytes / 1e6, "save_s": t1 - t0,
                "load_s": t2 - t1, "rank0_peak_mib": peak, "rank0_growth_mib": peak - peak0}
    finally:
        c.close()
        session.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    p.add_argument("--shape", type=int, nargs="+", default=[3, 64, 64])
    p.add_argument("--storage", default="uint8", choices=("fp32", "fp16", "uint8"))
    p.add_argument("--modes", nargs="+", default=["sharded", "gathered"], choices=("sharded", "gathered"))
    p.add_argument("--one", nargs=4, metavar=("CHAINS", "SHARDS", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        chains, shards, mode, out = args.one
        print(json.dumps(one(int(chains), int(shards), args.shape, args.storage, mode, out)))
        return
    from benchmarks._report import print_report

    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    for chains in args.chains:
        for shards in args.shards:
            for mode in args.modes:
                out = tempfile.mkdtemp(prefix="ebmscale-ckbench-")
                try:
                    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", str(chains), str(shards),
                                           mode, out, "--shape", *map(str, args.shape), "--storage", args.storage],
                                          env=env, capture_output=True, text=True, timeout=1800)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                if proc.returncode:
                    sys.exit(f"configuration {chains} chains / {shards} shards / {mode} failed:\n{proc.stderr[-3000:]}")
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(rows[-1], file=sys.stderr, flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print_report(rows, [("mode", lambda r: r["mode"]), ("chains", lambda r: f"{r['chains']:,}"),
                        ("shards", lambda r: str(r["shards"])), ("MB on disk", lambda r: f"{r['mb']:.0f}"),
                        ("save s", lambda r: f"{r['save_s']:.2f}"), ("load s", lambda r: f"{r['load_s']:.2f}"),
                        ("rank 0 peak RSS MiB", lambda r: f"{r['rank0_peak_mib']:.0f}"),
                        ("rank 0 +peak MiB", lambda r: f"{r['rank0_growth_mib']:.0f}")],
                 meta={"cpu": cpu, "cores": os.cpu_count(), "shape": args.shape, "storage": args.storage})


if __name__ == "__main__":
    main()
