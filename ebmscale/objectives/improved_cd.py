"""The KL and entropy terms of improved contrastive divergence (Du, Li, Tenenbaum & Mordatch 2021).

PCD's surrogate mean E(x+) - mean E(x-) stops gradients at the chains, which drops the part of the
gradient that flows through the sampler: with truncated chains q_theta (the law of the sampler's
output) is not p_theta, and the missing term is the gradient of KL(q_theta || p_theta) with respect
to the sampler's own dependence on theta. Du et al. add

    L_KL = E_{x~ ~ q_theta}[ E_{stop(theta)}(x~) ] - H(q_theta)

where x~ is the chain after its last sampler step, differentiated through that step (the update
x~ = x' - a clip(dE_theta/dx (x')) + sigma z with x' the chain before it, detached), while the
energy evaluated at x~ has its parameters frozen (stop(theta)): only the sampler's path carries
theta's gradient. Since dL/dtheta = (dE_stop/dx at x~)^T dx~/dtheta, the term is computed as the
surrogate ``sum(g . x~)`` with g the frozen model's input gradient at x~ (same gradient, no copy of
the parameters). Its value is reported as ``kl_energy`` = mean E(x~).

The entropy H(q_theta) is a nearest-neighbour estimate (Kozachenko-Leonenko, up to the factor d
and constants, as in Du et al.'s code): H ~ mean_i log min_j ||x~_i - b_j|| over a batch b of past
samples (chains from the replay buffer, read without changing it), differentiable in x~.

The full term (``objective.kl_weight`` w, ``objective.entropy_weight`` lambda, 1 = the KL):
    loss = PCD loss + w * ( mean_i g_i . x~_i  -  lambda * mean_i log min_j ||x~_i - b_j|| ).
"""
from __future__ import annotations

from typing import Callable

import torch

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


def differentiable_step(energy_fn: EnergyFn, x_prev: torch.Tensor, grad_weight: float, noise_std: float,
                        noise: torch.Tensor | None, grad_clip: float = 0.0,
                        clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """One sampler step from ``x_prev`` (detached) whose result keeps the graph to the energy's
    parameters: x~ = x' - a clip(dE/dx(x')) + sigma z (then clamped), dE/dx with create_graph."""
    x = x_prev.detach().requires_grad_(True)  # the chains' dtype (fp32; fp64 in the gradient check)
    (g,) = torch.autograd.grad(energy_fn(x).sum(), x, create_graph=True)
    g = g.to(x.dtype)
    if grad_clip > 0:
        g = g.clamp(-grad_clip, grad_clip)
    out = x.detach() - grad_weight * g
    if noise_std > 0 and noise is not None:
        out = out + noise_std * noise
    if clamp is not None:
        out = out.clamp(clamp[0], clamp[1])
    return out


def kl_surrogate(x_tilde: torch.Tensor, frozen_grad: torch.Tensor) -> torch.Tensor:
    """mean_i g_i . x~_i: its theta-gradient is that of mean E_stop(x~(theta))."""
    return (frozen_grad.detach().to(x_tilde.dtype) * x_tilde).flatten(1).sum(1).mean()


def nn_entropy(x: torch.Tensor, past: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Nearest-neighbour entropy estimate, mean_i log min_j ||x_i - past_j|| (differentiable in x)."""
    d = torch.cdist(x.float().flatten(1), past.detach().float().flatten(1))
    return torch.log(d.min(dim=1).values + eps).mean()
