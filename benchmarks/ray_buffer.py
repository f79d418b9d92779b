"""What the Ray-hosted global replay buffer costs a training step, and its throughput.

One run, one process, one local Ray instance:

1. Step time: the same CPU training config (default: configs/mnist_pcd.yaml, the default job) is
   trained with ``buffer.backend=local``, ``ray`` and ``ray`` without prefetch, in interleaved
   blocks (local, ray, ray-no-prefetch, local, ...) after a warm-up, so that load on a shared
   machine hits all variants alike. Printed: mean ms per step and the ratio to the in-process
   buffer (target: at most 1.05; ImageNet-shaped: 1.02). ``--imagenet`` trains instead
   configs/igebm_imagenet128.yaml (3x128x128, class-conditional, uint8 storage, batch 16 per rank)
   at the reduced width and sampler steps of ``IMAGENET_CPU`` on fabricated 128x128 shards, so
   that it fits a CPU; ``--no-steps`` skips this part.
2. Throughput of a Ray client: ``draw`` of a batch (float32 chains delivered to the caller) and
   ``write_back`` (queued, then ``flush``; counted in float32 bytes of the chains accepted) at the
   training shape, CIFAR size (128 x 3x32x32) and ImageNet size (32 and 128 x 3x128x128: 6.3 and
   25 MB), for fp32 and uint8 storage, in MB/s (10^6 bytes). On one node the chains pass through
   shared-memory mailboxes (ebmscale.buffer.mailbox). ``--two-nodes`` adds the same across two
   Ray nodes on loopback (``ray.cluster_utils.Cluster``, a head and a worker with their own
   raylets and object stores) at the ImageNet sizes: the client runs on the worker node, the shard
   on the head node, and every chain crosses between the nodes, over the direct TCP link
   (ebmscale.buffer.link) and, for comparison in the same run, by value through the nodes'
   object stores (the link switched off).

    .venv/bin/python benchmarks/ray_buffer.py [--config configs/mnist_pcd.yaml | --imagenet] [--steps 40]
        [--blocks 10] [--calls 100] [--no-steps | --no-throughput] [--two-nodes | --only-two-nodes] [key=value ...]

Prints a Markdown table and, as its last line, one JSON object with the machine's load average and
all figures.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import cpu_name, print_report  # noqa: E402
from ebmscale.buffer import mailbox  # noqa: E402
from ebmscale.buffer.ray_host import RayBuffer, start_embedded  # noqa: E402
from ebmscale.buffer.replay import STORAGE_DTYPES  # noqa: E402
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


# ImageNet 128's recipe cut to fit a CPU: the recipe's data shape, classes, batch and uint8 buffer,
# 4 base filters (not 64), one block per stage and 5 sampler steps (not 50), a smaller buffer.
IMAGENET_CPU = ["model.width=4", "model.depth=1", "sampler.steps=5", "buffer.capacity=1000", "data.num_workers=0",
                "data.holdout=0", "train.precision=fp32"]


def fabricated_imagenet(root: str, n: int = 64) -> list[str]:
    """Overrides that point configs/igebm_imagenet128.yaml at ``n`` random 128x128 images with
    ImageNet's 1000 labels, written as the recipe's webdataset shards under ``root``."""
    from ebmscale.data.sources import load_source
    from ebmscale.data.writer import write_shards

    rng = np.random.default_rng(0)
    npz = os.path.join(root, "in128.npz")
    np.savez(npz, x=rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8), y=rng.integers(0, 1000, n))
    write_shards(load_source("npz", npz), os.path.join(root, "shards128"), shard_size=32)
    return [f"data.path={os.path.join(root, 'shards128')}", f"data.cache_dir={os.path.join(root, 'cache')}"]


def capacity_for(shape: tuple[int, ...], batch: int) -> int:
    """Chains per benchmark shard: 10,000 where they fit in about 400 MB of float32, else fewer
    (at least 8 batches)."""
    return int(min(10000, max(8 * batch, 4e8 // (4 * np.prod(shape)))))


def client_throughput(client: RayBuffer, batch: int, calls: int) -> tuple[float, float]:
    """(draw MB/s, write-back MB/s) of ``client``: ``calls`` draws of ``batch`` chains, then
    ``calls`` write-backs of the last one and a flush."""
    rng = np.random.default_rng(0)
    x, handle = client.draw(batch, None, rng)  # warm-up (mailboxes created, shards touched)
    client.write_back(handle, x)
    client.flush()
    t0 = time.perf_counter()
    for _ in range(calls):
        x, handle = client.draw(batch, None, rng)
    t_draw = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(calls):
        client.write_back(handle, x)
    client.flush()
    t_write = time.perf_counter() - t0
    mb = calls * x.nbytes / 1e6
    return mb / t_draw, mb / t_write


def _buffer_config(shape: tuple[int, ...], batch: int, storage: str, *extra: str):
    return load_config(None, ["buffer.backend=ray", f"buffer.storage={storage}",
                              f"buffer.capacity={capacity_for(shape, batch)}", *extra]).buffer


def throughput(shape: tuple[int, ...], batch: int, storage: str, calls: int) -> tuple[float, float]:
    """(draw MB/s, write-back MB/s) of one client on a 1-shard buffer on its own node."""
    client = RayBuffer(_buffer_config(shape, batch, storage), shape, (-1.0, 1.0), 0, 0, 1, shard_seed=lambda k: k)
    try:
        return client_throughput(client, batch, calls)
    finally:
        client.close()


@contextlib.contextmanager
def loopback_cluster():
    """Two Ray nodes on this host (``ray.cluster_utils.Cluster``: head and worker, each with its
    own raylet and object store), token authentication as ebmscale's; yields (cluster, worker
    node). No other Ray may be connected in this process."""
    import secrets

    import ray
    from ray.cluster_utils import Cluster

    from ebmscale.buffer import ray_host

    with tempfile.TemporaryDirectory(prefix="ebr", dir="/tmp") as tmp:
        token = os.path.join(tmp, "token")
        ray_host.write_token(token, secrets.token_hex(32))
        ray_host.use_token_file(token)
        ray_host._refresh_auth()
        os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")  # the actors import ebmscale
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            worker = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            yield cluster, worker
        finally:
            ray.shutdown()
            cluster.shutdown()


def two_node_throughput(cluster: Any, worker: Any, cases: list[tuple[tuple[int, ...], int, str]],
                        calls: int, direct: bool = True) -> list[tuple[float, float]]:
    """Like :func:`throughput` across the two nodes of :func:`loopback_cluster`: rank 0 (this
    process, head node) creates one shard on its node, rank 1 (an actor pinned to the worker
    node) draws and writes back, so every chain crosses between the nodes: over the direct link
    (``direct``; batches under ebmscale.buffer.mailbox.MIN_BYTES go by value all the same) or
    by value through Ray's object stores (the link switched off, as where none can be set up)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class Rank1:
        def run(self, extra: list, info: dict, shape: tuple, batch: int, storage: str, n: int) -> tuple:
            b = _buffer_config(shape, batch, storage, *extra)
            client = RayBuffer(b, shape, (-1.0, 1.0), 0, 1, 2, shard_seed=lambda k: k, share=lambda o: info)
            try:
                if client.node == client._shard_nodes[0]:
                    raise RuntimeError("rank 1 runs on the shard's node")
                if not direct:
                    client._links.links = {0: False}
                figures = client_throughput(client, batch, n)
                if direct and batch * np.prod(shape) * np.dtype(STORAGE_DTYPES[storage]).itemsize >= mailbox.MIN_BYTES:
                    if not getattr(client._links.links.get(0), "sent", 0):
                        raise RuntimeError("the chains did not go over the direct link")
                return figures
            finally:
                client.close()

    out = []
    for shape, batch, storage in cases:
        shared: dict = {}
        # Two ranks, one shard of capacity x 2 chains: the same shard size as on one node.
        extra = [f"buffer.ray_address={cluster.address}", "buffer.shards=1",
                 f"buffer.capacity={capacity_for(shape, batch) // 2}"]
        rank0 = RayBuffer(_buffer_config(shape, batch, storage, *extra), shape, (-1.0, 1.0), 0, 0, 2,
                          shard_seed=lambda k: k, share=lambda o: shared.setdefault("info", o))
        try:
            rank1 = Rank1.options(scheduling_strategy=NodeAffinitySchedulingStrategy(worker.node_id, soft=False)).remote()
            out.append(ray.get(rank1.run.remote(extra, shared["info"], shape, batch, storage, calls)))
            ray.kill(rank1)
        finally:
            rank0.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "mnist_pcd.yaml"))
    p.add_argument("--imagenet", action="store_true", help="step time of configs/igebm_imagenet128.yaml at "
                   "IMAGENET_CPU's reduced width on fabricated 128x128 shards (overrides --config)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    p.add_argument("--blocks", type=int, default=10, help="interleaved blocks the timed steps are split into")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-steps", action="store_true", help="skip the step-time part")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput part")
    p.add_argument("--calls", type=int, default=100, help="draw / write-back calls per throughput figure")
    p.add_argument("--big-calls", type=int, default=20, help="calls per ImageNet-size figure")
    p.add_argument("--two-nodes", action="store_true", help="also measure throughput across two Ray nodes on loopback")
    p.add_argument("--only-two-nodes", action="store_true", help="--two-nodes alone: no one-node throughput, no steps")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args()
    if args.only_two_nodes:
        args.two_nodes, args.no_steps, cases_one_node = True, True, False
    else:
        cases_one_node = not args.no_throughput
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = os.path.join(ROOT, "configs", "igebm_imagenet128.yaml") if args.imagenet else args.config
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [*(fabricated_imagenet(run_dir) + IMAGENET_CPU if args.imagenet else []), *args.overrides]
        cfg = load_config(config, overrides)
        from ebmscale.data import data_shape

        cases = [(tuple(data_shape(cfg)), cfg.data.batch_size, args.calls), ((3, 32, 32), 128, args.calls),
                 ((3, 128, 128), 32, args.big_calls), ((3, 128, 128), 128, args.big_calls)]
        session = start_embedded("ebmscale") if cases_one_node or not args.no_steps else None  # one Ray for all below
        try:
            if not args.no_steps:
                base = [*overrides, "train.progress=false", "train.tensorboard=false"]
                times = step_times(config, base, args.steps, args.blocks, args.warmup, run_dir)
                for name, t in times.items():
                    rows.append({"measurement": f"train step ({name} buffer)", "value": round(t * 1e3, 2),
                                 "unit": "ms", "ratio_to_local": round(t / times["local"], 3)})
            for shape, batch, calls in (cases if cases_one_node else []):
                for storage in ("fp32", "uint8"):
                    draw, write = throughput(shape, batch, storage, calls)
                    what = f"{batch}x{'x'.join(map(str, shape))} {storage}"
                    rows.append({"measurement": f"draw {what}", "value": round(draw, 1), "unit": "MB/s"})
                    rows.append({"measurement": f"write-back {what}", "value": round(write, 1), "unit": "MB/s"})
        finally:
            if session is not None:
                session.close()
    if args.two_nodes and not args.no_throughput:
        big = [(shape, batch, storage) for shape, batch, _ in cases[2:] for storage in ("fp32", "uint8")]
        with loopback_cluster() as (cluster, worker):
            figures = {path: two_node_throughput(cluster, worker, big, args.big_calls, direct=path == "direct link")
                       for path in ("direct link", "by value")}
        for path, results in figures.items():
            for (shape, batch, storage), (draw, write) in zip(big, results):
                what = f"{batch}x{'x'.join(map(str, shape))} {storage}, two nodes, {path}"
                rows.append({"measurement": f"draw {what}", "value": round(draw, 1), "unit": "MB/s"})
                rows.append({"measurement": f"write-back {what}", "value": round(write, 1), "unit": "MB/s"})
    print_report(rows, [("measurement", lambda r: r["measurement"]), ("value", lambda r: str(r["value"])),
                        ("unit", lambda r: r["unit"]),
                        ("ratio to local", lambda r: str(r.get("ratio_to_local", "")))],
                 meta={"cpu": cpu_name(), "cores": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
                       "config": config, "overrides": overrides})


if __name__ == "__main__":
    main()
