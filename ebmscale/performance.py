"""Speed settings of the sampler and the training step, resolved once per process for its device.

Almost all of an EBM's training time is spent in the K Langevin steps, each a forward and a
backward pass to the input. Four switches decide how fast they run, and :func:`resolve_speed` turns
the config's requests into what this device actually gets:

* ``train.precision: auto`` -> bf16 autocast where the hardware computes bf16 natively (a CUDA GPU
  with ``torch.cuda.is_bf16_supported()``, or a CPU with AMX or AVX512-BF16 units), otherwise fp32.
  On a CPU without those units bf16 is *emulated* and about 10x slower than fp32 (measured on the
  AVX2 development machine: ~17x in the sampler), so auto never picks it there. fp16 is never picked automatically: it
  needs loss scaling and buys nothing over bf16 on hardware that has both. Results stay within the
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
  there it measured ~9% slower on a shared machine: see the README's Speed section.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

import torch

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD_MAX = 32 * 2 ** 20


@dataclass(frozen=True)
class SpeedSettings:
    """What the sampler and the training step run with on this device (see the module docstring)."""

    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool
    reuse_cpu_memory: bool

    def describe(self) -> str:
        """One line for the log, e.g. ``precision fp32, channels_last, eager, cpu-malloc reuse``."""
        parts = [f"precision {self.precision}", "channels_last" if self.channels_last else "contiguous",
                 "torch.compile" if self.compile else "eager"]
        if self.reuse_cpu_memory:
            parts.append("cpu-malloc reuse")
        return ", ".join(parts)


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


def resolve_precision(requested: str, device: torch.device) -> str:
    """``train.precision`` -> fp32 | bf16 | fp16 ('auto': bf16 where :func:`hardware_bf16`, else
    fp32)."""
    if requested != "auto":
        return requested
    return "bf16" if hardware_bf16(device) else "fp32"


def resolve_compile(requested: str, device: torch.device, sampler_checkpointing: bool = False) -> bool:
    """``train.compile`` -> whether the sampler's energy runs through ``torch.compile`` ('auto':
    on CUDA only, and never together with sampler checkpointing)."""
    if requested == "auto":
        return device.type == "cuda" and not sampler_checkpointing
    return requested == "true"


def resolve_speed(train_cfg, device: torch.device, image_data: bool) -> SpeedSettings:
    """The one place where the speed switches of ``train_cfg`` (a ``TrainConfig``) are resolved for
    ``device``; ``image_data`` says whether the energy is convolutional (channels_last applies)."""
    return SpeedSettings(
        precision=resolve_precision(train_cfg.precision, device),
        channels_last=bool(train_cfg.channels_last and image_data),
        compile=resolve_compile(train_cfg.compile, device, train_cfg.sampler_checkpointing),
        reuse_cpu_memory=bool(train_cfg.reuse_cpu_memory and device.type == "cpu" and _glibc() is not None))


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
