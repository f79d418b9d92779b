"""Score matching: fit the model score s_theta(x) = -dE/dx to the data's, with no Z_theta.

Fisher divergence, rewritten by integration by parts (Hyvarinen 2005) so the unknown data score
drops out::

    J(theta) = E_pD[ 1/2 ||s_theta(x)||^2 + tr(J_x s_theta(x)) ]        (= D_F(pD || p_theta) - const)

Three estimators of it (each differentiable in theta: the input gradients are taken with
``create_graph=True`` so the loss back-propagates through them):

* :func:`exact_sm_loss` -- the trace computed exactly, one extra backward pass per input
  dimension: O(d) backward passes, so only for low dimension.
* :func:`ssm_loss` -- sliced score matching (Song et al. 2019): tr(J) replaced by v^T J v with
  v ~ N(0, I) (one Hessian-vector product per projection). ``variance_reduced`` keeps
  1/2 ||s||^2 exact instead of 1/2 (v^T s)^2 (SSM-VR). Unbiased for J in both forms.
* :func:`dsm_loss` -- denoising score matching (Vincent 2011): no second derivative of the
  loss in x, the model score at x~ = x + sigma eps regresses the known conditional score
  (x - x~) / sigma^2 = -eps / sigma. It is exactly score matching *of the noised data*
  q_sigma = pD * N(0, sigma^2 I) plus a constant::

      E ||s(x~) + eps/sigma||^2 / 2 = E_{q_sigma}[1/2 ||s||^2 + tr J_s] + d / (2 sigma^2)

  so it learns q_sigma, not pD: the documented noise bias. For a Gaussian model with precision
  P it is J(theta) + sigma^2 tr(P^2) / 2. The loss is reported weighted by sigma^2 (the
  weighting of Song & Ermon 2019), which makes levels comparable; with several levels each
  sample draws its own sigma from the list. Noise-conditional (``sigma_range``): the energy at
  level sigma is E(x) / sigma, one network for a continuum of levels (sampled by annealed
  Langevin, :mod:`ebmscale.sampling.annealed`).

The energy's first derivatives (and the second derivatives inside the loss's backward) go through
whatever ``energy_fn`` is, e.g. the data-parallel wrapper: DDP's hooks sit on the parameters'
gradient accumulation, which only the final ``backward`` reaches.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


def energy_and_score(energy_fn: EnergyFn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(energies (N,), score s = -dE/dx of x's shape) with the graph kept for differentiation.
    ``x`` must require grad (a leaf made for this)."""
    e = energy_fn(x).float().reshape(-1)
    (g,) = torch.autograd.grad(e.sum(), x, create_graph=True)
    return e, -g.float()


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().requires_grad_(True)


def _flat_sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def exact_sm_loss(energy_fn: EnergyFn, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hyvarinen's objective with the exact trace of the score's Jacobian (d extra backward passes)."""
    x = _leaf(x)
    e, s = energy_and_score(energy_fn, x)
    flat = s.flatten(1)
    trace = torch.zeros_like(e)
    for i in range(flat.shape[1]):
        (gi,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=True)
        trace = trace + gi.flatten(1)[:, i]
    sq = 0.5 * (flat ** 2).sum(1)
    per = sq + trace
    loss = per.mean()
    return loss, _stats(loss, e, sq)


def ssm_loss(energy_fn: EnergyFn, x: torch.Tensor, n_projections: int = 1, variance_reduced: bool = True,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sliced score matching with ``n_projections`` Gaussian directions per sample; with
    ``variance_reduced`` the 1/2 ||s||^2 term is exact (SSM-VR)."""
    x = _leaf(x)
    e, s = energy_and_score(energy_fn, x)
    sq = 0.5 * _flat_sum(s ** 2)
    total = torch.zeros_like(e)
    for _ in range(n_projections):
        v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        sv = _flat_sum(s * v)
        # d(v^T s)/dx = J^T v: one Hessian-vector product for every sample at once.
        (jv,) = torch.autograd.grad(sv.sum(), x, create_graph=True)
        vjv = _flat_sum(jv * v)
        total = total + (vjv if variance_reduced else vjv + 0.5 * sv ** 2)
    per = total / n_projections + (sq if variance_reduced else 0.0)
    loss = per.mean()
    return loss, _stats(loss, e, sq)


def log_uniform_sigmas(u: torch.Tensor, sigma_range: tuple[float, float]) -> torch.Tensor:
    """Noise stds log-uniform in ``sigma_range`` = (lo, hi) from uniforms ``u`` in [0, 1): every
    scale of a noise-conditional energy gets the same share of examples per octave."""
    lo, hi = float(sigma_range[0]), float(sigma_range[1])
    return lo * (hi / lo) ** u


def dsm_loss(energy_fn: EnergyFn, x: torch.Tensor, sigmas: Sequence[float],
             generator: torch.Generator | None = None, *,
             sigma_range: tuple[float, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Denoising score matching, sigma^2-weighted: mean of ``1/2 ||sigma s(x + sigma eps) + eps||^2``
    with each sample's sigma drawn uniformly from ``sigmas``. With ``sigma_range`` the energy is
    noise-conditional, E(x) / sigma (score ``-grad E / sigma``), each sample's sigma log-uniform in
    the range (``sigmas`` unused): the loss is then ``1/2 ||eps - grad E(x~)||^2``, the same scale at
    every level."""
    x = x.detach().float()
    n = x.shape[0]
    if sigma_range is not None:
        sig = log_uniform_sigmas(torch.rand(n, generator=generator, device=x.device), sigma_range)
    else:
        levels = torch.tensor([float(s) for s in sigmas], device=x.device)
        sig = levels[torch.randint(len(levels), (n,), generator=generator, device=x.device)]
    sig = sig.view(n, *([1] * (x.dim() - 1)))
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    xt = (x + sig * eps).requires_grad_(True)
    e, s = energy_and_score(energy_fn, xt)
    if sigma_range is not None:
        s = s / sig
    per = 0.5 * _flat_sum((sig * s + eps) ** 2)
    loss = per.mean()
    return loss, _stats(loss, e, 0.5 * _flat_sum(s ** 2))


def _stats(loss: torch.Tensor, e: torch.Tensor, half_sq_score: torch.Tensor) -> dict[str, torch.Tensor]:
    # e_pos feeds the trainer's divergence check (|E| limit) like the contrastive objectives'.
    return {"loss": loss.detach(), "e_pos": e.mean().detach(),
            "score_norm": (2.0 * half_sq_score).sqrt().mean().detach()}
