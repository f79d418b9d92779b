"""Adversarial robustness of a classifier: PGD in L-inf or L2 balls, with optional Langevin
refinement of the input before it is classified (JEM, Grathwohl et al. 2020, section 5.3).

The attack maximises the cross-entropy of ``logits_fn`` from a random start inside the ball
(Madry et al.), ``steps`` steps of size ``step_size`` (default 2.5 eps / steps), projecting onto
the ball and the data range after each. With refinement, the attacked input is moved by K
Langevin steps on E(x) before classification; the attack's gradient does not go through those
steps (a fixed, non-adaptive attack on the defended model), so a refined robust accuracy is an
upper bound on what an attack through the sampler would leave.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1)
    factor = (eps / flat.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def pgd_attack(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, steps: int = 10,
               step_size: float | None = None, bounds: tuple[float, float] = (-1.0, 1.0),
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial examples within ``eps`` (``norm`` 'linf' or 'l2', in model-input units) of ``x``."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got '{norm}'")
    if eps <= 0 or steps <= 0:
        return x.detach().clone()
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    lo, hi = bounds
    noise = torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1
    if norm == "l2":
        radius = torch.rand(len(x), generator=generator, device=x.device).view(-1, *([1] * (x.dim() - 1)))
        noise = _project(noise, "l2", eps) * radius
    else:
        noise = noise * eps
    x_adv = (x + noise).clamp(lo, hi).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(logits_fn(x_adv).float(), y)
            (g,) = torch.autograd.grad(loss, x_adv)
        if norm == "linf":
            step = alpha * g.sign()
        else:
            step = alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
        x_adv = (x + _project(x_adv.detach() + step - x, norm, eps)).clamp(lo, hi).detach()
    return x_adv


def robust_correct(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, steps: int,
                   bounds: tuple[float, float], generator: torch.Generator | None = None,
                   refine: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Boolean (N,) of inputs still classified correctly after the attack (and ``refine``)."""
    x_adv = pgd_attack(logits_fn, x, y, norm, eps, steps, bounds=bounds, generator=generator)
    if refine is not None:
        x_adv = refine(x_adv)
    with torch.no_grad():
        return logits_fn(x_adv).argmax(1) == y
