"""Kernel Stein discrepancy (Liu, Lee & Jordan 2016; Chwialkowski et al. 2016) with an RBF kernel.

The Stein discrepancy needs only the model score s = -dE/dx (no Z). Over the unit ball of an RKHS
with kernel k its square has the closed form ``KSD^2 = E_{x, x' ~ pD}[u(x, x')]`` with::

    u(x, x') = s(x)^T s(x') k(x, x') + s(x)^T grad_x' k(x, x') + grad_x k(x, x')^T s(x')
               + tr(grad_x grad_x' k(x, x'))

For ``k = exp(-||x - x'||^2 / (2 h^2))``, with ``r = x - x'``: ``grad_x' k = k r / h^2``,
``grad_x k = -k r / h^2`` and the trace is ``k (d / h^2 - ||r||^2 / h^4)``. The estimator is the
U-statistic (mean over pairs i != j), unbiased for KSD^2; it is ~0 (up to noise, possibly
negative) when the samples come from the model. Training minimises it in theta through s.

Bandwidth: ``h`` given, or the median heuristic ``h = median pairwise distance`` of the batch.
Cost is O(n^2) kernel entries per batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from ebmscale.objectives.score_matching import energy_and_score

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


def median_bandwidth(x: torch.Tensor) -> torch.Tensor:
    """Median heuristic: the median distance between distinct points of ``x`` (flattened)."""
    x = x.detach().flatten(1)
    d = torch.cdist(x, x)
    off = d[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
    return off.median().clamp_min(1e-6)


def ksd_u_statistic(x: torch.Tensor, score: torch.Tensor, bandwidth: float | torch.Tensor) -> torch.Tensor:
    """The U-statistic of KSD^2 for points ``x`` (no gradient needed through them) and the model
    score at them (gradients flow through ``score``)."""
    x = x.detach().flatten(1).float()
    s = score.flatten(1)
    n, d = x.shape
    h2 = torch.as_tensor(bandwidth, dtype=x.dtype, device=x.device) ** 2
    r = x[:, None, :] - x[None, :, :]  # (n, n, d): r_ij = x_i - x_j
    r2 = (r ** 2).sum(-1)
    k = torch.exp(-0.5 * r2 / h2)
    t_ss = (s @ s.T) * k
    t_sk = (s[:, None, :] * r).sum(-1) / h2 * k      # s(x_i)^T grad_{x_j} k
    t_ks = -(s[None, :, :] * r).sum(-1) / h2 * k     # grad_{x_i} k^T s(x_j)
    t_kk = (d / h2 - r2 / h2 ** 2) * k
    u = t_ss + t_sk + t_ks + t_kk
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return u[off].mean()


def ksd_loss(energy_fn: EnergyFn, x: torch.Tensor, bandwidth: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KSD^2 (U-statistic) of the model against the batch ``x``; ``bandwidth`` 0 = median heuristic."""
    x = x.detach().float().requires_grad_(True)
    e, s = energy_and_score(energy_fn, x)
    h = median_bandwidth(x) if bandwidth <= 0 else torch.tensor(float(bandwidth))
    loss = ksd_u_statistic(x, s, h)
    return loss, {"loss": loss.detach(), "e_pos": e.mean().detach(), "ksd_bandwidth": h.detach().reshape(())}
