"""Learned Stein discrepancy (Grathwohl, Wang, Jacobsen, Duvenaud & Zemel 2020).

The Stein discrepancy of the model against the data over a critic class F needs only the model's
score s = -dE/dx::

    S(theta, f) = E_{x ~ pD}[ s_theta(x)^T f(x) + tr(d f / d x) ]

By Stein's identity E_pD[tr(df/dx)] = -E_pD[s_D^T f], so S = E_pD[(s_theta - s_D)^T f]: zero for
every f iff the scores agree. With f a network and an L2 penalty, the critic maximises
``S(theta, f) - lambda E_pD ||f||^2``, whose maximiser is ``f* = (s_theta - s_D) / (2 lambda)`` and
whose maximum is the Fisher divergence ``E_pD ||s_theta - s_D||^2 / (4 lambda)``. The model
minimises ``S(theta, f)`` at the current critic (theta enters through s_theta only: one double
backward, as in score matching).

Noise-conditional (``objective.noise_conditional``): the model at noise std sigma is E(x) / sigma,
trained on data smoothed at log-uniform sigma. The discrepancy at level sigma is weighted by
sigma^2 (as denoising score matching's) and the critic written f = g / sigma, so an example's
terms are ``sigma (s^T g + tr dg/dx) - lambda ||g||^2`` with s = -grad E / sigma: the optimal
critic is g* = sigma (s_theta - s_D) / (2 lambda) and the maximum the sigma^2-weighted Fisher
divergence, every level on the same scale with one critic g (which, like the energy, infers the
level from x).

The trace is exact (one backward per input dimension; low dimension) or Hutchinson's estimate
``E_v[v^T (df/dx) v]`` with Rademacher v (one backward; images): unbiased, so the critic's
stochastic gradient stays unbiased. When the data were noised by a known Gaussian kernel,
x~ = x + sigma eps (noise-conditional training), the trace is not needed at all: Stein's identity
for the smoothed data q and Vincent's denoising identity give
``E_q[tr(df/dx)] = -E_q[s_q^T f] = E[(eps / sigma)^T f(x~)]``, so the Stein term is estimated as
``(s_theta + eps / sigma)^T f`` (``objective.lsd_trace=denoising``). The expectation, and so the
critic's optimum and value, are the same; the critic's step is then a regression onto the
noisy residual (sigma s_theta + eps) / (2 lambda) with no second derivative through the critic,
as denoising score matching is to implicit score matching.
"""
from __future__ import annotations

from typing import Callable

import torch

from ebmscale.objectives.score_matching import energy_and_score

EnergyFn = Callable[[torch.Tensor], torch.Tensor]
CriticFn = Callable[[torch.Tensor], torch.Tensor]
# Rademacher/normal draws of a shape whose first dimension is the batch.
NormalFn = Callable[[tuple], torch.Tensor]


def _flat_sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def critic_trace(f: torch.Tensor, x: torch.Tensor, exact: bool, normal: NormalFn | None = None) -> torch.Tensor:
    """tr(df/dx) per sample (graph kept): exact (one backward per dimension) or Hutchinson with
    one Rademacher probe (sign of ``normal``'s draws)."""
    if exact:
        flat, trace = f.flatten(1), torch.zeros(f.shape[0], device=f.device)
        for i in range(flat.shape[1]):
            (gi,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=True)
            trace = trace + gi.flatten(1)[:, i]
        return trace
    v = torch.sign(normal(tuple(x.shape)).to(x))
    v = torch.where(v == 0, torch.ones_like(v), v)
    (jv,) = torch.autograd.grad(_flat_sum(f * v).sum(), x, create_graph=True)
    return _flat_sum(jv * v)


def critic_loss(critic: CriticFn, x: torch.Tensor, score: torch.Tensor, l2: float, exact_trace: bool,
                normal: NormalFn | None = None, weight: torch.Tensor | None = None,
                kernel_score: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's loss ``-(S(theta, f) - l2 E||f||^2)`` at the batch ``x`` with the model's score
    ``score`` held fixed (detached). ``stats["lsd"]`` is the penalised discrepancy (what the critic
    maximises; at the optimum the Fisher divergence / (4 l2)). ``weight`` (per example) scales each
    example's Stein term: a noise-conditional model weights level sigma's by sigma (see
    :func:`model_loss`). ``kernel_score``, the noising kernel's score grad log q(x | x_clean) =
    -eps / sigma at each example, replaces the trace by the denoising identity (module docstring)."""
    x = x.detach().float().requires_grad_(kernel_score is None)  # only a trace differentiates f in x
    f = critic(x).float()
    if kernel_score is None:
        trace = critic_trace(f, x, exact_trace, normal)
    else:
        trace = -_flat_sum(kernel_score.detach().float() * f)
    stein = _flat_sum(score.detach().float() * f) + trace
    if weight is not None:
        stein = weight * stein
    penalised = stein.mean() - l2 * _flat_sum(f ** 2).mean()
    return -penalised, {"lsd": penalised.detach(), "lsd_stein": stein.mean().detach(),
                        "critic_norm": _flat_sum(f ** 2).mean().sqrt().detach()}


def skip_critic(field: CriticFn, grad: torch.Tensor, l2: float) -> CriticFn:
    """The noise-conditional critic with a skip, ``g(x) = (u(x) - grad E(x)) / (2 l2)`` at the batch
    whose energy gradient is ``grad`` (held fixed), ``u = field``. The optimum g* = sigma (s_theta -
    s_D) / (2 l2) = (E[eps | x~] - grad E) / (2 l2) then needs u* = E[eps | x~], a target that does
    not move with the model, instead of a network re-learning the model's score after every model
    step (the critic's lag). The same Stein objective and optimum; with the denoising identity the
    network's step is a denoising regression, and the model's step pulls grad E towards u."""
    fixed = grad.detach().float()
    return lambda x: (field(x) - fixed) / (2 * l2)


def model_loss(energy_fn: EnergyFn, f: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's loss ``E_pD[s_theta(x)^T f(x)]`` (the part of S that depends on theta) at the
    critic's values ``f`` (detached); gradients reach theta through the score (double backward).
    Noise-conditional models need no change: level sigma's weight sigma cancels the score's
    1 / sigma, leaving ``-grad E(x)^T g(x)``."""
    x = x.detach().float().requires_grad_(True)
    e, s = energy_and_score(energy_fn, x)
    loss = _flat_sum(s * f.detach().float()).mean()
    return loss, {"loss": loss.detach(), "e_pos": e.mean().detach()}
