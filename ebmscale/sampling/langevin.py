"""Langevin MCMC over an energy function.

Two parametrisations, both common in the literature:

* ``langevin`` (proper, unadjusted Langevin):  x <- x - (eps^2 / 2) * dE/dx + eps * N(0, I).
  For small eps its stationary law is p(x) ∝ exp(-E(x)), so it samples the model itself.
* ``sgld`` (what IGEBM and JEM actually run):   x <- x - a * dE/dx + sigma * N(0, I), with the
  gradient weight ``a`` and the noise ``sigma`` chosen independently (JEM: a = 1, sigma = 0.01;
  IGEBM: a = 10, sigma = 0.005). This equals proper Langevin on the tempered density
  exp(-E / T) with T = sigma^2 / (2a) -- e.g. T = 5e-5 for JEM -- so it is a noisy gradient
  descent that finds low-energy modes rather than a sampler of exp(-E). The training signal
  still works because the model learns to shape its energy for *that* sampler.

The sampler is pure: it never accumulates parameter gradients (only d E / d x is taken, with the
parameters' ``requires_grad`` switched off by :func:`sampling_mode`), and it never advances the
spectral-norm power iteration (the module is in eval mode while sampling). It is called with
the *unwrapped* module, so it costs no collective communication under DDP or DeepSpeed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LangevinSettings:
    """Settings of one sampler call (built from ``SamplerConfig``)."""

    steps: int = 20
    step_size: float = 1.0
    noise_std: float = 0.01
    kind: str = "sgld"  # "sgld" | "langevin"
    grad_clip: float = 0.0  # per-step L-inf clip of dE/dx (IGEBM's 0.01); 0 = off
    clamp: tuple[float, float] | None = None  # data range, applied after every step

    @classmethod
    def from_config(cls, cfg, clamp_range: tuple[float, float] | None) -> "LangevinSettings":
        return cls(steps=cfg.steps, step_size=cfg.step_size, noise_std=cfg.noise_std, kind=cfg.kind,
                   grad_clip=cfg.grad_clip, clamp=clamp_range if cfg.clamp else None)

    def coefficients(self) -> tuple[float, float]:
        """(gradient weight, noise std) of one step."""
        if self.kind == "langevin":
            return 0.5 * self.step_size ** 2, self.step_size
        return self.step_size, self.noise_std


@contextlib.contextmanager
def sampling_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in the state the sampler needs and restore it afterwards: eval mode (no
    spectral-norm power iteration, no dropout) and parameters with ``requires_grad=False`` (no
    parameter-gradient graph is built, so sampling is cheaper and cannot touch ``.grad``)."""
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, req in flags:
            p.requires_grad_(req)
        module.train(was_training)


def langevin(energy_fn: EnergyFn, x0: torch.Tensor, settings: LangevinSettings,
             generator: torch.Generator | None = None, *, autocast_dtype: torch.dtype | None = None,
             trajectory: list | None = None) -> torch.Tensor:
    """Run ``settings.steps`` Langevin steps from ``x0`` and return the final chains (detached,
    same dtype as ``x0``, which should be float32). ``energy_fn`` maps a batch to per-sample
    energies; it is evaluated under autocast when ``autocast_dtype`` is given, while the chains
    themselves stay in float32. Noise comes only from ``generator``."""
    a, sigma = settings.coefficients()
    x = x0.detach().clone()
    device_type = x.device.type
    for _ in range(settings.steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            if autocast_dtype is not None:
                with torch.autocast(device_type=device_type, dtype=autocast_dtype):
                    e = energy_fn(x)
            else:
                e = energy_fn(x)
            (grad,) = torch.autograd.grad(e.float().sum(), x)
        grad = grad.float()
        if settings.grad_clip > 0:
            grad = grad.clamp(-settings.grad_clip, settings.grad_clip)
        x = x.detach() - a * grad
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if settings.clamp is not None:
            x = x.clamp(settings.clamp[0], settings.clamp[1])
        if trajectory is not None:
            trajectory.append(x.detach().clone())
    return x.detach()


def uniform_noise(n: int, shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Fresh chain starts, uniform over the data range (IGEBM/JEM's noise initialisation)."""
    lo, hi = bounds
    return torch.rand((n, *shape), generator=generator, device=device) * (hi - lo) + lo
