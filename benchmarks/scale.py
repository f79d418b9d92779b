"""What each ImageNet recipe costs at full size: counted FLOPs per training step, buffer and
checkpoint bytes, and the projected H200-hours per ImageNet epoch.

For each recipe (IGEBM 32/64/128, JEM 32/64/128) the network is built at its real architecture
with fake tensors (``FakeTensorMode``: shapes only, nothing computed or allocated) and
``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of

* one Langevin step: the energy forward of the step's chains and the backward to the input only
  (the sampler never takes parameter gradients), in sampling mode -- times ``sampler.steps``;
* the loss forward over [x+, x-] through the network and its full backward;

times ``optim.accumulate`` micro-batches per optimizer step, per rank. The counter counts matrix
products and convolutions (forward and backward), not elementwise work (activations, spectral-norm
power iterations, optimizer update), which is small beside them at these sizes.

Bytes: the replay buffer per rank (``buffer.capacity`` chains in ``buffer.storage``, plus int64
class labels when partitioned); a checkpoint (fp32 weights, EMA when kept, Adam's two moments,
and the buffer of every rank, for ``--ranks`` ranks).

Projection: H200-hours per epoch of 1,281,167 ImageNet training images = counted FLOPs per image x
images / (dense bf16 peak x utilisation) / 3600, with the peak 989 TFLOP/s (H200 SXM, dense BF16)
and the utilisation ``--utilisation`` (default 0.4) stated in the table: an assumption, not a
measurement. Independent of the number of GPUs (the work per image is fixed).

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--utilisation 0.4] [--ranks 8] [--recipes NAME ...]

``--recipes`` limits the table (and ``--measure``) to some recipes. Prints a Markdown table and, as its last line, one JSON object with all figures.

``--measure`` also measures, on this machine, each recipe at its real architecture (or with the
given ``key=value`` overrides, e.g. a smaller width for a smoke test):

* the step-time split -- the trainer's own ``data_time`` / ``sampler_time`` / ``buffer_time`` and
  the rest of ``step_time`` (loss forward/backward, all-reduce, update), see docs/monitoring.md --
  on each of ``--world-sizes`` ranks (2 = two gloo processes under ``accelerate launch``) with
  the Ray buffer at the recipe's capacity and storage, on synthetic JPEG shards of the recipe's
  resolution and class count. A full step is too slow for a CPU, so the run is reduced, and the
  table says how: ``--batch`` examples (and chains) per rank, ``--sampler-steps`` Langevin steps,
  one micro-batch per step (``optim.accumulate=1``); the mean of ``--steps`` steps after
  ``--warmup``;
* the sampler's activation memory per chain without and with ``train.sampler_checkpointing``
  (benchmarks/sampler_memory.py's ``measure_model``: the slope of the peak between
  ``--memory-chains`` and twice as many chains, in the precision the recipe resolves to here);
* ``--consumption``: the IGEBM ImageNet-128 recipe at its own sampler steps (one rank, ``--batch``
  examples): the images/s its step consumes, beside what the shard loader supplies with the
  workers the recipe configures (``data.num_workers: -1``) on the same shards.

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --measure --batch 2 --sampler-steps 2 --consumption
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ebmscale.config import load_config  # noqa: E402
from ebmscale.models import build_model, count_parameters  # noqa: E402
from ebmscale.sampling import sampling_mode  # noqa: E402

RECIPES = ["igebm_imagenet32.yaml", "igebm_imagenet64.yaml", "igebm_imagenet128.yaml", "jem_imagenet32.yaml",
           "jem_imagenet64.yaml", "jem_imagenet128.yaml"]
IMAGENET_TRAIN = 1_281_167
H200_BF16_DENSE = 989e12
STORAGE_BYTES = {"fp32": 4, "fp16": 2, "uint8": 1}


def _energy(model, cfg, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return model(x, y) if cfg.model.conditional else model(x)


def counted_flops(cfg) -> dict:
    """FLOPs of one optimizer step of one rank under ``cfg``, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return _count(cfg, FlopCounterMode)


