"""Peak memory per chain of one Langevin step, with and without activation checkpointing.

The sampler's memory grows with batch x resolution: each step keeps every activation of the
energy network for the backward pass to the input. ``train.sampler_checkpointing`` keeps only
block inputs (IGEBM/WRN residual blocks) and recomputes the rest. This prints, for 32, 64 and 128
pixels, the memory the sampler needs per chain both ways and the time per Langevin step -- for
IGEBM's network at each resolution (ResNet32Large, ResNet64, ResNet128) or for JEM's WRN-28-k.
Memory per chain is the slope between two batch sizes, so the batch-independent part (spectrally
normalised weight copies, workspace) is left out.

    .venv/bin/python benchmarks/sampler_memory.py [--arch igebm|wrn] [--resolutions 32 64 128] [--batch 4]
        [--precision fp32|bf16|fp16] [--device cpu|cuda] [--width 0] [--steps 2]

On CUDA the peak comes from the caching allocator's statistics; on CPU from the profiler's record
of every allocation and free (``profile_memory=True``), summed in time order. Prints a Markdown
table and, as its last line, one JSON object with all figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ebmscale.models.heads import ClassifierEnergy  # noqa: E402
from ebmscale.models.igebm import default_variant, igebm_resnet  # noqa: E402
from ebmscale.models.wrn import WideResNet  # noqa: E402
from ebmscale.parallel import AUTOCAST_DTYPES  # noqa: E402
from ebmscale.sampling import LangevinSettings, langevin, sampling_mode  # noqa: E402


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw allocator records (one per malloc/free, signed bytes); the FunctionEvent view folds
    # them into the enclosing ops and loses their order.
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return int(peak)


def build(arch: str, resolution: int, width: int) -> tuple[torch.nn.Module, str]:
    """IGEBM's network for the resolution, or JEM's WRN-28-``width`` (10 when 0) as a scalar energy."""
    if arch == "wrn":
        k = width or 10
        return ClassifierEnergy(WideResNet(28, k), 64 * k, 0), f"wrn-28-{k}"
    variant = default_variant(resolution, conditional=False)
    return igebm_resnet(variant, in_channels=3, width=width, spectral_norm=True), variant


def measure(arch: str, resolution: int, batch: int, precision: str, device: torch.device, width: int,
            steps: int) -> dict:
    """Memory per chain and time per Langevin step of IGEBM's variant for ``resolution`` or JEM's
    WRN (``arch``), both ways: see :func:`measure_model`."""
    torch.manual_seed(0)
    model, variant = build(arch, resolution, width)
    return {"resolution": resolution, "variant": variant, **measure_model(model, resolution, batch, precision,
                                                                          device, steps)}


def measure_model(model: torch.nn.Module, resolution: int, batch: int, precision: str, device: torch.device,
                  steps: int, num_classes: int = 0) -> dict:
    """Peaks at ``batch`` and ``2 * batch`` chains of ``steps`` Langevin steps, without and with
    activation checkpointing: the slope is the memory per chain, the intercept what the step costs
    whatever the batch (spectrally normalised weight copies, workspace). With ``num_classes`` the
    energy is class-conditional, E(x, y), each chain with its own label."""
    model = model.to(device)
    model = model.to(memory_format=torch.channels_last)
    settings = LangevinSettings(steps=steps, step_size=10.0, noise_std=0.005, kind="sgld", grad_clip=0.01,
                                clamp=(0.0, 1.0))
    row = {"batch": batch, "precision": precision, "parameters": sum(p.numel() for p in model.parameters())}
    for ckpt in (False, True):
        key = "checkpointed" if ckpt else "plain"
        peaks = {}
        for n in (batch, 2 * batch):
            x0 = torch.rand(n, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
            y = torch.arange(n, device=device) % num_classes if num_classes else None

            def run() -> None:
                with sampling_mode(model, checkpointing=ckpt) as m:
                    fn = m if y is None else (lambda x: m(x, y))
                    langevin(fn, x0, settings, torch.Generator(device).manual_seed(0),
                             autocast_dtype=AUTOCAST_DTYPES[precision])

            run()  # warm-up: kernels, allocator pools
            peaks[n] = peak_memory(run, device)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_chain = (peaks[2 * batch] - peaks[batch]) / batch
        row[f"{key}_mb_per_sample"] = per_chain / 2 ** 20
        row[f"{key}_fixed_mb"] = (peaks[batch] - batch * per_chain) / 2 ** 20
        row[f"{key}_s_per_step"] = (time.perf_counter() - t0) / steps
    row["memory_ratio"] = row["checkpointed_mb_per_sample"] / row["plain_mb_per_sample"]
    row["time_ratio"] = row["checkpointed_s_per_step"] / row["plain_s_per_step"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="igebm", choices=("igebm", "wrn"),
                    help="igebm: the variant IGEBM used at each resolution; wrn: JEM's WRN-28-k")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--batch", type=int, default=4, help="chains per measurement")
    ap.add_argument("--precision", default="fp32", choices=sorted(AUTOCAST_DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=0, help="igebm: base filters (0 = each variant's own); "
                                                            "wrn: widen factor (0 = 10)")
    ap.add_argument("--steps", type=int, default=2, help="Langevin steps per measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(args.arch, r, args.batch, args.precision, device, args.width, args.steps)
            for r in args.resolutions]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Sampler memory per chain (slope between {args.batch} and {2 * args.batch} chains), "
          f"{args.arch}, {args.precision}, {name}")
    print("| resolution | variant | params | plain MB/chain | checkpointed MB/chain | ratio | "
          f"plain s/step | checkpointed s/step ({2 * args.batch} chains) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['resolution']} | {r['variant']} | {r['parameters'] / 1e6:.1f}M | {r['plain_mb_per_sample']:.1f} | "
              f"{r['checkpointed_mb_per_sample']:.1f} | {r['memory_ratio']:.2f} | {r['plain_s_per_step']:.3f} | "
              f"{r['checkpointed_s_per_step']:.3f} |")
    print(json.dumps({"device": name, "rows": rows}))


if __name__ == "__main__":
    main()
