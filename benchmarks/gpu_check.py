"""The GPU check: one command that proves ebmscale's GPU paths on a CUDA machine and writes one JSON.

    .venv/bin/python benchmarks/gpu_check.py [--out gpu_check.json] [--budget-minutes 8]

On a CUDA machine it runs, each part in a child process of its own (one CUDA context, one
DeepSpeed state, a crash in one part is a row, not the end) and within the budget (8 minutes by
default; parts that would start past it are listed as skipped):

1. ``sampler``: Langevin throughput of WRN-10-2, WRN-28-10 (JEM, batch 64, 32x32) and IGEBM
   ResNet128 (batch 16, 128x128) in fp32 / bf16 / fp16 eager, and bf16 compiled, 20 steps each:
   image-steps/s, achieved TFLOP/s (FLOPs of a step counted by torch's flop counter) and MFU
   against the GPU's dense peak (``benchmarks/sampler.py``'s table; H200: 989 bf16 / 494 TF32).
2. ``train``: 200 steps of ``configs/igebm_cifar10.yaml`` at full width on synthetic CIFAR-shaped
   data, bf16 and torch.compile (in-process buffer, so only the GPU is measured): steps/s and peak
   GPU memory.
3. ``deepspeed``: ZeRO-2 bf16 on one GPU (IGEBM CIFAR-10 recipe, spectral norm): 20 steps/s.
4. ``fid``: Inception features and FID statistics of 1,000 images on the GPU (seconds).
5. ``resume``: 4 steps vs 2 + save + resume + 2 on the GPU: parameters and CUDA RNG state bitwise
   equal or not (with the largest difference).

On a machine without CUDA it exits at once with one line (exit 2). ``--device cpu --tiny`` runs
every part at toy sizes on the CPU; the test suite does that, so everything but CUDA itself is
exercised in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PARTS = ("sampler", "train", "deepspeed", "fid", "resume")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_sampler(device, tiny: bool) -> list[dict]:
    import torch

    from benchmarks.sampler import GPU_PEAK_TFLOPS, build_net, sampler_settings, step_flops
    from ebmscale.performance import AUTOCAST_DTYPES, compiled_energy
    from ebmscale.sampling import langevin, sampling_mode

    nets = [("wrn", 10, 2, "", 32, 64), ("wrn", 28, 10, "", 32, 64), ("igebm", 0, 0, "resnet128", 128, 16)]
    steps = 20
    if tiny:
        nets, steps = [("wrn", 10, 1, "", 8, 4), ("igebm", 1, 4, "resnet32", 8, 4)], 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    # Compiled in bf16 only: each compile costs tens of seconds, and bf16 is what auto picks on GPUs.
    # (--tiny leaves compile out: inductor's C++ build takes minutes on a small CPU; the compiled
    # sampler has its own test.)
    variants = [(d, "eager") for d in ("fp32", "bf16", "fp16")] + ([] if tiny else [("bf16", "compile")])
    rows = []
    for kind, depth, width, variant, res, batch in nets:
        net, label = build_net(kind, depth, width, variant, res)
        net = net.to(device).to(memory_format=torch.channels_last)
        settings, (lo, hi) = sampler_settings(kind, steps)
        x0 = (torch.rand(batch, 3, res, res, device=device) * (hi - lo) + lo).contiguous(
            memory_format=torch.channels_last)
        flops = step_flops(net, x0) * steps
        for dtype, mode in variants:
            energy = compiled_energy(net) if mode == "compile" else net
            row = {"net": label, "batch": batch, "resolution": res, "dtype": dtype, "mode": mode}
            try:
                def run():
                    with sampling_mode(net):
                        return langevin(energy, x0, settings, torch.Generator(device).manual_seed(0),
                                        autocast_dtype=AUTOCAST_DTYPES[dtype],
                                        grad_scaler=None if dtype != "fp16" else _scaler())
                t0 = time.perf_counter()
                run()
                _sync(device)
                first = time.perf_counter() - t0
                best = float("inf")
                for _ in range(1 if tiny else 3):
                    t0 = time.perf_counter()
                    run()
                    _sync(device)
                    best = min(best, time.perf_counter() - t0)
                tflops = flops / best / 1e12
                row.update(image_steps_per_s=batch * steps / best, tflops=tflops, first_call_s=first,
                           mfu=None if peak is None else tflops / (peak[1] if dtype == "fp32" else peak[0]))
            except Exception as exc:  # one row, not the end of the check
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
    return rows


def _scaler():
    from ebmscale.sampling import InputGradScaler

    return InputGradScaler()


def _trainer(overrides: list[str], run_dir: str, config: str | None = "igebm_cifar10.yaml"):
    from benchmarks.train_speed import QUIET, fake_cifar
    from ebmscale.config import load_config
    from ebmscale.trainer import Trainer

    path = os.path.join(ROOT, "configs", config) if config else None
    os.makedirs(run_dir, exist_ok=True)
    cfg = load_config(path, [*fake_cifar(run_dir, n=512), *QUIET, "buffer.backend=local", *overrides])
    return Trainer(cfg, os.path.join(run_dir, "run"))


def _tiny_overrides(tiny: bool) -> list[str]:
    return ["model.width=8", "model.depth=1", "data.batch_size=4", "sampler.steps=2", "buffer.capacity=64",
            "sampler.batch_size=0"] if tiny else []


def _time_steps(tr, steps: int, device) -> dict:
    import torch

    tr.train_step()  # warm-up (and the compile, when on)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step()
    _sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"steps": steps, "steps_per_s": steps / wall, "peak_gpu_mib": None if peak is None else peak / 2 ** 20,
            "runtime": tr.runtime.to_dict()}


def part_train(device, tiny: bool, work: str) -> dict:
    tr = _trainer(["train.precision=bf16", f"train.compile={'false' if tiny else 'true'}",
                   f"train.device={device}", *_tiny_overrides(tiny)], work)
    return _time_steps(tr, 2 if tiny else 200, device)


def part_deepspeed(device, tiny: bool, work: str) -> dict:
    tr = _trainer(["train.precision=bf16", "train.distributed=deepspeed", "train.zero_stage=2",
                   f"train.device={device}", *_tiny_overrides(tiny)], work)
    return {**_time_steps(tr, 2 if tiny else 20, device), "parallel": tr.parallel.describe()}


def part_fid(device, tiny: bool, work: str) -> dict:
    import torch

    from ebmscale.eval.fid import inception_statistics
    from ebmscale.eval.inception import load_fid_inception

    n, batch = (8, 4) if tiny else (1000, 100)
    detector = load_fid_inception(device=device, cache_dir=os.path.join(work, "inception"))
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(n // batch)]
    _sync(device)
    t0 = time.perf_counter()
    stats, _ = inception_statistics(images, detector, device=device, reduce=False)
    _sync(device)
    return {"images": stats.n, "seconds": time.perf_counter() - t0, "weights": detector.provenance}


def part_resume(device, tiny: bool, work: str) -> dict:
    import torch

    over = ["train.precision=bf16", f"train.device={device}", "train.checkpoint_every=0", *_tiny_overrides(tiny)]
    if not tiny:
        over += ["model.width=32", "data.batch_size=32", "sampler.steps=10"]
    a = _trainer(over, os.path.join(work, "a"))
    for _ in range(4):
        a.train_step()
    b = _trainer(over, os.path.join(work, "b"))
    for _ in range(2):
        b.train_step()
    path = b.save()
    saved_rng = b.rank_state()["cuda_rng"]
    if device.type == "cuda":
        torch.cuda.manual_seed(12345)  # move the CUDA RNG on, so that only the restore can bring it back
    c = _trainer(over, os.path.join(work, "b"))
    c.load_checkpoint(path)
    rng_restored = torch.equal(torch.cuda.get_rng_state(device), saved_rng) if device.type == "cuda" else None
    for _ in range(2):
        c.train_step()
    diffs = [float((p.float() - q.float()).abs().max())
             for p, q in zip(a.model.state_dict().values(), c.model.state_dict().values())]
    return {"bitwise": max(diffs) == 0.0, "max_abs_diff": max(diffs), "cuda_rng_restored": rng_restored,
            "steps": c.step}


def run_part(part: str, device_name: str, tiny: bool) -> object:
    import torch

    device = torch.device(device_name)
    with tempfile.TemporaryDirectory(prefix=f"ebmscale-gpu-check-{part}-") as work:
        if part == "sampler":
            return part_sampler(device, tiny)
        return {"train": part_train, "deepspeed": part_deepspeed, "fid": part_fid,
                "resume": part_resume}[part](device, tiny, work)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file written")
    ap.add_argument("--budget-minutes", type=float, default=8.0, help="no part starts after this")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only together with --tiny")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the CPU test of this script)")
    ap.add_argument("--one", choices=PARTS, help=argparse.SUPPRESS)  # the per-part child
    args = ap.parse_args(argv)
    if args.one:
        print("GPU_CHECK_RESULT " + json.dumps(run_part(args.one, args.device, args.tiny)))
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or use --device cpu --tiny to exercise the code paths", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.tiny:
        print("gpu_check: --device cpu needs --tiny (full sizes are a GPU check)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                    "torch": torch.__version__, "parts": {}, "skipped": []}
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for part in args.parts:
        left = args.budget_minutes * 60 - (time.perf_counter() - t_start)
        if left <= 10:
            report["skipped"].append(part)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--one", part, "--device", args.device,
               *(["--tiny"] if args.tiny else [])]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_CHECK_RESULT ")]
            result = (json.loads(lines[-1].split(" ", 1)[1]) if proc.returncode == 0 and lines
                      else {"error": (proc.stderr or proc.stdout)[-1500:]})
        except subprocess.TimeoutExpired:
            result = {"error": f"ran past the budget ({left:.0f} s left when it started)"}
        report["parts"][part] = {"seconds": round(time.perf_counter() - t0, 1), "result": result}
        with open(args.out, "w") as fh:  # written after every part: a killed check keeps what it had
            json.dump(report, fh, indent=1)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(json.dumps({k: ("error" not in v["result"]) if isinstance(v["result"], dict) else True
                      for k, v in report["parts"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
