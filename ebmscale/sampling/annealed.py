"""Annealed Langevin dynamics for noise-conditional energies (Song & Ermon 2019; the energy form of
Song & Ermon 2020's "NCSNv2" scaling).

A noise-conditional energy models the data smoothed at every noise std sigma with one network:
E(x, sigma) = E(x) / sigma, so its score there is s(x, sigma) = -grad E(x) / sigma
(``objective.noise_conditional``; score matching and LSD train it on log-uniform sigma with
weight sigma^2). Far from the data only a large sigma's density is accurate, close to it only a
small one's, so the chains walk down a geometric ladder sigma_1 = sigma_max > ... > sigma_L =
sigma_min, ``steps`` proper Langevin steps at each level on E(x) / sigma_i with a step that
shrinks with the level:

    alpha_i = r sigma_i^2        (r = sampler.step_size, e.g. 0.1-0.5)
    x <- x - (alpha_i / 2) grad E(x) / sigma_i + sqrt(alpha_i) z,   z ~ N(0, I)

so that every level takes the same number of its own relaxation times (r is NCSN's
epsilon / sigma_L^2, independent of the ladder's ends). The chains end as
samples of the data smoothed at sigma_min; one denoising step (Tweedie's formula, the posterior
mean E[x | x~] = x~ + sigma^2 s(x~, sigma)) then gives

    x <- x - sigma_min grad E(x)

Only the final samples are clamped to the data range (the noisy levels leave it by design).
Each level is :func:`~ebmscale.sampling.langevin.langevin` of kind ``langevin`` on the scaled
energy, so mixed precision, fp16 input-gradient scaling, injected noise and trajectories work as
for the other kinds; ``grads`` collects the gradients of E(x) / sigma_i.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ebmscale.sampling.langevin import EnergyFn, InputGradScaler, LangevinSettings, NoiseFn, langevin
from ebmscale.sampling.mala import energy_and_grad


def noise_levels(settings: LangevinSettings) -> list[float]:
    """sigma_1 > ... > sigma_L: ``settings.levels`` geometric steps from sigma_max to sigma_min."""
    hi, lo, n = settings.sigma_max, settings.sigma_min, settings.levels
    if n == 1:
        return [lo]
    return [hi * (lo / hi) ** (i / (n - 1)) for i in range(n)]


def annealed_langevin(energy_fn: EnergyFn, x0: torch.Tensor, settings: LangevinSettings,
                      generator: torch.Generator | None = None, *, autocast_dtype: torch.dtype | None = None,
                      trajectory: list | None = None, grads: list | None = None, noise_fn: NoiseFn | None = None,
                      grad_scaler: InputGradScaler | None = None, stats: dict | None = None) -> torch.Tensor:
    """``settings.steps`` Langevin steps at each of :func:`noise_levels` on ``energy_fn(x) / sigma``
    from ``x0``, then the denoising step; returns the final chains (fp32, detached, clamped to
    ``settings.clamp`` when set). Arguments as :func:`~ebmscale.sampling.langevin.langevin`
    (``stats`` is unused: there is no accept/reject)."""
    if autocast_dtype == torch.float16 and grad_scaler is None:
        grad_scaler = InputGradScaler()  # one scale across the levels, as across a chain's steps
    x = x0.detach().float()
    lo = settings.sigma_min
    for sigma in noise_levels(settings):
        alpha = settings.step_size * sigma ** 2
        level = dataclasses.replace(settings, kind="langevin", step_size=math.sqrt(alpha), grad_clip=0.0,
                                    clamp=None)
        x = langevin(lambda z, s=sigma: energy_fn(z) / s, x, level, generator, autocast_dtype=autocast_dtype,
                     trajectory=trajectory, grads=grads, noise_fn=noise_fn, grad_scaler=grad_scaler)
    _, grad = energy_and_grad(energy_fn, x, autocast_dtype=autocast_dtype, grad_scaler=grad_scaler)
    x = x - lo * grad
    if settings.clamp is not None:
        x = x.clamp(settings.clamp[0], settings.clamp[1])
    return x.detach()