def _count(cfg, FlopCounterMode) -> dict:
    shape = (3, cfg.data.resolution, cfg.data.resolution)
    model = build_model(cfg.model, shape)
    n = cfg.data.batch_size
    m = cfg.sampler.batch_size or n
    y = torch.zeros(max(n, m), dtype=torch.long) if cfg.model.conditional else None
    x = torch.empty(m, *shape)
    with sampling_mode(model), FlopCounterMode(display=False) as fc:
        x.requires_grad_(True)
        e = _energy(model, cfg, x, None if y is None else y[:m])
        e.sum().backward()  # parameters are frozen in sampling mode: the input gradient only
    sampler_step = fc.get_total_flops()
    model.train()
    xs = torch.empty(n + m, *shape)
    ys = None if y is None else torch.cat([y[:n], y[:m]])
    with FlopCounterMode(display=False) as fc:
        if cfg.objective.kind == "jem":
            model.logits(xs).sum().backward()  # JEM's one training forward: logits of [x+, x-]
        else:
            _energy(model, cfg, xs, ys).sum().backward()
    loss = fc.get_total_flops()
    k = cfg.optim.accumulate
    sampler = cfg.sampler.steps * sampler_step
    return {"parameters": count_parameters(model), "sampler_flops_per_langevin_step": sampler_step,
            "sampler_flops": k * sampler, "loss_flops": k * loss, "step_flops": k * (sampler + loss),
            "images_per_step": k * n, "chains_per_step": k * m}


def bytes_of(cfg, ranks: int, params: int) -> dict:
    shape = (3, cfg.data.resolution, cfg.data.resolution)
    b = cfg.buffer
    labels = 8 * b.capacity if (cfg.model.conditional or (cfg.objective.kind == "jem" and cfg.objective.pxy_weight > 0)) else 0
    buffer = b.capacity * int(np.prod(shape)) * STORAGE_BYTES[b.storage] + labels
    weights = 4 * params * (1 + (cfg.optim.ema > 0) + (2 if cfg.optim.name in ("adam", "adamw") else 1))
    return {"buffer_bytes_per_rank": buffer, "checkpoint_bytes": weights + ranks * buffer,
            "checkpoint_weights_bytes": weights}


TIMES = ("data_time", "sampler_time", "buffer_time", "step_time")
CPU_GLOO = os.path.join(ROOT, "launch", "accelerate", "cpu_gloo.yaml")


def synthetic_shards(folder: str, resolution: int, classes: int, n: int = 256) -> str:
    """``n`` photographic 3 x ``resolution``^2 crops labelled round-robin over ``classes``, as JPEG
    shards (quality 90, 32 per shard) under ``folder``; reused when already there."""
    from benchmarks.data_loader import make_images
    from ebmscale.data.sources import Source
    from ebmscale.data.writer import write_shards

    out = os.path.join(folder, f"shards{resolution}x{classes}")
    if not os.path.isdir(out):
        images = make_images(n, resolution)
        write_shards(Source("bench", "", "", np.arange(n) % classes, [str(c) for c in range(classes)], 3,
                            images=images, shape=(3, resolution, resolution)),
                     out, shard_size=32, processes=1, image_format="jpg", quality=90)
    return out


def run_overrides(shards: str, batch: int, sampler_steps: int, world: int, run_dir: str) -> list[str]:
    """What a measured run changes in a recipe: its data (synthetic shards), the reduced batch and
    sampler steps, one micro-batch, the Ray buffer, a CPU thread per rank's share of the cores,
    nothing written but the run directory."""
    threads = max(1, len(os.sched_getaffinity(0)) // world)
    return [f"data.path={shards}", "data.holdout=0", f"data.batch_size={batch}", "optim.accumulate=1",
            f"sampler.steps={sampler_steps}", "buffer.backend=ray", "train.device=cpu", f"train.threads={threads}",
            "train.progress=false", "train.tensorboard=false", "train.sample_every=0", "train.checkpoint_every=0",
            f"train.run_dir={run_dir}"]


def recipe_path(recipe: str) -> str:
    """A config file, or a recipe's name under configs/."""
    return recipe if os.path.isfile(recipe) else os.path.join(ROOT, "configs", recipe)


def worker(recipe: str, overrides: list[str], warmup: int, steps: int, out: str) -> None:
    """One rank of a measured run (launched by :func:`measure_steps`): ``warmup`` + ``steps``
    training steps of the real trainer; writes this rank's per-step times to ``out/rank<r>.json``."""
    from ebmscale import dist
    from ebmscale.trainer import Trainer

    cfg = load_config(recipe_path(recipe), overrides)
    tr = Trainer(cfg)
    rows = []
    try:
        for i in range(warmup + steps):
            o = tr.train_step()
            if i >= warmup:
                rows.append({k: o[k] for k in TIMES})
    finally:
        tr.metrics.close()
        tr.buffer.close(clean=True)
    from ebmscale.data.images import resolve_num_workers

    res = {"rank": tr.rank, "world": tr.world, "precision": tr.runtime.precision, "threads": torch.get_num_threads(),
           "workers": resolve_num_workers(cfg.data.num_workers), "parameters": count_parameters(tr.model),
           "steps": rows}
    with open(os.path.join(out, f"rank{tr.rank}.json"), "w") as fh:
        json.dump(res, fh)
    dist.barrier()


def measure_steps(recipe: str, world: int, overrides: list[str], warmup: int, steps: int, work: str,
                  timeout: float) -> dict:
    """Run :func:`worker` on ``world`` ranks (one process, or ``accelerate launch`` with gloo) and
    return the per-part means over ranks and timed steps."""
    import subprocess
    import tempfile

    out = tempfile.mkdtemp(prefix=f"{os.path.basename(recipe).split('.')[0]}-w{world}-", dir=work)
    script = [os.path.abspath(__file__), "--worker", recipe, "--out", out, "--warmup", str(warmup),
              "--steps", str(steps), *overrides]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_GLOO, "--num_processes",
               str(world), "--num_machines", "1", "--main_process_port", str(port), *script]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RAY_"))}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(max(1, len(os.sched_getaffinity(0)) // world)))
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"scale: {recipe} on {world} rank(s) failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
    mean = {k: float(np.mean([row[k] for r in ranks for row in r["steps"]])) for k in TIMES}
    mean["loss_backward_time"] = max(0.0, mean["step_time"] - mean["data_time"] - mean["sampler_time"]
                                     - mean["buffer_time"])
    return {"world": world, **mean, "precision": ranks[0]["precision"], "threads": ranks[0]["threads"],
            "workers": ranks[0]["workers"]}


