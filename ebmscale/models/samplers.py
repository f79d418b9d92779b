"""Learned samplers q_phi for adversarial EBM training (pure nn.Modules, no training code).

Two families, the two sides of the "tractable entropy" trade-off:

* :class:`NoisyGenerator` -- ``x = g_phi(z) + sigma * eps`` with ``z, eps ~ N(0, I)``: any
  architecture, but ``H(q_phi)`` is intractable; only its gradient is estimated (see
  ``ebmscale.objectives.adversarial``). Like a GAN generator with output noise.
* :class:`CouplingFlow` -- a RealNVP-style normalising flow ``x = f_phi(z)`` of affine coupling
  layers: invertible with an exact ``log |det J|``, so ``log q_phi(x)`` and ``H(q_phi)`` are
  exact.

Both work on flat vectors of ``dim`` numbers (a sample of any shape is flattened by the caller).
Every ``sample`` takes an explicit ``torch.Generator``, so the draws are reproducible per rank
and step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ebmscale.models.common import make_activation

__all__ = ["NoisyGenerator", "CouplingFlow", "build_sampler"]

_LOG_2PI = math.log(2.0 * math.pi)


def _mlp(d_in: int, d_out: int, width: int, depth: int, activation: str = "swish") -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), make_activation(activation)]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class NoisyGenerator(nn.Module):
    """``x = g(z) + sigma * eps``: an MLP generator from a ``latent_dim`` standard normal, plus
    isotropic Gaussian output noise of fixed std ``sigma`` (the noise is what makes the score of
    q_phi, hence the entropy gradient, estimable)."""

    def __init__(self, dim: int, latent_dim: int = 2, width: int = 128, depth: int = 3, sigma: float = 0.1,
                 init_scale: float = 1.0):
        super().__init__()
        self.dim, self.latent_dim, self.sigma = dim, latent_dim, float(sigma)
        self.g = _mlp(latent_dim, dim, width, depth)
        # Spread the initial samples over the data's scale (like the flow's base): a generator
        # that starts as a tight blob is quickly out-classified by the energy, whose plateau
        # around the blob then gives the sampler no gradient.
        with torch.no_grad():
            probe = self.g(torch.randn(1024, latent_dim)).std(0).mean().clamp_min(1e-6)
            self.g[-1].weight.mul_(init_scale / probe)

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{'x': samples, 'z': latents, 'mean': g(z)}`` (reparameterised: differentiable in phi)."""
        dev = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=dev)
        mean = self.g(z)
        eps = torch.randn(mean.shape, generator=generator, device=dev)
        return {"x": mean + self.sigma * eps, "z": z, "mean": mean}

    def log_kernel(self, x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """``log N(x_i; means_j, sigma^2 I)`` for every pair: ``(len(x), len(means))``."""
        d2 = torch.cdist(x, means).pow(2)
        return -0.5 * d2 / self.sigma ** 2 - 0.5 * self.dim * (_LOG_2PI + 2.0 * math.log(self.sigma))


class AffineCoupling(nn.Module):
    """One RealNVP coupling layer: the coordinates where ``mask`` is 0 are scaled and shifted by
    functions of the coordinates where it is 1 (log-scale bounded by tanh for stability)."""

    def __init__(self, mask: torch.Tensor, width: int, depth: int):
        super().__init__()
        dim = mask.numel()
        self.register_buffer("mask", mask.float())
        self.net = _mlp(dim, 2 * dim, width, depth)
        # Start at the identity map: the flow begins as its base Gaussian.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, log |det J| per sample)."""
        m = self.mask
        s, t = self.net(z * m).chunk(2, dim=1)
        s = self.scale * torch.tanh(s) * (1 - m)
        t = t * (1 - m)
        return z * m + (1 - m) * (z * torch.exp(s) + t), s.sum(1)

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input that maps to ``x``, log |det J| of the forward map at it)."""
        m = self.mask
        s, t = self.net(x * m).chunk(2, dim=1)
        s = self.scale * torch.tanh(s) * (1 - m)
        t = t * (1 - m)
        return x * m + (1 - m) * (x - t) * torch.exp(-s), s.sum(1)


class CouplingFlow(nn.Module):
    """A normalising flow ``x = f(z)``, ``z ~ N(0, I)``: a learnable elementwise affine map
    followed by ``layers`` affine couplings with alternating masks. ``log q(x) = log N(z) -
    log |det J_f(z)|`` exactly, hence ``H(q) = -E log q(x)`` exactly."""

    def __init__(self, dim: int, layers: int = 6, width: int = 64, depth: int = 2, init_scale: float = 1.0):
        super().__init__()
        self.dim = dim
        self.log_scale = nn.Parameter(torch.full((dim,), math.log(init_scale)))
        self.shift = nn.Parameter(torch.zeros(dim))
        base = (torch.arange(dim) % 2).float() if dim > 1 else torch.ones(1)
        masks = [base if i % 2 == 0 else 1 - base for i in range(layers)]
        if dim == 1:  # nothing to condition on: couplings would be constant maps
            masks = []
        self.couplings = nn.ModuleList(AffineCoupling(m, width, depth) for m in masks)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x = f(z), log |det J_f(z)|)."""
        x = z * torch.exp(self.log_scale) + self.shift
        logdet = self.log_scale.sum().expand(z.shape[0])
        for c in self.couplings:
            x, ld = c(x)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log q(x)`` by inverting the flow."""
        logdet = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for c in reversed(self.couplings):
            x, ld = c.inverse(x)
            logdet = logdet + ld
        z = (x - self.shift) * torch.exp(-self.log_scale)
        logdet = logdet + self.log_scale.sum()
        return -0.5 * (z ** 2).sum(1) - 0.5 * self.dim * _LOG_2PI - logdet

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{'x': samples, 'z': base draws, 'log_q': exact log q(x)}`` (differentiable in phi)."""
        dev = self.shift.device
        z = torch.randn(n, self.dim, generator=generator, device=dev)
        x, logdet = self(z)
        log_q = -0.5 * (z ** 2).sum(1) - 0.5 * self.dim * _LOG_2PI - logdet
        return {"x": x, "z": z, "log_q": log_q}


def build_sampler(cfg, dim: int, init_scale: float = 1.0) -> nn.Module:
    """The learned sampler chosen by ``ObjectiveConfig`` (``sampler``: noisy | flow) for flat
    samples of ``dim`` numbers. ``init_scale``: the initial spread of the samples (the flow's base
    std; the generator's output layer is scaled so its outputs' std is it)."""
    if cfg.sampler == "noisy":
        return NoisyGenerator(dim, latent_dim=cfg.sampler_latent_dim or dim, width=cfg.sampler_width,
                              depth=cfg.sampler_depth, sigma=cfg.sampler_sigma, init_scale=init_scale)
    if cfg.sampler == "flow":
        return CouplingFlow(dim, layers=cfg.flow_layers, width=cfg.sampler_width, depth=cfg.sampler_depth,
                            init_scale=init_scale)
    raise ValueError(f"unknown objective.sampler '{cfg.sampler}'")
