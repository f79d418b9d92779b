"""The resolved runtime: device, backend, precision and the speed switches, resolved once per process.

Almost all of an EBM's training time is spent in the K Langevin steps, each a forward and a
backward pass to the input. Four switches decide how fast they run, and :func:`resolve_runtime` turns
the config's requests into what this device actually gets (a frozen :class:`Runtime`, together with
the device and the data-parallel backend):

* ``train.precision: auto`` -> bf16 autocast where the hardware computes bf16 natively (a CUDA GPU
  with ``torch.cuda.is_bf16_supported()``, or a CPU with AMX or AVX512-BF16 units), otherwise fp32.
  On a CPU without those units bf16 is *emulated* and about 10x slower than fp32 (measured on the
  AVX2 development machine: ~17x in the sampler), so auto never picks it there. fp16 is never picked automatically: it
  needs loss scaling and buys nothing over bf16 on hardware that has both. 2-D toy energies (small
  MLPs, exact-likelihood benchmarks) stay fp32 under auto. Results stay within the
  tolerances stated in ``tests/distributed/test_precision.py``.
* ``train.channels_last`` (a plain switch): NHWC for convolutional energies. Same maths, and oneDNN
  and cuDNN run their fastest convolutions in this layout (1.27x here on WRN-10-2's sampler).
* ``train.compile: auto`` -> ``torch.compile`` of the sampler's energy on CUDA, where its fused
  kernels pay for the compile time (tens of seconds) within a few hundred steps; off on CPU, where
  compiling WRN-10-2's forward and backward took 2-3 minutes on 2 cores and the result was not
  faster than oneDNN's eager kernels. Off whenever ``train.sampler_checkpointing`` is on (its
  per-call patching of block ``forward`` would force a recompile every call).
* ``train.reuse_cpu_memory`` (CPU only): glibc returns every large freed block to the OS and
  page-faults it back in on the next step (each activation of a Langevin step is megabytes), which
  cost ~20% of CPU time in system calls and page faults (WRN-10-2, batch 64).
  :func:`reuse_freed_cpu_memory` raises glibc's mmap and trim thresholds so freed blocks are reused
  instead (1.3x on that sampler). Process-wide; the process keeps its peak heap. Where activations
  are small enough for glibc's own adaptive threshold (the default MNIST CNN) it buys nothing, and
  there it measured ~9% slower on a shared machine: see docs/benchmarks.md (End to end).
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ebmscale import dist
from ebmscale.config import Config, ConfigError

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD_MAX = 32 * 2 ** 20


AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """How this process runs, resolved once at start from the config and the hardware (see the module
    docstring) and read by every module; the config itself is never changed. The run directory
    records it beside the asked config (``runtime.yaml``), and ``ebmscale info`` prints both."""

    device: torch.device
    backend: str  # ddp | deepspeed
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool
    reuse_cpu_memory: bool
    hardware_bf16: bool  # what the probe found; 'auto' followed it unless the energy is a 2-D MLP

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """dtype of the energy evaluations under autocast (None = fp32, no autocast)."""
        return AUTOCAST_DTYPES[self.precision]

    def describe(self) -> str:
        """One line for the log, e.g. ``precision fp32, channels_last, eager, cpu-malloc reuse``."""
        parts = [f"precision {self.precision}", "channels_last" if self.channels_last else "contiguous",
                 "torch.compile" if self.compile else "eager"]
        if self.reuse_cpu_memory:
            parts.append("cpu-malloc reuse")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """Plain values (YAML/JSON serialisable)."""
        return {"device": str(self.device), "backend": self.backend, "precision": self.precision,
                "autocast_dtype": None if self.autocast_dtype is None else str(self.autocast_dtype).split(".")[-1],
                "channels_last": self.channels_last, "compile": self.compile,
                "reuse_cpu_memory": self.reuse_cpu_memory, "hardware_bf16": self.hardware_bf16}


def hardware_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it (Ampere and later), or
    a CPU with AMX tiles or AVX512-BF16 instructions (what oneDNN's bf16 kernels need to beat
    fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        try:
            return any(bool(getattr(torch.cpu, name)()) for name in probes if hasattr(torch.cpu, name))
        except RuntimeError:  # cpuinfo could not read the CPU: assume nothing
            return False
    return False


def resolve_precision(requested: str, device: torch.device, image_data: bool = True) -> str:
    """``train.precision`` -> fp32 | bf16 | fp16 ('auto': bf16 where :func:`hardware_bf16`, else
    fp32). ``image_data=False`` (a 2-D toy MLP energy) makes 'auto' fp32 everywhere: those recipes'
    exact likelihoods are reference figures across machines, so they run the same arithmetic with or
    without bf16 units (bf16 measured no worse over 5 seeds, and only 1.24x faster; docs/precision.md)."""
    if requested != "auto":
        return requested
    return "bf16" if image_data and hardware_bf16(device) else "fp32"


def resolve_compile(requested: str, device: torch.device, sampler_checkpointing: bool = False) -> bool:
    """``train.compile`` -> whether the sampler's energy runs through ``torch.compile`` ('auto':
    on CUDA only, and never together with sampler checkpointing)."""
    if requested == "auto":
        return device.type == "cuda" and not sampler_checkpointing
    return requested == "true"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def launched_with_deepspeed() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (it exports this variable)."""
    return _flag("ACCELERATE_USE_DEEPSPEED")


