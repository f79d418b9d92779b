"""Adversarial EBM training with a learned sampler q_phi (the variational bound on the NLL).

By Jensen, ``log Z_theta >= E_q[-E_theta(x)] + H(q_phi)``, which bounds the log-likelihood from
above::

    E_pD[log p_theta(x)] <= E_q[E_theta(x)] - E_pD[E_theta(x)] - H(q_phi)

(tight when q_phi = p_theta), and training is ``max_theta min_phi`` of the right-hand side:

* theta (the energy) minimises ``E_pD[E] - E_q[E]`` -- the PCD loss with negatives from q_phi
  (optionally refined by a few Langevin steps on E, as in cooperative learning);
* phi (the sampler) minimises ``E_q[E_theta(x)] - w_H H(q_phi)``, reparameterised through x.

Entropy of q_phi:

* normalising flow: ``H = -E log q(x)`` is exact; with ``x = f(z)``,
  ``log q(x) = log N(z) - log |det J_f(z)|`` (:func:`flow_sampler_loss`);
* noisy generator ``x = g(z) + sigma eps``: H is intractable, but its gradient is
  ``grad_phi H = -E[ grad_x log q(x)^T dx/dphi ]`` (the score-function part has zero mean), and
  the score of the Gaussian-smoothed q is ``grad_x log q(x) = E_{q(z|x)}[(g(z) - x)] / sigma^2``.
  The posterior expectation is estimated by self-normalised importance sampling with the prior
  as proposal, using the *other* samples' latents of the batch (leave-one-out, so each proposal is
  independent of the point it scores) -- the estimator of VERA (Grathwohl et al. 2021) with the
  prior in place of its learned posterior, adequate in low dimension
  (:func:`noisy_score_estimate`, :func:`noisy_sampler_loss`).
"""
from __future__ import annotations

import torch

from ebmscale.models.samplers import CouplingFlow, NoisyGenerator


@torch.no_grad()
def noisy_score_estimate(gen: NoisyGenerator, x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Estimate of ``grad_x log q(x_i)`` for each sample ``x_i`` from the batch's generator means
    ``g(z_j)``, leaving out each point's own latent (j != i)."""
    x, means = x.detach(), means.detach()
    logk = gen.log_kernel(x, means)
    if len(x) == len(means) and len(x) > 1:
        logk.fill_diagonal_(-float("inf"))
    w = torch.softmax(logk, dim=1)  # posterior weights q(z_j | x_i), self-normalised
    return (w @ means - x) / gen.sigma ** 2


def noisy_sampler_loss(gen: NoisyGenerator, draw: dict, energy: torch.Tensor,
                       entropy_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Surrogate loss for phi whose gradient is ``grad_phi (E_q[E] - w_H H(q))``: the energies of the
    reparameterised samples plus ``w_H * score_hat(x)^T x`` with the score estimate held fixed."""
    x = draw["x"]
    score = noisy_score_estimate(gen, x, draw["mean"])
    neg_entropy_surrogate = (score * x).sum(1).mean()
    loss = energy.float().mean() + entropy_weight * neg_entropy_surrogate
    return loss, {"sampler_loss": loss.detach(), "sampler_score_norm": score.norm(dim=1).mean()}


def flow_sampler_loss(flow: CouplingFlow, draw: dict, energy: torch.Tensor,
                      entropy_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``E_q[E] + w_H E_q[log q]`` with the flow's exact log-density (reparameterised)."""
    neg_entropy = draw["log_q"].mean()
    loss = energy.float().mean() + entropy_weight * neg_entropy
    return loss, {"sampler_loss": loss.detach(), "sampler_entropy": -neg_entropy.detach()}
