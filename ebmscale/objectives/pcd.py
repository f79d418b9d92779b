"""Maximum likelihood with persistent contrastive divergence (PCD), as in IGEBM and JEM.

The gradient of the NLL is E_data[dE/dθ] - E_model[dE/dθ]; with negatives x- from the sampler
(gradients stopped through them) the surrogate loss is mean E(x+) - mean E(x-). IGEBM adds the
energy regulariser alpha * (E(x+)^2 + E(x-)^2), which keeps energies near zero and stops the
two terms from drifting apart without bound.
"""
from __future__ import annotations

import torch


def pcd_loss(e_pos: torch.Tensor, e_neg: torch.Tensor, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss ``mean E(x+) - mean E(x-) + alpha * mean(E(x+)^2 + E(x-)^2)`` and its statistics."""
    e_pos, e_neg = e_pos.float(), e_neg.float()
    cd = e_pos.mean() - e_neg.mean()
    reg = (e_pos ** 2).mean() + (e_neg ** 2).mean()
    loss = cd + alpha * reg
    stats = {"loss": loss.detach(), "e_pos": e_pos.mean().detach(), "e_neg": e_neg.mean().detach(),
             "energy_gap": (e_neg.mean() - e_pos.mean()).detach(), "reg": reg.detach()}
    return loss, stats