def resolve_backend(requested: str) -> str:
    """``train.distributed`` -> 'ddp' or 'deepspeed' (auto follows the launcher)."""
    if requested == "auto":
        return "deepspeed" if launched_with_deepspeed() else "ddp"
    if requested == "ddp" and launched_with_deepspeed():
        # accelerate would build a DeepSpeed engine from the launcher's environment regardless.
        raise ConfigError("launched with a DeepSpeed accelerate config but train.distributed=ddp; "
                          "set train.distributed=deepspeed (or auto), or launch with a DDP config")
    return requested


def resolve_device(name: str) -> torch.device:
    """``train.device`` -> a torch device ('auto' = this rank's GPU if there is one, else the CPU)."""
    if name == "auto":
        return torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def check_precision_runs(precision: str, device: torch.device, backend: str) -> None:
    """Refuse, with one line naming ``train.precision``, a precision this device and backend cannot
    run (rather than a crash deep inside a kernel or DeepSpeed)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 (it needs "
                          "an Ampere or later GPU); use train.precision=fp16 or fp32")
    if precision == "fp16" and backend == "deepspeed" and device.type == "cpu":
        raise ConfigError("train.precision=fp16: DeepSpeed has no fp16 on CPU; use train.precision=bf16 (or fp32), "
                          "or train.distributed=ddp")


def resolve_speed(train_cfg, device: torch.device, image_data: bool, backend: str = "ddp") -> Runtime:
    """The speed switches of ``train_cfg`` (a ``TrainConfig``) resolved for ``device``;
    ``image_data`` says whether the energy is convolutional (channels_last applies, and 'auto'
    precision may pick bf16). Prefer :func:`resolve_runtime`, which also resolves device and backend."""
    precision = resolve_precision(train_cfg.precision, device, image_data)
    check_precision_runs(precision, device, backend)
    return Runtime(
        device=device, backend=backend, precision=precision,
        # Not under DeepSpeed: ZeRO flattens the weights into contiguous buffers (and its broadcast
        # views them as bytes, which fails on a channels_last conv weight).
        channels_last=bool(train_cfg.channels_last and image_data and backend != "deepspeed"),
        compile=resolve_compile(train_cfg.compile, device, train_cfg.sampler_checkpointing),
        reuse_cpu_memory=bool(train_cfg.reuse_cpu_memory and device.type == "cpu" and _glibc() is not None),
        hardware_bf16=hardware_bf16(device))


def resolve_runtime(cfg: Config, image_data: bool) -> Runtime:
    """The one place where ``cfg`` meets the hardware: device, backend, precision (and so the autocast
    dtype), layout, compile and allocator, resolved once at start into a frozen :class:`Runtime`.
    Raises ConfigError naming the key for a combination the device cannot run."""
    t = cfg.train
    return resolve_speed(t, resolve_device(t.device), image_data, resolve_backend(t.distributed))


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (mallopt exists), else None (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def reuse_freed_cpu_memory() -> bool:
    """Make glibc keep freed blocks of up to 32 MiB for reuse instead of unmapping them (and the
    heap top instead of trimming it), so each Langevin step's activations stop costing page faults.
    Process-wide, applied once; returns whether it took effect."""
    libc = _glibc()
    if libc is None:
        return False
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 30) == 1
    return ok_mmap and ok_trim


def compiled_energy(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` of an energy network for the sampler. The wrapper shares the module's
    parameters and buffers; build it once and reuse it (each new wrapper compiles afresh)."""
    return torch.compile(module)


