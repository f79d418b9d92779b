"""End-to-end training steps per second of a config, before and after the speed defaults.

Builds the real :class:`ebmscale.trainer.Trainer` for a config (default: the built-in MNIST job)
plus overrides, runs ``--warmup`` steps, then times ``--steps`` steps (wall clock and CPU time of
the process) and the share of the sampler in them. Each variant runs in its own process, because
the CPU allocator setting is process-wide; variants alternate for ``--rounds`` rounds and each
keeps its best:

* ``before``: the settings the trainer had before the speed defaults -- ``train.precision=fp32``,
  ``train.channels_last=true``, no ``torch.compile``, glibc's default allocator;
* ``after``: the defaults (``train.precision=auto``, ``train.compile=auto``,
  ``train.reuse_cpu_memory=true``), resolved for this device; the resolved line is printed.

``--fake-cifar`` trains on 2,000 random 32x32 RGB images with 10 labels written to a temporary
``.npz`` (no download; for a CIFAR-shaped speed measurement only), e.g. JEM at small width:

    .venv/bin/python benchmarks/train_speed.py                      # default MNIST job
    .venv/bin/python benchmarks/train_speed.py --config configs/jem_cifar10.yaml --fake-cifar \\
        --steps 5 model.depth=10 model.width=2

Prints a Markdown table and, as its last line, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import print_report  # noqa: E402

VARIANTS = {
    "before": ["train.precision=fp32", "train.channels_last=true", "train.compile=false",
               "train.reuse_cpu_memory=false"],
    "after": [],
}
QUIET = ["train.progress=false", "train.tensorboard=false", "train.sample_every=0", "train.checkpoint_every=0"]


def fake_cifar(folder: str, n: int = 2000) -> list[str]:
    """Write ``n`` random CIFAR-shaped images with labels and return the overrides that train on
    them (no holdout, caches under ``folder``)."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = os.path.join(folder, "fake_cifar.npz")
    np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, n))
    return ["data.dataset=npz", f"data.path={path}", "data.holdout=0", f"data.cache_dir={folder}/cache"]


def run_one(config: str | None, overrides: list[str], warmup: int, steps: int, run_dir: str) -> dict:
    """Time ``steps`` training steps after ``warmup`` in this process."""
    import torch

    from ebmscale.config import load_config
    from ebmscale.trainer import Trainer

    cfg = load_config(config, [*overrides, *QUIET])
    trainer = Trainer(cfg, run_dir)
    for _ in range(warmup):
        trainer.train_step()
    sampler = 0.0
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        sampler += trainer.train_step()["sampler_time"]
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    trainer.metrics.close()
    return {"speed": trainer.runtime.describe(), "steps_per_s": steps / wall, "steps_per_cpu_s": steps / cpu,
            "sampler_share": sampler / wall, "threads": torch.get_num_threads(),
            "model": f"{cfg.model.arch} depth {cfg.model.depth} width {cfg.model.width}",
            "batch": cfg.data.batch_size, "sampler_steps": cfg.sampler.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="YAML recipe (default: the built-in MNIST job)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of every variant (best is kept)")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["before", "after"])
    ap.add_argument("--fake-cifar", action="store_true", help="train on random 32x32 RGB images (no download)")
    ap.add_argument("--one", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # the per-variant child
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    if args.one:
        extra = fake_cifar(args.workdir) if args.fake_cifar else []
        res = run_one(args.config, [*args.overrides, *extra, *VARIANTS[args.one]], args.warmup, args.steps,
                      os.path.join(args.workdir, args.one))
        print(json.dumps(res))
        return
    best: dict[str, dict] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ebmscale-train-speed-") as work:
        # Variants alternate, round after round, and each keeps its best round: on a shared
        # machine both then see the same spells of load.
        for _ in range(args.rounds):
            for variant in args.variants:
                cmd = [sys.executable, os.path.abspath(__file__), "--one", variant, "--workdir", work,
                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                       *(["--config", args.config] if args.config else []),
                       *(["--fake-cifar"] if args.fake_cifar else []), *args.overrides]
                env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.exit(f"train_speed: variant '{variant}' failed:\n{proc.stderr[-3000:]}")
                res = {"variant": variant, **json.loads(proc.stdout.strip().splitlines()[-1])}
                old = best.setdefault(variant, res)
                for key in ("steps_per_s", "steps_per_cpu_s"):
                    old[key] = max(old[key], res[key])
    rows = [best[v] for v in args.variants]
    base = rows[0]
    for r in rows:
        r["ratio"] = r["steps_per_s"] / base["steps_per_s"]
        r["ratio_cpu"] = r["steps_per_cpu_s"] / base["steps_per_cpu_s"]
    load_after = os.getloadavg()
    print(f"Training speed, {args.config or 'default MNIST job'} {' '.join(args.overrides)}"
          f"{' (fake CIFAR-shaped data)' if args.fake_cifar else ''}: {rows[0]['model']}, batch {rows[0]['batch']}, "
          f"K={rows[0]['sampler_steps']}, {args.steps} timed steps after {args.warmup}, best of {args.rounds} rounds, "
          f"{rows[0]['threads']} threads; "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    print_report(rows, [("variant", lambda r: r["variant"]), ("resolved settings", lambda r: r["speed"]),
                        ("steps/s", lambda r: f"{r['steps_per_s']:.3f}"), ("x before", lambda r: f"{r['ratio']:.2f}"),
                        ("steps per CPU-s", lambda r: f"{r['steps_per_cpu_s']:.3f}"),
                        ("x before (CPU)", lambda r: f"{r['ratio_cpu']:.2f}"),
                        ("sampler share", lambda r: f"{100 * r['sampler_share']:.0f}%")],
                 meta={"config": args.config or "default", "overrides": args.overrides, "fake_cifar": args.fake_cifar,
                       "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "cpus": os.cpu_count(),
                       "load_average": [load_before[0], load_after[0]]})


if __name__ == "__main__":
    main()
