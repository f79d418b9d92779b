"""Noise-contrastive estimation (Gutmann & Hyvarinen 2010): density estimation as classification
of data against samples of a known noise density p_n, with log Z a learnable scalar c.

The model is ``log p_theta(x) = -E(x) - c``. With ``nu`` noise samples per data sample, the
classifier's logit is the log-ratio ``G(x) = log p_theta(x) - log p_n(x) - log nu`` and the loss
is the logistic one::

    L = -E_pD[log sigmoid(G(x))] - nu E_pn[log(1 - sigmoid(G(y)))]

At its optimum p_theta = pD, so c is the log partition function of the learned energy. The
noise must cover the data (a Gaussian fitted to it, or uniform over the data's box) and have a
tractable log-density.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ebmscale import dist
from ebmscale.sampling import uniform_noise

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianNoise:
    """N(mean, cov) on flat vectors, with exact sampling and log density."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor):
        self.mean = mean.detach().double()
        self.cov = cov.detach().double()
        self.chol = torch.linalg.cholesky(self.cov)

    @classmethod
    def fit(cls, x: torch.Tensor, scale: float = 1.0, jitter: float = 1e-4) -> "GaussianNoise":
        """Mean and covariance of ``x`` (flattened per sample), the covariance times ``scale^2``,
        averaged over data-parallel ranks so that every rank uses the same noise."""
        x = x.detach().flatten(1).double()
        d = x.shape[1]
        moments = torch.cat([x.sum(0), (x.T @ x).reshape(-1), torch.tensor([float(len(x))], dtype=torch.float64)])
        dist.all_reduce_sum(moments)
        n = moments[-1]
        mean = moments[:d] / n
        cov = moments[d:d + d * d].reshape(d, d) / n - torch.outer(mean, mean)
        cov = scale ** 2 * cov + jitter * torch.eye(d, dtype=torch.float64)
        return cls(mean, cov)

    def sample(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        eps = torch.randn(n, self.mean.numel(), generator=generator, device=device, dtype=torch.float64)
        return (self.mean.to(device) + eps @ self.chol.to(device).T).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        diff = (x.flatten(1).double() - self.mean.to(x.device))
        sol = torch.linalg.solve_triangular(self.chol.to(x.device), diff.T, upper=False)
        d = diff.shape[1]
        return (-0.5 * (sol ** 2).sum(0) - 0.5 * d * _LOG_2PI - torch.log(torch.diagonal(self.chol)).sum().to(x.device)).float()

    def state_dict(self) -> dict:
        return {"kind": "gaussian", "mean": self.mean, "cov": self.cov}


class UniformNoise:
    """Uniform on the box ``[lo, hi]^d``."""

    def __init__(self, lo: float, hi: float, dim: int):
        self.lo, self.hi, self.dim = float(lo), float(hi), int(dim)

    def sample(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        return uniform_noise(n, (self.dim,), (self.lo, self.hi), generator, device)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        inside = ((x >= self.lo) & (x <= self.hi)).all(1)
        lp = -self.dim * math.log(self.hi - self.lo)
        return torch.where(inside, torch.full_like(x[:, 0], lp), torch.full_like(x[:, 0], -math.inf))

    def state_dict(self) -> dict:
        return {"kind": "uniform", "lo": self.lo, "hi": self.hi, "dim": self.dim}


def noise_from_state(state: dict) -> GaussianNoise | UniformNoise:
    """Rebuild a noise distribution from its ``state_dict``."""
    if state["kind"] == "gaussian":
        return GaussianNoise(torch.as_tensor(state["mean"]), torch.as_tensor(state["cov"]))
    return UniformNoise(state["lo"], state["hi"], state["dim"])


def nce_loss(e_data: torch.Tensor, e_noise: torch.Tensor, log_pn_data: torch.Tensor, log_pn_noise: torch.Tensor,
             log_z: torch.Tensor, nu: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The NCE loss from the energies and noise log-densities of ``n`` data and ``nu * n`` noise
    samples, with the learnable ``log_z`` (a scalar tensor)."""
    log_nu = math.log(nu)
    g_data = -e_data.float() - log_z - log_pn_data - log_nu
    g_noise = -e_noise.float() - log_z - log_pn_noise - log_nu
    # -log sigmoid(g) = softplus(-g); -log(1 - sigmoid(g)) = softplus(g). The noise term is a mean
    # over nu*n samples times nu, i.e. nu per data sample.
    loss = F.softplus(-g_data).mean() + nu * F.softplus(g_noise).mean()
    acc = 0.5 * ((g_data > 0).float().mean() + (g_noise < 0).float().mean())
    stats = {"loss": loss.detach(), "e_pos": e_data.float().mean().detach(), "e_neg": e_noise.float().mean().detach(),
             "log_z": log_z.detach().reshape(()), "nce_acc": acc.detach()}
    return loss, stats