def measure_memory(cfg, chains: int) -> dict:
    """The sampler's activation memory per chain of ``cfg``'s network without and with
    checkpointing (benchmarks/sampler_memory.py), in the precision ``cfg`` resolves to here."""
    from benchmarks.sampler_memory import measure_model
    from ebmscale.performance import resolve_runtime

    precision = resolve_runtime(cfg, image_data=True).precision
    torch.manual_seed(0)
    model = build_model(cfg.model, (3, cfg.data.resolution, cfg.data.resolution))
    classes = cfg.model.num_classes if cfg.model.conditional else 0
    return measure_model(model, cfg.data.resolution, chains, precision, torch.device("cpu"), 1, classes)


def measured(args, work: str) -> dict:
    """The ``--measure`` figures of every recipe in ``args.recipes``."""
    rows = []
    for name in args.recipes:
        base = load_config(os.path.join(ROOT, "configs", name), args.overrides)
        classes = max(1, base.model.num_classes)
        shards = synthetic_shards(work, base.data.resolution, classes)
        row = {"recipe": name, "batch": args.batch, "sampler_steps": args.sampler_steps,
               "recipe_sampler_steps": base.sampler.steps, "recipe_batch": base.data.batch_size,
               "recipe_accumulate": base.optim.accumulate, "overrides": args.overrides, "runs": []}
        for world in args.world_sizes:
            ov = run_overrides(shards, args.batch, args.sampler_steps, world, os.path.join(work, "run"))
            r = measure_steps(name, world, [*args.overrides, *ov], args.warmup, args.steps, work, args.timeout)
            print(f"{name} on {world} rank(s): " + ", ".join(f"{k} {r[k]:.3f} s" for k in
                                                             (*TIMES, "loss_backward_time")), flush=True)
            row["runs"].append(r)
        row["memory"] = measure_memory(base, args.memory_chains)
        print(f"{name}: sampler memory {row['memory']['plain_mb_per_sample']:.0f} MB/chain plain, "
              f"{row['memory']['checkpointed_mb_per_sample']:.0f} checkpointed", flush=True)
        rows.append(row)
    consumption = None
    if args.consumption:  # benchmarks/data_loader.py's figures, on this run's shards and overrides
        from benchmarks.data_loader import consumption as consumed

        consumption = consumed(recipe_path("igebm_imagenet128.yaml"), args.batch, 1, work, args.overrides,
                               args.timeout)
    return {"rows": rows, "consumption": consumption}


def projected_sampler_share(row: dict, run: dict) -> float:
    """The sampler's share of a step at the recipe's Langevin steps, from the measured parts of the
    reduced run: its sampler time scaled by recipe K / measured K, the other parts as measured."""
    sampler = run["sampler_time"] * row["recipe_sampler_steps"] / row["sampler_steps"]
    return sampler / (sampler + run["data_time"] + run["buffer_time"] + run["loss_backward_time"])


