"""Langevin sampler throughput (image-steps per second) against the published implementations' loop.

For one energy network -- JEM's Wide-ResNet (``--net wrn``, WRN-depth-width with JEM's 10-way head,
E(x) = -logsumexp f(x)) or an IGEBM ResNet (``--net igebm``) -- this times, in one process:

* **reference**: the loop of wgrathwohl/JEM ``sample_q`` (and IGEBM's, with its gradient clip and
  clamp): fp32, contiguous NCHW, the network's parameters requiring grad, ``autograd.grad`` of the
  summed energy with ``retain_graph=True``, an in-place ``x.data`` update;
* **ours**: ``ebmscale.sampling.langevin`` inside ``sampling_mode`` (parameters frozen, eval mode)
  in each requested precision (fp32, bf16, fp16 autocast), memory format (contiguous,
  channels_last) and mode (eager, ``torch.compile``), with the allocator setting the trainer uses.

Each row gives image-steps/s by wall clock and per CPU-second of this process (on a machine shared
with other jobs the CPU-time figure is the steadier one), the ratio to the reference for both, the
achieved FLOP/s (model FLOPs of one step -- forward plus input-gradient backward -- counted by
``torch.utils.flop_counter``), model-FLOP utilisation where a peak is known (``--peak-tflops`` or
the built-in table of GPUs), how far the final chains are from our fp32 eager ones (relative to how
far they moved; the mixed-precision tolerance is 1%), and the compile time. The row marked ``auto``
is what the trainer picks on this device (:func:`ebmscale.performance.resolve_speed`); the fastest
row within tolerance is marked ``*``.

On a CPU the reference runs first with glibc's default allocator; the allocator setting of the
trainer (``train.reuse_cpu_memory``) is process-wide and cannot be undone, so it is switched on
after the reference and one untuned row of ours, then the reference is timed again with it
("reference + malloc reuse") so that every factor's share is visible.

    .venv/bin/python benchmarks/sampler.py --net wrn --depth 10 --width 2 --batch 64 --steps 20
        [--resolution 32] [--device cpu|cuda] [--dtypes fp32 bf16 fp16] [--formats contiguous channels_last]
        [--modes eager compile] [--repeats 2] [--threads 0] [--peak-tflops T]

Default dtypes: fp32, plus bf16 where the device computes it natively, plus fp16 on CUDA. Default
modes: eager, plus compile on CUDA. Prints a Markdown table and, as its last line, one JSON object.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import Callable

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import print_report  # noqa: E402
from ebmscale.models.heads import ClassifierEnergy  # noqa: E402
from ebmscale.models.igebm import default_variant, igebm_resnet  # noqa: E402
from ebmscale.models.wrn import WideResNet  # noqa: E402
from ebmscale.parallel import AUTOCAST_DTYPES  # noqa: E402
from ebmscale.performance import compiled_energy, hardware_bf16, reuse_freed_cpu_memory  # noqa: E402
from ebmscale.sampling import LangevinSettings, langevin, sampling_mode  # noqa: E402

# Dense peak TFLOP/s (no sparsity) of GPUs by name fragment: (bf16/fp16 tensor cores, fp32 convs,
# which cuDNN runs as TF32 by default on Ampere and later).
GPU_PEAK_TFLOPS = {"H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0),
                   "L40S": (362.0, 183.0), "A10": (125.0, 62.5)}
# The tolerance of tests/distributed/test_precision.py: chains within 1% of the distance they moved.
DRIFT_TOLERANCE = 0.01


def build_net(net: str, depth: int, width: int, variant: str, resolution: int) -> tuple[nn.Module, str]:
    """JEM's WRN-depth-width energy (10-way head) or an IGEBM ResNet (spectral norm, its activation)."""
    if net == "wrn":
        return ClassifierEnergy(WideResNet(depth, width), 64 * width, 10), f"WRN-{depth}-{width}"
    variant = variant or default_variant(resolution, conditional=False)
    act = "swish" if variant == "resnet128" else "leaky_relu"
    return igebm_resnet(variant, in_channels=3, width=width, depth=depth, activation=act, spectral_norm=True), \
        f"IGEBM {variant}" + (f" F={width}" if width else "") + (f" x{depth}" if depth else "")


def sampler_settings(net: str, steps: int) -> tuple[LangevinSettings, tuple[float, float]]:
    """The published SGLD settings and data range: JEM (step 1, noise 0.01, [-1, 1]) or IGEBM
    (step 10, noise 0.005, gradient clip 0.01, clamp to [0, 1])."""
    if net == "wrn":
        return LangevinSettings(steps=steps, step_size=1.0, noise_std=0.01, kind="sgld"), (-1.0, 1.0)
    return LangevinSettings(steps=steps, step_size=10.0, noise_std=0.005, kind="sgld", grad_clip=0.01,
                            clamp=(0.0, 1.0)), (0.0, 1.0)