def _energy_gradients(model: torch.nn.Module, energy: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
                      x: torch.Tensor, half_dtype: torch.dtype | None, scale: float) -> dict[str, torch.Tensor]:
    """Gradients of ``scale * mean(energy(copy of model, x))`` (parameters and input), unscaled, in
    fp32 (``half_dtype`` None) or in the run's half precision; on a deep copy, same random state."""
    m = copy.deepcopy(model)
    if half_dtype is None:
        m = m.float()
    m.train()
    module_dtype = next(m.parameters()).dtype
    xi = x.detach().to(torch.float32 if half_dtype is None or module_dtype == torch.float32 else module_dtype)
    xi.requires_grad_(True)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(0)  # same dropout masks for both passes
        # Half precision is autocast on fp32 weights (DDP), or the module's own dtype (DeepSpeed).
        with torch.autocast(x.device.type, dtype=half_dtype or torch.bfloat16,
                            enabled=half_dtype is not None and module_dtype == torch.float32):
            e = energy(m, xi)
        (e.float().mean() * scale).backward()
    g = {n: p.grad.float() / scale for n, p in m.named_parameters() if p.grad is not None}
    g["input (sampler gradient)"] = xi.grad.float() / scale
    return g


def half_precision_gradient_errors(model: torch.nn.Module, energy: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
                                   x: torch.Tensor, runtime: Runtime) -> dict[str, float]:
    """Relative error, per parameter tensor and for the input gradient (the sampler's), of the
    gradients of ``mean(energy(model, x))`` computed the way this run computes them in half
    precision, against fp32 on the same batch: ``|g_half - g_fp32| / |g_fp32|`` (inf/nan when the
    half-precision gradient is not finite). Runs on deep copies with the same random state, so the
    model, its spectral-norm vectors and the global RNG are left untouched. fp16 is loss-scaled as
    training scales it: the largest of 2^12, 2^8, 2^4, 1 whose gradients are finite."""
    half_dtype = runtime.autocast_dtype
    if half_dtype is None:
        return {}
    ref = _energy_gradients(model, energy, x, None, 1.0)
    for scale in ((2.0 ** 12, 2.0 ** 8, 2.0 ** 4, 1.0) if half_dtype == torch.float16 else (1.0,)):
        half = _energy_gradients(model, energy, x, half_dtype, scale)
        if all(bool(torch.isfinite(g).all()) for g in half.values()):
            break
    errors = {}
    for name, r in ref.items():
        h = half.get(name)
        if h is None:
            continue
        denom, diff = float(r.norm()), float((h - r).norm())
        if denom == 0.0 and diff == 0.0:
            continue
        errors[name] = diff / denom if denom > 0 else math.inf
    return errors
