"""Objectives where Z cancels in a difference or derivative of KL divergences.

Minimum probability flow with Langevin connectivity (``objective.kind=mpf``; Sohl-Dickstein,
Battaglino & DeWeese 2011, continuous-state form; Movellan 2008's minimum velocity): the initial
flow of probability out of the data under a dynamics that leaves p_theta invariant. The dynamics
here is one Metropolis-adjusted Langevin transition with step eps: from x the proposal is
``y = x - (eps^2/2) grad E(x) + eps z`` and the rate of x -> y is
``sqrt(r(x, y))`` with r the MALA ratio ``exp(E(x) - E(y)) q(x|y) / q(y|x)``, so that detailed
balance with p_theta holds. The flow out of the data is::

    K(theta) = E_{x ~ pD, z ~ N(0, I)} exp( 1/2 [E(x) - E(y)] + 1/2 [log q(x|y) - log q(y|x)] )

with the proposal (y and the q terms) computed on the frozen model, i.e. gradients only through
E(x) - E(y). At theta with p_theta = pD the weighted pairs (x, y) are exchangeable, so the gradient
vanishes: consistent at any eps. Relation to the other estimators: to first order in the weights
the gradient is (1/2) E[dE(x)/dtheta - dE(y)/dtheta], half the CD-1 gradient with one Langevin
step from the data, which Hyvarinen (2007) showed equals (eps^2/2) times the score-matching gradient
as eps -> 0; the MH-type weights make it a consistent objective at finite eps, which CD-1 is not.

Minimum KL contraction (``objective.kind=kl_contraction``; Lyu 2011) with Gaussian smoothing
Phi{p} = p * N(0, sigma^2 I) as the contraction::

    L(theta) = KL(pD || p_theta) - KL(Phi pD || Phi p_theta)
             = E_{x ~ pD}[E(x)] + E_{y ~ Phi pD}[ log E_{u ~ N(0, sigma^2 I)} exp(-E(y + u)) ] + const

(log Z cancels between the two KLs: (Phi p_theta)(y) = E_u exp(-E(y + u)) / Z). The data term is
exact; y = x + sigma n is one draw of the smoothed data per example; the inner expectation is
estimated by log-mean-exp over M draws of u (its gradient is the self-normalised importance
estimate of E_{p_theta(x'|y)}[dE(x')/dtheta], so L's gradient is a contrastive one whose negatives
are the model's posterior samples given the noisy data point). Log-mean-exp is biased low by
O(1/M) (Jensen); the bias vanishes as M grows. L >= const (Phi contracts KL) and = const iff
p_theta = pD.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ebmscale.sampling.mala import proposal_log_ratio

EnergyFn = Callable[[torch.Tensor], torch.Tensor]
# Standard-normal draws of a shape whose first dimension is the batch (a seam for world-size tests).
NormalFn = Callable[[tuple], torch.Tensor]
# Frozen-model energies and input gradients at a batch: (E (n,), dE/dx).
GradFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mpf_loss(energy_fn: EnergyFn, grad_fn: GradFn, x: torch.Tensor, eps: float,
             normal: NormalFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Probability flow K(theta) out of the batch ``x`` under one MALA transition of step ``eps``.
    ``energy_fn`` is the training forward (differentiated); ``grad_fn`` the frozen model's energy
    and gradient (for the proposal only). Returns (K, statistics)."""
    x = x.detach().float()
    n = x.shape[0]
    a = 0.5 * eps ** 2
    _, g_x = grad_fn(x)
    z = normal(tuple(x.shape)).to(x)
    y = (x - a * g_x + eps * z).detach()
    _, g_y = grad_fn(y)
    log_q = proposal_log_ratio(x, y, z, g_y, eps).detach()
    e = energy_fn(torch.cat([x, y])).float()
    e_x, e_y = e[:n], e[n:]
    half_log_r = 0.5 * (e_x - e_y + log_q)
    loss = torch.exp(half_log_r).mean()
    stats = {"loss": loss.detach(), "e_pos": e_x.mean().detach(), "e_neg": e_y.mean().detach(),
             "mpf_accept": torch.exp(2 * half_log_r.detach()).clamp(max=1.0).mean()}
    return loss, stats


def kl_contraction_loss(energy_fn: EnergyFn, x: torch.Tensor, sigma: float, samples: int,
                        normal: NormalFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L(theta) = E_pD[E(x)] + E_y log mean_m exp(-E(y + sigma u_m)), y = x + sigma n, for the
    batch ``x`` with ``samples`` (M) inner draws per example; one training forward over the
    n (1 + M) points. Returns (L, statistics)."""
    x = x.detach().float()
    n, shape = x.shape[0], tuple(x.shape[1:])
    y = x + sigma * normal((n, *shape)).to(x)
    u = sigma * normal((n, samples, *shape)).to(x)
    pts = (y.unsqueeze(1) + u).reshape(n * samples, *shape)
    e = energy_fn(torch.cat([x, pts])).float()
    e_x, e_pts = e[:n], e[n:].view(n, samples)
    lme = torch.logsumexp(-e_pts, dim=1) - math.log(samples)
    loss = e_x.mean() + lme.mean()
    stats = {"loss": loss.detach(), "e_pos": e_x.mean().detach(), "e_neg": e_pts.mean().detach()}
    return loss, stats