def reference_langevin(net: nn.Module, x0: torch.Tensor, s: LangevinSettings,
                       generator: torch.Generator) -> torch.Tensor:
    """The published loop (JEM ``sample_q``; IGEBM's clip and clamp): parameters requiring grad,
    contiguous fp32, ``autograd.grad`` with ``retain_graph=True``, in-place ``.data`` updates.
    Same noise stream as ours, so the two agree to rounding."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(True)
    a, sigma = s.coefficients()
    x = x0.detach().clone().requires_grad_(True)
    for _ in range(s.steps):
        (g,) = torch.autograd.grad(net(x).sum(), [x], retain_graph=True)
        if s.grad_clip > 0:
            g = g.clamp(-s.grad_clip, s.grad_clip)
        x.data += -a * g + sigma * torch.randn(x.shape, device=x.device, generator=generator)
        if s.clamp is not None:
            x.data.clamp_(*s.clamp)
    return x.detach()


def step_flops(net: nn.Module, x0: torch.Tensor) -> int:
    """Model FLOPs of one Langevin step for the batch: the energy forward and its backward to the
    input (no parameter gradients), counted by torch's flop counter in fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    with sampling_mode(net):
        x = x0.detach().clone().requires_grad_(True)
        with FlopCounterMode(display=False) as counter:
            # backward() rather than autograd.grad, which the counter's hooks reject; with the
            # parameters frozen it computes the same single gradient, dE/dx.
            net(x).sum().backward()
    return int(counter.get_total_flops())


