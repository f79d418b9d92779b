"""Metropolis-adjusted Langevin (MALA): Langevin proposals with an accept/reject step.

Unadjusted Langevin (``kind=langevin``) samples exp(-E) only as eps -> 0: at a finite step its
stationary law is biased (for a Gaussian of precision lambda the variance comes out
1 / (lambda (1 - eps^2 lambda / 4))). MALA removes that bias with a Metropolis-Hastings test
(Roberts & Tweedie 1996). One step from x with energy gradient g(x):

    proposal    y = x - (eps^2 / 2) clip(g(x)) + eps z,       z ~ N(0, I)
    log ratio   log r = E(x) - E(y) + log q(x | y) - log q(y | x)
                      = E(x) - E(y) - (||w||^2 - ||z||^2) / 2,  w = (x - y + (eps^2/2) clip(g(y))) / eps
    accept      with probability min(1, r), per chain; otherwise the chain stays at x.

The chain then leaves exp(-E) exactly invariant at any eps (the step size only trades acceptance
for move length). ``grad_clip`` changes the drift, not the correctness: the same clipped drift
enters both proposal densities. With ``clamp`` (a data range) a proposal that leaves the range is
rejected -- the exact MH rule for the density restricted to the range -- instead of projected
back, which would break the proposal density. For images near the range's edge this rejects
often: watch the acceptance rate (reported per step as ``accept_rate``).

Numerics: energies are evaluated under autocast like the other kinds, but the energies entering
the ratio are cast to fp32 and the ratio is formed in fp32; ``||w||^2 - ||z||^2`` is computed as
``sum((w - z)(w + z))`` so that two sums of size d do not cancel. The energy and gradient of an
accepted proposal are kept, so a step costs one forward and one backward (plus one at the start).
A proposal with a non-finite energy is rejected. Randomness per step: the proposal noise (from
``noise_fn`` when given, else the generator), then one uniform per chain from the generator.
"""
from __future__ import annotations

import torch

from ebmscale.sampling.langevin import EnergyFn, InputGradScaler, LangevinSettings, NoiseFn


def energy_and_grad(energy_fn: EnergyFn, x: torch.Tensor, *, autocast_dtype: torch.dtype | None = None,
                    grad_scaler: InputGradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample energies (fp32, detached, shape ``(n,)``) and the fp32 input gradient of their
    sum at ``x``, the energy under autocast when ``autocast_dtype`` is given (fp16: loss-scaled by
    ``grad_scaler``). The model's parameters should be frozen (:func:`sampling_mode`)."""
    z = x.detach().requires_grad_(True)
    n = x.shape[0]
    holder: list[torch.Tensor] = []

    def summed() -> torch.Tensor:
        if autocast_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
                e = energy_fn(z)
        else:
            e = energy_fn(z)
        e = e.float().reshape(n)
        holder[:] = [e]
        return e.sum()

    with torch.enable_grad():
        if grad_scaler is not None and autocast_dtype == torch.float16:
            g = grad_scaler.grad(summed, z)
        else:
            (g,) = torch.autograd.grad(summed(), z)
    return holder[0].detach(), g.float().detach()


def proposal_log_ratio(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, drift_y: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """log q(x | y) - log q(y | x) per sample for the Langevin proposal
    ``y = x - (eps^2/2) drift(x) + eps z`` (``drift_y`` = the drift at y): -(||w||^2 - ||z||^2)/2
    with ``w = (x - y + (eps^2/2) drift_y) / eps``, summed as (w - z)(w + z) in fp32."""
    w = (x - y + 0.5 * eps ** 2 * drift_y) / eps
    return -0.5 * ((w - z) * (w + z)).flatten(1).sum(1)


def mala(energy_fn: EnergyFn, x0: torch.Tensor, settings: LangevinSettings,
         generator: torch.Generator | None = None, *, autocast_dtype: torch.dtype | None = None,
         trajectory: list | None = None, grads: list | None = None, noise_fn: NoiseFn | None = None,
         grad_scaler: InputGradScaler | None = None, stats: dict | None = None) -> torch.Tensor:
    """``settings.steps`` MALA steps from ``x0`` with step ``eps = settings.step_size``; the
    arguments are :func:`ebmscale.sampling.langevin`'s. ``stats``, when given, accumulates
    ``mala_accepted`` and ``mala_proposed`` (chain-steps), summed over calls."""
    eps = float(settings.step_size)
    if not eps > 0:
        raise ValueError(f"MALA needs a positive step size, got {eps}")
    a = 0.5 * eps ** 2
    x = x0.detach().clone()
    n = x.shape[0]
    if settings.steps == 0:  # no step, no energy evaluation
        return x
    if autocast_dtype == torch.float16 and grad_scaler is None:
        grad_scaler = InputGradScaler()
    scaler = grad_scaler if autocast_dtype == torch.float16 else None

    def grad_of(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return energy_and_grad(energy_fn, z, autocast_dtype=autocast_dtype, grad_scaler=scaler)

    def drift(g: torch.Tensor) -> torch.Tensor:
        return g.clamp(-settings.grad_clip, settings.grad_clip) if settings.grad_clip > 0 else g

    def per_chain(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, *([1] * (x.dim() - 1)))

    e, g = grad_of(x)
    accepted = 0
    for _ in range(settings.steps):
        if grads is not None:
            grads.append(g.clone())
        z = (noise_fn(x) if noise_fn is not None
             else torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)).float()
        y = x - a * drift(g) + eps * z
        e_y, g_y = grad_of(y)
        log_r = (e - e_y) + proposal_log_ratio(x, y, z, drift(g_y), eps)
        u = torch.rand(n, device=x.device, generator=generator)
        ok = torch.log(u) < log_r  # False for a NaN ratio: a non-finite proposal is rejected
        if settings.clamp is not None:
            lo, hi = settings.clamp
            ok &= ((y >= lo) & (y <= hi)).flatten(1).all(1)
        accepted += int(ok.sum())
        x = torch.where(per_chain(ok), y, x)
        g = torch.where(per_chain(ok), g_y, g)
        e = torch.where(ok, e_y, e)
        if trajectory is not None:
            trajectory.append(x.detach().clone())
    if stats is not None:
        stats["mala_accepted"] = stats.get("mala_accepted", 0) + accepted
        stats["mala_proposed"] = stats.get("mala_proposed", 0) + n * settings.steps
    return x.detach()


def acceptance_rate(stats: dict) -> float | None:
    """Accepted / proposed chain-steps from the counts :func:`mala` accumulates (None: no proposal)."""
    proposed = stats.get("mala_proposed", 0)
    return None if not proposed else stats.get("mala_accepted", 0) / proposed
