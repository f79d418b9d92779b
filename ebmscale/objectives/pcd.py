"""Maximum likelihood with persistent contrastive divergence (PCD), as in IGEBM and JEM.

The gradient of the NLL is E_data[dE/dθ] - E_model[dE/dθ]; with negatives x- from the sampler
(gradients stopped through them) the surrogate loss is mean E(x+) - mean E(x-). IGEBM adds the
energy regulariser alpha * (E(x+)^2 + E(x-)^2), which keeps energies near zero and stops the
two terms from drifting apart without bound.
"""
from __future__ import annotations

import time

import torch

from ebmscale.objectives.base import Estimator, Streams
from ebmscale.objectives.improved_cd import kl_surrogate, nn_entropy


def pcd_loss(e_pos: torch.Tensor, e_neg: torch.Tensor, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss ``mean E(x+) - mean E(x-) + alpha * mean(E(x+)^2 + E(x-)^2)`` and its statistics."""
    e_pos, e_neg = e_pos.float(), e_neg.float()
    cd = e_pos.mean() - e_neg.mean()
    reg = (e_pos ** 2).mean() + (e_neg ** 2).mean()
    loss = cd + alpha * reg
    stats = {"loss": loss.detach(), "e_pos": e_pos.mean().detach(), "e_neg": e_neg.mean().detach(),
             "energy_gap": (e_neg.mean() - e_pos.mean()).detach(), "reg": reg.detach()}
    return loss, stats


class PersistentCD(Estimator):
    """PCD (``objective.kind: pcd``): chains from the replay buffer (or fresh noise for short-run
    sampling), K Langevin steps, written back; one wrapped forward over [x+, x-]. With a
    conditional energy the chains take the batch's labels and the energy is E(x, y). With
    ``objective.kl_weight`` > 0, improved CD's KL term (and its entropy term) is added."""

    keeps_chains = True

    def loss(self, x_pos: torch.Tensor, y: torch.Tensor | None, streams: Streams):
        c, o, n = self.ctx, self.o, x_pos.shape[0]
        conditional = c.cfg.model.conditional
        t0 = time.perf_counter()
        m = c.cfg.sampler.batch_size or n  # chains per step: sampler.batch_size, or one per example
        # Improved CD: past chains for the entropy term, read before this step writes any back.
        kl = [] if o.kl_weight > 0 else None
        past = None
        if kl is not None and o.entropy_weight > 0:
            past = torch.from_numpy(c.buffer_call("peek", o.entropy_batch, streams.numpy("entropy"))).to(c.device)
        x_neg, y_neg = c.negatives(m, y[:m] if conditional else None, streams.numpy("buffer"),
                                   streams.torch("langevin"), last_step=kl)
        c.prefetch(m, streams, labelled=conditional)
        t1 = time.perf_counter()  # the prefetch's send counts as buffer time, inside the sampler window
        # One wrapped forward over [x+, x-]: one spectral-norm power iteration per step.
        x_all = torch.cat([x_pos, x_neg])
        e_all = c.forward(x_all, torch.cat([y, y_neg])) if conditional else c.forward(x_all)
        loss, stats = pcd_loss(e_all[:n], e_all[n:], o.alpha)
        if kl:
            term, kl_stats = self._kl_terms(kl[0], y_neg, past)
            loss, stats = loss + term, {**stats, **kl_stats}
        return loss, {**stats, "sampler_time": t1 - t0}, x_neg

    def _kl_terms(self, x_tilde: torch.Tensor, labels: torch.Tensor | None,
                  past: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """Improved CD's objective.kl_weight * (E_frozen(x~) - entropy_weight * H_nn(x~)), as the
        surrogate whose gradient flows through the last sampler step only (see improved_cd)."""
        o = self.o
        e, g = self.ctx.frozen_energy_and_grad(x_tilde.detach(), labels)
        term = kl_surrogate(x_tilde, g)
        stats = {"kl_energy": e.mean()}
        if past is not None:
            ent = nn_entropy(x_tilde, past)
            term = term - o.entropy_weight * ent
            stats["entropy"] = ent.detach()
        return o.kl_weight * term, stats