def measure_round_robin(fns: list[Callable[[], torch.Tensor]], device: torch.device,
                        repeats: int) -> list[tuple[torch.Tensor, float, float, float]]:
    """Per function: (output, first-call seconds, best wall seconds, best CPU seconds of this
    process). Each is called once to warm up (kernels, allocator, any compile), then the functions
    are timed in turns, ``repeats`` rounds, so that on a shared machine every row sees the same
    spells of load rather than the reference one spell and ours another."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = []
    for fn in fns:
        t0 = time.perf_counter()
        out = fn()
        sync()
        results.append([out, time.perf_counter() - t0, float("inf"), float("inf")])
    for _ in range(repeats):
        for res, fn in zip(results, fns):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            sync()
            wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            res[2] = min(res[2], wall)
            res[3] = min(res[3], (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    return [tuple(r) for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="wrn", choices=("wrn", "igebm"))
    ap.add_argument("--depth", type=int, default=10, help="wrn: total depth 6n+4; igebm: blocks per stage (0 = variant's)")
    ap.add_argument("--width", type=int, default=2, help="wrn: widen factor; igebm: base filters (0 = variant's)")
    ap.add_argument("--variant", default="", help="igebm variant ('' = by resolution), e.g. resnet128")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="Langevin steps per sampler call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16", "fp16"), default=None)
    ap.add_argument("--formats", nargs="+", choices=("contiguous", "channels_last"),
                    default=["contiguous", "channels_last"])
    ap.add_argument("--modes", nargs="+", choices=("eager", "compile"), default=None)
    ap.add_argument("--repeats", type=int, default=2, help="timed sampler calls per row (best is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: GPU table)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    native_bf16 = hardware_bf16(device)
    dtypes = args.dtypes or (["fp32"] + (["bf16"] if native_bf16 else []) + (["fp16"] if cuda else []))
    modes = args.modes or (["eager", "compile"] if cuda else ["eager"])
    load_before = os.getloadavg()

    torch.manual_seed(0)
    net, net_name = build_net(args.net, args.depth, args.width, args.variant, args.resolution)
    net = net.to(device)
    settings, (lo, hi) = sampler_settings(args.net, args.steps)
    x0 = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(1))
    x0 = (x0 * (hi - lo) + lo).to(device)
    flops_per_step = step_flops(net, x0)
    flops_per_image_step = flops_per_step / args.batch
    image_steps = args.batch * args.steps
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peaks = next((v for k, v in GPU_PEAK_TFLOPS.items() if cuda and k in name), None)

    def gen() -> torch.Generator:
        return torch.Generator(device).manual_seed(2)

    def ours(dtype: str, fmt: str, mode: str) -> Callable[[], torch.Tensor]:
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        net.to(memory_format=mf)
        x_start = x0.contiguous(memory_format=mf)
        energy = compiled_energy(net) if mode == "compile" else net

        def run() -> torch.Tensor:
            net.to(memory_format=mf)  # rows share one network; layout of its weights per row
            with sampling_mode(net):
                return langevin(energy, x_start, settings, gen(), autocast_dtype=AUTOCAST_DTYPES[dtype])
        return run

    def reference() -> torch.Tensor:
        net.to(memory_format=torch.contiguous_format)
        return reference_langevin(net, x0.contiguous(), settings, gen())

    rows: list[dict] = []
    outputs: dict[str, torch.Tensor] = {}

    def measure(phase: list[tuple[str, Callable[[], torch.Tensor], bool, dict]]) -> None:
        """Time one phase's rows (same allocator setting) in turns."""
        for (label, _, malloc, setting), (out, first, wall, cpu) in zip(
                phase, measure_round_robin([fn for _, fn, _, _ in phase], device, args.repeats)):
            outputs[label] = out.float().contiguous()
            row = {"setting": label, **setting, "malloc_reuse": malloc, "image_steps_per_s": image_steps / wall,
                   "image_steps_per_cpu_s": image_steps / cpu if cpu > 0 else float("nan"),
                   "compile_s": max(0.0, first - wall) if setting["mode"] == "compile" else 0.0,
                   "gflops_per_s": flops_per_image_step * image_steps / wall / 1e9}
            peak = args.peak_tflops or (None if peaks is None else peaks[0 if setting["dtype"] in ("bf16", "fp16")
                                                                          else 1])
            row["mfu"] = row["gflops_per_s"] / (peak * 1e3) if peak else None
            rows.append(row)
            print(f"  {label}: {row['image_steps_per_s']:.1f} image-steps/s", file=sys.stderr, flush=True)

    plain = {"dtype": "fp32", "format": "contiguous", "mode": "eager"}
    on_cpu_tuning = device.type == "cpu"
    first_phase = [("reference", reference, False, plain)]
    if on_cpu_tuning:
        first_phase.append(("ours fp32 contiguous eager, stock malloc", ours("fp32", "contiguous", "eager"), False,
                            plain))
    measure(first_phase)
    on_cpu_tuning = on_cpu_tuning and reuse_freed_cpu_memory()
    phase = [("reference + malloc reuse", reference, True, plain)] if on_cpu_tuning else []
    phase += [(f"ours {dtype} {fmt} {mode}", ours(dtype, fmt, mode), on_cpu_tuning,
               {"dtype": dtype, "format": fmt, "mode": mode})
              for mode in modes for dtype in dtypes for fmt in args.formats]
    measure(phase)

    # Correctness: distance of each row's final chains from our fp32 eager contiguous ones,
    # relative to how far those moved from the start.
    base_key = "ours fp32 contiguous eager"
    base = outputs.get(base_key, outputs["reference"])
    moved = float((base - x0.float()).abs().max())
    ref = rows[0]
    auto = {"dtype": "bf16" if native_bf16 else "fp32", "format": "channels_last",
            "mode": "compile" if cuda else "eager"}
    for r in rows:
        r["drift"] = float((outputs[r["setting"]] - base).abs().max()) / moved
        r["correct"] = r["drift"] <= DRIFT_TOLERANCE
        r["ratio"] = r["image_steps_per_s"] / ref["image_steps_per_s"]
        r["ratio_cpu"] = r["image_steps_per_cpu_s"] / ref["image_steps_per_cpu_s"]
        r["auto"] = (r["setting"].startswith("ours") and r["malloc_reuse"] == on_cpu_tuning
                     and all(r[k] == v for k, v in auto.items()))
    ours_rows = [r for r in rows if r["setting"].startswith("ours") and r["correct"]]
    fastest = max(ours_rows, key=lambda r: r["image_steps_per_s"]) if ours_rows else None
    for r in rows:
        r["fastest"] = r is fastest
    load_after = os.getloadavg()
    print(f"Sampler throughput, {net_name}, batch {args.batch}, {args.resolution}x{args.resolution}, "
          f"{args.steps} steps, {name}, {torch.get_num_threads()} threads, "
          f"{flops_per_image_step / 1e6:.1f} MFLOP per image-step; load average {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f} on {os.cpu_count()} CPUs; best of {args.repeats}")
    pct = "n/a"
    print_report(rows, [
        ("setting", lambda r: r["setting"] + (" (auto)" if r["auto"] else "") + (" *" if r["fastest"] else "")),
        ("image-steps/s", lambda r: f"{r['image_steps_per_s']:.1f}"),
        ("x reference", lambda r: f"{r['ratio']:.2f}"),
        ("per CPU-s", lambda r: f"{r['image_steps_per_cpu_s']:.1f}"),
        ("x reference (CPU)", lambda r: f"{r['ratio_cpu']:.2f}"),
        ("GFLOP/s", lambda r: f"{r['gflops_per_s']:.1f}"),
        ("MFU", lambda r: pct if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"),
        ("drift", lambda r: f"{r['drift']:.1e}" + ("" if r["correct"] else " (over 1%)")),
        ("compile s", lambda r: f"{r['compile_s']:.0f}" if r["mode"] == "compile" else "-"),
    ], meta={"net": net_name, "batch": args.batch, "resolution": args.resolution, "steps": args.steps,
             "device": name, "threads": torch.get_num_threads(), "flops_per_image_step": flops_per_image_step,
             "load_average": [load_before[0], load_after[0]], "cpus": os.cpu_count(),
             "best_ratio": fastest["ratio"] if fastest else None,
             "fp32_best_ratio": max((r["ratio"] for r in ours_rows if r["dtype"] == "fp32"), default=None),
             "argv": sys.argv[1:]})


if __name__ == "__main__":
    main()
