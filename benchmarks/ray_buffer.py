"""What the Ray-hosted global replay buffer costs a training step, and its throughput.

One run, one process, one local Ray instance:

1. Step time: the same CPU training config (default: configs/mnist_pcd.yaml, the default job) is
   trained with ``buffer.backend=local``, ``ray`` and ``ray`` without prefetch, in interleaved
   blocks (local, ray, ray-no-prefetch, local, ...) after a warm-up, so that load on a shared
   machine hits all variants alike. Printed: mean ms per step and the ratio to the in-process
   buffer (target: at most 1.05).
2. Throughput of a Ray client: ``draw`` of a batch (float32 chains delivered to the caller) and
   ``write_back`` (fire-and-forget, then ``flush``; counted in float32 bytes of the chains
   accepted, the wire carries the storage dtype) at the training shape and at CIFAR size (128 x
   3x32x32), for fp32 and uint8 storage. Printed in MB/s (10^6 bytes).

    .venv/bin/python benchmarks/ray_buffer.py [--config configs/mnist_pcd.yaml] [--steps 40] [--blocks 10]
        [--calls 100] [key=value ...]

Prints a Markdown table and, as its last line, one JSON object list with all figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import print_report  # noqa: E402
from ebmscale.buffer.ray_host import RayBuffer, start_embedded  # noqa: E402
from ebmscale.config import load_config  # noqa: E402
from ebmscale.trainer import Trainer  # noqa: E402

VARIANTS = {"local": ["buffer.backend=local"], "ray": ["buffer.backend=ray"],
            "ray, no prefetch": ["buffer.backend=ray", "buffer.prefetch=false"]}


def step_times(config: str, overrides: list[str], steps: int, blocks: int, warmup: int, run_dir: str) -> dict:
    """Mean seconds per training step for each variant, measured in interleaved blocks."""
    trainers = {name: Trainer(load_config(config, [*overrides, *extra]), os.path.join(run_dir, name.replace(" ", "")))
                for name, extra in VARIANTS.items()}
    spent = {name: 0.0 for name in trainers}
    try:
        for tr in trainers.values():
            for _ in range(warmup):
                tr.train_step()
        per_block = max(1, steps // blocks)
        for _ in range(blocks):
            for name, tr in trainers.items():
                t0 = time.perf_counter()
                for _ in range(per_block):
                    tr.train_step()
                spent[name] += time.perf_counter() - t0
    finally:
        for tr in trainers.values():
            tr.buffer.close()
    return {name: s / (per_block * blocks) for name, s in spent.items()}


def throughput(shape: tuple[int, ...], batch: int, storage: str, calls: int) -> tuple[float, float]:
    """(draw MB/s, write-back MB/s) of one client on a 1-shard buffer of 10,000 chains."""
    b = load_config(None, ["buffer.backend=ray", f"buffer.storage={storage}", "buffer.capacity=2000"]).buffer
    client = RayBuffer(b, shape, (-1.0, 1.0), 0, 0, 1, shard_seed=lambda k: k)
    try:
        rng = np.random.default_rng(0)
        x, handle = client.draw(batch, None, rng)  # warm-up
        t0 = time.perf_counter()
        for _ in range(calls):
            x, handle = client.draw(batch, None, rng)
        t_draw = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(calls):
            client.write_back(handle, x)
        client.flush()
        t_write = time.perf_counter() - t0
    finally:
        client.close()
    mb = calls * x.nbytes / 1e6
    return mb / t_draw, mb / t_write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "mnist_pcd.yaml"))
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    p.add_argument("--blocks", type=int, default=10, help="interleaved blocks the timed steps are split into")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--calls", type=int, default=100, help="draw / write-back calls per throughput figure")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    session = start_embedded("ebmscale")  # one Ray for every client below
    rows = []
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            base = [*args.overrides, "train.progress=false", "train.tensorboard=false"]
            times = step_times(args.config, base, args.steps, args.blocks, args.warmup, run_dir)
        for name, t in times.items():
            rows.append({"measurement": f"train step ({name} buffer)", "value": round(t * 1e3, 2), "unit": "ms",
                         "ratio_to_local": round(t / times["local"], 3)})
        cfg = load_config(args.config, args.overrides)
        from ebmscale.data import data_shape

        for shape, batch in ((tuple(data_shape(cfg)), cfg.data.batch_size), ((3, 32, 32), 128)):
            for storage in ("fp32", "uint8"):
                draw, write = throughput(shape, batch, storage, args.calls)
                what = f"{batch}x{'x'.join(map(str, shape))} {storage}"
                rows.append({"measurement": f"draw {what}", "value": round(draw, 1), "unit": "MB/s"})
                rows.append({"measurement": f"write-back {what}", "value": round(write, 1), "unit": "MB/s"})
    finally:
        session.close()
    print_report(rows, [("measurement", lambda r: r["measurement"]), ("value", lambda r: str(r["value"])),
                        ("unit", lambda r: r["unit"]),
                        ("ratio to local", lambda r: str(r.get("ratio_to_local", "")))])


if __name__ == "__main__":
    main()
