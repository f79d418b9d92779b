"""The ``optim.*`` section made objects: the optimizer, the learning-rate schedule, the EMA update.

The schedule's multiplier is read through a callable at every ``scheduler.step()``, so that a
rollback that lowers the learning rate (``Trainer.rollback``) changes it without rebuilding the
scheduler or its checkpointed state.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ebmscale.config import Config, OptimConfig


def lr_factor(step: int, warmup: int, decay_steps: list, decay_factor: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then x ``decay_factor`` at each decay step."""
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return f * decay_factor ** sum(step >= s for s in decay_steps)


def build_optimizer(cfg: Config, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over ``params`` with the ``optim.*`` settings."""
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def build_scheduler(o: OptimConfig, optimizer: torch.optim.Optimizer,
                    scale: Callable[[], float]) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up and step decay (:func:`lr_factor`) times ``scale()`` (the rollbacks' multiplier)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: scale() * lr_factor(s, o.warmup_steps, o.decay_steps, o.decay_factor))


def apply_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer) -> None:
    """Set the optimizer's learning rate from the scheduler at its current step (after a load or a
    change of the multiplier): the same formula ``scheduler.step()`` uses."""
    lam = scheduler.lr_lambdas[0]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lam(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for the parameters; buffers are copied."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach().to(pe.dtype), 1.0 - decay)  # the module may be half precision (DeepSpeed)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)
