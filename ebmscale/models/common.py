"""Pieces shared by every energy network: activations, spectral norm, the energy interface.

An energy network is a plain ``nn.Module`` whose ``forward(x, y=None)`` returns one energy per
sample (shape ``(N,)``), lower meaning more likely. Networks that are classifiers underneath
(JEM) also expose ``logits(x)``. Models know nothing about distributed training.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize


class Swish(nn.Module):
    """x * sigmoid(x) (SiLU); IGEBM's ResNet128 uses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x)


def make_activation(name: str, leaky_slope: float = 0.2) -> nn.Module:
    """Build a fresh activation module by config name."""
    if name == "swish":
        return Swish()
    if name == "leaky_relu":
        return nn.LeakyReLU(leaky_slope)
    if name == "relu":
        return nn.ReLU()
    if name == "elu":
        return nn.ELU()
    if name == "softplus":
        return nn.Softplus()
    raise ValueError(f"unknown activation '{name}'")


def apply_spectral_norm(module: nn.Module, exclude: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Put torch's spectral-norm parametrization (one power iteration) on every Conv/Linear
    layer of ``module`` except those in ``exclude`` (normally the final linear layer).

    The power iteration only advances in training mode, so samplers that switch the module to
    eval mode (see :func:`ebmscale.sampling.langevin.sampling_mode`) leave its state untouched.
    """
    skip = {id(m) for m in exclude}
    for sub in list(module.modules()):
        if id(sub) in skip:
            continue
        if isinstance(sub, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)) and not parametrizations_present(sub):
            parametrizations.spectral_norm(sub, n_power_iterations=1)
    return module


@contextlib.contextmanager
def frozen_power_iteration(module: nn.Module) -> Iterator[None]:
    """Hold every weight parametrization of ``module`` (spectral norm, IGEBM's capped spectral
    norm) in eval mode for the block, leaving the rest of the module in its mode: the forward
    uses the current u, v vectors without advancing the power iteration. Gradient accumulation
    runs its 2nd..k-th micro-batches this way, so that k micro-batches advance the estimate once,
    like one forward over the whole batch does."""
    lists = [m for m in module.modules() if isinstance(m, parametrize.ParametrizationList) and m.training]
    for m in lists:
        m.eval()
    try:
        yield
    finally:
        for m in lists:
            m.train()


def parametrizations_present(m: nn.Module) -> bool:
    return hasattr(m, "parametrizations") and "weight" in m.parametrizations


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars (spectral-norm u/v vectors are buffers, so not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def energy_from_head(out: torch.Tensor, num_classes: int, y: torch.Tensor | None = None) -> torch.Tensor:
    """Energy from a network's head output. Unconditional (``num_classes`` = 0): the single output
    is the energy. With classes the output is logits f(x) (JEM): E(x) = -logsumexp_y f(x)[y] and
    E(x, y) = -f(x)[y]."""
    if num_classes == 0:
        return out.squeeze(-1)
    if y is None:
        return -torch.logsumexp(out, dim=-1)
    return -out.gather(1, y.view(-1, 1)).squeeze(1)
