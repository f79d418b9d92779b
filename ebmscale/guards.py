"""The checks that stop a step before it can corrupt a weight.

* :func:`check_divergence` -- between backward and the parameter update (on every backend): a
  non-finite loss or energy, an energy beyond ``train.max_abs_energy``, a gradient norm beyond
  ``train.max_grad_norm`` raise :class:`DivergenceError` (the trainer then rolls back).
* :func:`check_half_precision` -- the half-precision canary (``train.precision_check``), once, on a
  process's first batch: a kernel that computes wrong bf16/fp16 gradients on this hardware stops
  the run with a :class:`~ebmscale.config.ConfigError` naming the layer.

With several ranks both decisions are global (one small all-reduce), because a rank that stopped
alone would leave the others waiting in the next collective.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ebmscale import dist
from ebmscale.config import ConfigError, TrainConfig
from ebmscale.performance import Runtime, half_precision_gradient_errors


class DivergenceError(RuntimeError):
    """Training diverged; the message names the step and the metric that tripped."""


def check_divergence(stats: dict, grad_norm: float | None, overflow: bool, t: TrainConfig, step: int,
                     world: int) -> None:
    """Raise :class:`DivergenceError` naming ``step`` and the metric (limits from ``t``)."""
    checks = [("loss", float(stats["loss"]), math.inf)]
    if grad_norm is not None and not overflow:  # an fp16 overflow is a skipped step, not a divergence
        checks.append(("grad_norm", float(grad_norm), t.max_grad_norm))
    checks += [(k, float(stats[k]), t.max_abs_energy) for k in ("e_pos", "e_neg", "e_pos_y", "e_neg_y") if k in stats]
    if world > 1:
        values = [v for _, v, _ in checks]
        worst = torch.tensor([float(not math.isfinite(v)) for v in values]
                             + [abs(v) if math.isfinite(v) else 0.0 for v in values], dtype=torch.float64)
        dist.all_reduce_max(worst)
        k = len(values)
        checks = [(name, math.nan if worst[i] > 0 else float(worst[k + i]), limit)
                  for i, (name, _, limit) in enumerate(checks)]
    for name, value, limit in checks:
        if not math.isfinite(value) or abs(value) > limit:
            where = "" if world == 1 else " on some rank"
            raise DivergenceError(f"training diverged at step {step}: {name}={value:.4g}{where} "
                                  f"(limit {limit:.4g}; see train.max_abs_energy / train.max_grad_norm)")


def check_half_precision(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, runtime: Runtime,
                         tol: float, world: int) -> None:
    """The half-precision canary: the gradients of this batch's energies in the run's bf16/fp16
    against fp32, per tensor. A kernel that is wrong on this hardware (like oneDNN's bf16 weight
    gradient for some stride-2 convs, see :class:`ebmscale.models.common.Conv2d`) raises one line
    naming the layer, on every rank together. A no-op when ``tol`` is 0 or the run is fp32."""
    if not tol or runtime.autocast_dtype is None:
        return
    errors = half_precision_gradient_errors(model, lambda m, xi: m(xi, labels), x, runtime)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    flag = torch.tensor([float(bool(bad))])
    if world > 1:
        dist.all_reduce_max(flag)
    if flag.item():
        what = (", ".join(f"'{k}' ({v:.3g})" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:3])
                if bad else "a layer on another rank")
        raise ConfigError(f"{runtime.precision} gradients disagree with fp32 on this {x.device.type} "
                          f"(relative error > train.precision_check={tol:g}): {what}; a kernel is wrong for "
                          f"this layer here: set train.precision=fp32")
