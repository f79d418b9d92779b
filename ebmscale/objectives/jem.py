"""JEM's hybrid objective (Grathwohl et al. 2020): a classifier f whose logits define an energy.

    log p(y | x) = log softmax(f(x))[y]          cross-entropy on labelled data
    E(x)    = -logsumexp_y f(x)[y]               p(x) term, trained by PCD
    E(x, y) = -f(x)[y]                           optional p(x, y) term, PCD with class-conditional chains

L = w_clf * CE(f(x+), y) + w_px * [mean E(x+) - mean E(x-)] + w_pxy * [mean E(x+, y) - mean E(x-_y, y-)]
  + alpha * (energy regulariser of the PCD terms, 0 in JEM).
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from ebmscale.objectives.base import Estimator, Streams
from ebmscale.objectives.pcd import pcd_loss


def jem_loss(logits_pos: torch.Tensor, y: torch.Tensor, logits_neg: torch.Tensor | None,
             logits_neg_y: torch.Tensor | None, y_neg: torch.Tensor | None, *, clf_weight: float,
             px_weight: float, pxy_weight: float, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The hybrid loss from logits of positives, unconditional negatives and class-conditional
    negatives (either negative set may be None when its weight is 0)."""
    logits_pos = logits_pos.float()
    ce = F.cross_entropy(logits_pos, y)
    loss = clf_weight * ce
    acc = (logits_pos.argmax(1) == y).float().mean()
    stats: dict[str, torch.Tensor] = {"ce": ce.detach(), "train_acc": acc.detach()}
    if px_weight > 0 and logits_neg is not None:
        e_pos = -torch.logsumexp(logits_pos, 1)
        e_neg = -torch.logsumexp(logits_neg.float(), 1)
        px, s = pcd_loss(e_pos, e_neg, alpha)
        loss = loss + px_weight * px
        stats.update(e_pos=s["e_pos"], e_neg=s["e_neg"], energy_gap=s["energy_gap"], reg=s["reg"])
    if pxy_weight > 0 and logits_neg_y is not None:
        e_pos_y = -logits_pos.gather(1, y.view(-1, 1)).squeeze(1)
        e_neg_y = -logits_neg_y.float().gather(1, y_neg.view(-1, 1)).squeeze(1)
        pxy, s = pcd_loss(e_pos_y, e_neg_y, alpha)
        loss = loss + pxy_weight * pxy
        stats.update(e_pos_y=s["e_pos"], e_neg_y=s["e_neg"], energy_gap_y=s["energy_gap"])
    stats["loss"] = loss.detach()
    return loss, stats


class LogitsForward(nn.Module):
    """What the data-parallel wrapper runs for JEM: the classifier's logits. DDP and DeepSpeed only
    hook a module's ``forward``, and JEM's one training forward per step needs ``logits``; the
    adapter owns no parameters of its own, so wrapping it wraps exactly the model's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)


class JEM(Estimator):
    """JEM (``objective.kind: jem``): unconditional and/or class-conditional persistent chains,
    one wrapped forward of the logits over [x+, x-, x-_y]."""

    keeps_chains = True

    @staticmethod
    def forward_module(model: nn.Module) -> nn.Module:
        return LogitsForward(model)

    def loss(self, x_pos: torch.Tensor, y: torch.Tensor | None, streams: Streams):
        c, o, n = self.ctx, self.o, x_pos.shape[0]
        t0 = time.perf_counter()
        rng, gen = streams.numpy("buffer"), streams.torch("langevin")
        m = c.cfg.sampler.batch_size or n  # chains per step: sampler.batch_size, or one per example
        parts, y_neg = [x_pos], None
        if o.px_weight > 0:
            parts.append(c.negatives(m, None, rng, gen)[0])
        if o.pxy_weight > 0:
            x_neg_y, y_neg = c.negatives(m, y[:m], rng, gen)
            parts.append(x_neg_y)
        c.prefetch(m, streams, labelled=o.px_weight == 0)
        t1 = time.perf_counter()  # the prefetch's send counts as buffer time, inside the sampler window
        # One wrapped forward over every batch: one spectral-norm power iteration per step.
        logits = c.forward(torch.cat(parts)).split([n] + [m] * (len(parts) - 1))
        it = iter(logits[1:])
        l_neg = next(it) if o.px_weight > 0 else None
        l_neg_y = next(it) if o.pxy_weight > 0 else None
        loss, stats = jem_loss(logits[0], y, l_neg, l_neg_y, y_neg, clf_weight=o.clf_weight,
                               px_weight=o.px_weight, pxy_weight=o.pxy_weight, alpha=o.alpha)
        x_neg = parts[1] if len(parts) > 1 else x_pos
        return loss, {**stats, "sampler_time": t1 - t0}, x_neg