def print_measured(m: dict, cpu: str, load: tuple[float, float]) -> None:
    print(f"\nMeasured on {cpu}, {len(os.sched_getaffinity(0))} cores, load average {load[0]:.1f} -> {load[1]:.1f}")
    print("| recipe | ranks | reduced run (per rank) | precision | data s | sampler s | buffer s | "
          "loss+backward+update s | step s | sampler share at the recipe's K (projected) | "
          "sampler MB/chain plain / checkpointed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in m["rows"]:
        mem = row["memory"]
        for r in row["runs"]:
            run = (f"batch {row['batch']} (recipe {row['recipe_batch']} x {row['recipe_accumulate']}), "
                   f"K {row['sampler_steps']} (recipe {row['recipe_sampler_steps']})")
            print(f"| {row['recipe']} | {r['world']} | {run} | {r['precision']} | {r['data_time']:.3f} | "
                  f"{r['sampler_time']:.3f} | {r['buffer_time']:.3f} | {r['loss_backward_time']:.3f} | "
                  f"{r['step_time']:.3f} | {projected_sampler_share(row, r):.0%} | "
                  f"{mem['plain_mb_per_sample']:,.1f} / {mem['checkpointed_mb_per_sample']:,.1f} |")
    c = m["consumption"]
    if c:
        print(f"\n{os.path.basename(c['config'])} at its {c['sampler_steps']} sampler steps, batch {c['batch']}, "
              f"1 rank: {c['step_s']:.1f} s per step = {c['images_per_s']:.3f} images/s consumed; the shard loader "
              f"with the recipe's {c['loader']['workers']} worker(s) supplies {c['loader']['images_per_s']:,.0f} "
              f"images/s ({c['supply_ratio']:,.0f}x: {'at least' if c['supply_ratio'] >= 2 else 'LESS than'} 2x)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--utilisation", type=float, default=0.4, help="assumed fraction of the H200's dense bf16 peak")
    p.add_argument("--ranks", type=int, default=8, help="ranks whose buffers a checkpoint holds")
    p.add_argument("--measure", action="store_true", help="also measure step-time split and sampler memory here")
    p.add_argument("--recipes", nargs="+", default=RECIPES, choices=RECIPES, help="recipes to count (and measure)")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2], help="ranks of each measured run")
    p.add_argument("--batch", type=int, default=2, help="examples (and chains) per rank in a measured step")
    p.add_argument("--sampler-steps", type=int, default=2, help="Langevin steps in a measured step")
    p.add_argument("--steps", type=int, default=2, help="timed steps per measured run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--memory-chains", type=int, default=1, help="chains of the smaller memory measurement")
    p.add_argument("--consumption", action="store_true",
                   help="time igebm_imagenet128 at its own sampler steps against the loader's supply")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measured run")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one rank of a measured run: the recipe
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every measured recipe")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.overrides, args.warmup, args.steps, args.out)
        return {}
    rows = []
    for name in args.recipes:
        cfg = load_config(os.path.join(ROOT, "configs", name))
        row = {"recipe": name, **counted_flops(cfg)}
        row.update(bytes_of(cfg, args.ranks, row["parameters"]))
        per_image = row["step_flops"] / row["images_per_step"]
        row["flops_per_image"] = per_image
        row["h200_hours_per_epoch"] = per_image * IMAGENET_TRAIN / (H200_BF16_DENSE * args.utilisation) / 3600
        row["sampler_share"] = row["sampler_flops"] / row["step_flops"]
        rows.append(row)
    print(f"| recipe | parameters | GFLOP per step (rank) | sampler share | GFLOP per image | buffer per rank | "
          f"checkpoint ({args.ranks} ranks) | H200-hours per epoch at {args.utilisation:.0%} of 989 TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['parameters']:,} | {r['step_flops'] / 1e9:,.0f} | {r['sampler_share']:.1%} | "
              f"{r['flops_per_image'] / 1e9:,.1f} | {r['buffer_bytes_per_rank'] / 2**20:,.0f} MiB | "
              f"{r['checkpoint_bytes'] / 2**30:,.2f} GiB | {r['h200_hours_per_epoch']:,.1f} |")
    result = {"utilisation": args.utilisation, "peak_flops": H200_BF16_DENSE, "ranks": args.ranks,
              "imagenet_train_images": IMAGENET_TRAIN, "rows": rows}
    if args.measure:
        import shutil
        import tempfile

        from benchmarks._report import cpu_name

        cpu = cpu_name()
        load0 = os.getloadavg()[0]
        work = tempfile.mkdtemp(prefix="ebmscale-scale-")
        try:
            m = measured(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        load = (load0, os.getloadavg()[0])
        print_measured(m, cpu, load)
        result["measured"] = {**m, "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "load_average": list(load)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
