"""Every training objective as one :class:`~ebmscale.objectives.base.Estimator` class per
``objective.kind``: PCD (``objectives/pcd.py``) and JEM (``objectives/jem.py``) beside their losses,
the others here, and the registry the trainer builds its objective from.

Each estimator computes the energy's loss for one step from this rank's positives on a narrow
:class:`~ebmscale.objectives.base.Context`; the trainer does the rest (backward through the
data-parallel wrapper, clipping, optimizer step, EMA, checkpoints). The energy forward that the loss differentiates always runs through the wrapper
(``ctx.wrapped``), once per step, so DDP averages the gradients -- including the second
derivatives of the score-based losses, which only the final ``backward`` reaches (DDP's hooks sit on
the parameters' gradient accumulation, never hit by ``autograd.grad`` with respect to inputs).
Samplers (Langevin for CD-k and refinement, the sampler network's own update) use the unwrapped
module with frozen parameters, as PCD's sampler does.

Extra learnable state (NCE's log Z, the adversarial sampler and its optimizer, NCE's fitted
noise) lives here, is averaged across ranks by hand (it is outside the wrapped module), and is
saved under ``state["objective"]`` of the trainer's checkpoint.

Kinds:

==========  =====================================================================
pcd         persistent contrastive divergence, chains in the replay buffer (IGEBM)
jem         JEM hybrid: classifier cross-entropy + PCD on p(x) and/or p(x, y)
cd          contrastive divergence CD-k: chains start at the data, k Langevin steps
sm          exact score matching (trace of the score's Jacobian; low dimension)
dsm         denoising score matching, one or several noise levels
ssm         sliced score matching (optionally variance-reduced)
nce         noise-contrastive estimation with a learnable log Z
adversarial learned sampler q_phi (noisy generator or flow), minimax bound with entropy
ksd         kernel Stein discrepancy, RBF kernel, U-statistic
mpf         minimum probability flow with MALA connectivity (``kl_tricks``)
kl_contraction  minimum KL contraction, Gaussian smoothing (``kl_tricks``)
lsd         learned Stein discrepancy: critic network with its own Adam (``lsd``)
==========  =====================================================================
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import nn

from ebmscale import dist
from ebmscale.objectives.adversarial import flow_sampler_loss, noisy_sampler_loss
from ebmscale.objectives.base import Context, Estimator, average_grads
from ebmscale.objectives.jem import JEM
from ebmscale.objectives.kl_tricks import kl_contraction_loss, mpf_loss
from ebmscale.objectives.ksd import ksd_loss
from ebmscale.objectives.lsd import critic_loss, model_loss, skip_critic
from ebmscale.objectives.nce import GaussianNoise, UniformNoise, nce_loss, noise_from_state
from ebmscale.objectives.pcd import PersistentCD, pcd_loss
from ebmscale.objectives.score_matching import dsm_loss, exact_sm_loss, log_uniform_sigmas, ssm_loss
from ebmscale.sampling import sampling_mode

# Up to this data dimension the critic's trace is exact (one backward per dimension) under lsd_trace=auto.
EXACT_TRACE_MAX_DIM = 16


def domain_wall(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Quadratic energy wall outside ``[lo, hi]``, zero inside: ``1/2 (dist / w)^2`` summed over
    coordinates with ``w = (hi - lo) / 100``.

    Where the sampler's chains are clamped to a range (the toy box, the image range), the model's
    density lives on that range: the energy never sees points outside it and is unconstrained
    there. A learned sampler maximising its entropy would then spread without bound; the wall is
    a smooth stand-in for the infinite energy outside the domain."""
    w = (hi - lo) / 100.0
    return 0.5 * ((x - x.clamp(lo, hi)) / w).pow(2).flatten(1).sum(1)


class ContrastiveDivergence(Estimator):
    """CD-k (Hinton 2002): negatives are k sampler steps from the positives themselves."""

    def loss(self, x_pos, y, streams):
        gen = streams.torch("objective")
        t0 = time.perf_counter()
        x_neg = self.langevin(x_pos, self.o.cd_steps, gen)
        t1 = time.perf_counter()
        n = x_pos.shape[0]
        e = self.energy(torch.cat([x_pos, x_neg]))
        loss, stats = pcd_loss(e[:n], e[n:], self.o.alpha)
        return loss, {**stats, "sampler_time": t1 - t0}, x_neg


class ScoreMatching(Estimator):
    """Exact, denoising or sliced score matching (see ``score_matching``)."""

    def loss(self, x_pos, y, streams):
        gen = streams.torch("objective")
        o = self.o
        if o.kind == "sm":
            loss, stats = exact_sm_loss(self.energy, x_pos)
        elif o.kind == "dsm":
            loss, stats = dsm_loss(self.energy, x_pos, o.dsm_sigmas, gen,
                                   sigma_range=(o.sigma_min, o.sigma_max) if o.noise_conditional else None)
        else:
            loss, stats = ssm_loss(self.energy, x_pos, o.ssm_projections, o.ssm_variance_reduced, gen)
        return self._tie_constant(loss), stats, None


class KernelStein(Estimator):
    """KSD^2 (U-statistic, RBF kernel) of the model against the batch."""

    def loss(self, x_pos, y, streams):
        gen = streams.torch("objective")
        loss, stats = ksd_loss(self.energy, x_pos, self.o.ksd_bandwidth)
        return self._tie_constant(loss), stats, None


class ProbabilityFlow(Estimator):
    """Minimum probability flow with MALA connectivity (``kl_tricks.mpf_loss``)."""

    def loss(self, x_pos, y, streams):
        gen = streams.torch("objective")
        loss, stats = mpf_loss(self.energy, self.frozen_energy_and_grad, x_pos, self.o.mpf_step,
                               lambda shape: self.normal(shape, gen))
        return loss, stats, None


class KLContraction(Estimator):
    """Minimum KL contraction with Gaussian smoothing (``kl_tricks.kl_contraction_loss``)."""

    def loss(self, x_pos, y, streams):
        gen = streams.torch("objective")
        o = self.o
        loss, stats = kl_contraction_loss(self.energy, x_pos, o.kl_contraction_sigma, o.kl_contraction_samples,
                                          lambda shape: self.normal(shape, gen))
        return loss, stats, None


class LearnedStein(Estimator):
    """Learned Stein discrepancy: ``lsd_critic_steps`` critic updates (its own Adam, gradients
    averaged across ranks by hand) on the frozen model's score, then the model's loss
    E[s_theta^T f] through the wrapper. The critic is the model factory's network for
    ``model.arch`` with a d-way head (``logits``), reshaped to the data's shape, or with
    ``lsd_critic=unet`` a per-pixel U-Net field (ebmscale.models.critic)."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        from ebmscale.models import build_model
        from ebmscale.models.critic import UNetField

        o, c = self.o, ctx.cfg.optim
        self.dim = math.prod(ctx.shape)
        # A d-way head; the MLP factory only builds a multi-output head for a conditional model
        # (only the head's size matters: the critic uses ``logits``, never the energy).
        m = ctx.cfg.model
        critic_cfg = dataclasses.replace(m, num_classes=self.dim, conditional=m.arch == "mlp",
                                         activation=o.lsd_critic_activation or m.activation)
        # Same initial critic on every rank: its own seed, without touching the global stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(dist.derive_seed(ctx.cfg.train.seed, 0, 0, "critic-init"))
            if o.lsd_critic == "unet":
                self.critic = UNetField(ctx.shape[0], m.width, critic_cfg.activation, m.leaky_slope).to(ctx.device)
            else:
                self.critic = build_model(critic_cfg, ctx.shape).to(ctx.device)
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=o.lsd_critic_lr or c.lr, betas=tuple(c.betas))
        self.exact_trace = o.lsd_trace == "exact" or (o.lsd_trace == "auto" and self.dim <= EXACT_TRACE_MAX_DIM)

    def critic_fn(self, x: torch.Tensor) -> torch.Tensor:
        """f(x), the data's shape, fp32 (the forward under the loss precision's autocast)."""
        with self.ctx.parallel.autocast():
            out = self.critic.logits(x)
        return out.float().reshape(x.shape)

    def loss(self, x_pos, y, streams):
        gen = streams.torch("objective")
        o, c = self.o, self.ctx
        t0 = time.perf_counter()
        normal = lambda shape: self.normal(shape, gen)  # noqa: E731
        sig = kernel_score = None
        if o.noise_conditional:
            # The data smoothed at each example's own level; the model there is E(x) / sigma.
            sig = log_uniform_sigmas(self.uniform((x_pos.shape[0],), gen), (o.sigma_min, o.sigma_max))
            view = sig.view(-1, *([1] * (x_pos.dim() - 1)))
            eps = normal(tuple(x_pos.shape))
            x_pos = x_pos + view * eps
            if o.lsd_trace == "denoising":  # the trace by the denoising identity (lsd.py)
                kernel_score = -eps / view
        _, grad = self.frozen_energy_and_grad(x_pos)
        score = -grad if sig is None else -grad / view
        # With the skip the network learns E[eps | x~] and the model's score reaches g exactly (lsd.py).
        critic = skip_critic(self.critic_fn, grad, o.lsd_l2) if o.lsd_critic_skip else self.critic_fn
        params = list(self.critic.parameters())
        self.critic.train()
        for _ in range(o.lsd_critic_steps):
            c_loss, c_stats = critic_loss(critic, x_pos, score, o.lsd_l2, self.exact_trace, normal, sig,
                                          kernel_score)
            self.optimizer.zero_grad(set_to_none=True)
            c_loss.backward()
            average_grads(params, c.world)
            self.optimizer.step()
        with torch.no_grad():
            f = critic(x_pos)
        t1 = time.perf_counter()
        loss, stats = model_loss(self.energy, f, x_pos)  # noise-conditional: see model_loss
        return self._tie_constant(loss), {**stats, **c_stats, "sampler_time": t1 - t0}, None

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])


class NoiseContrastive(Estimator):
    """NCE with a learnable log Z (its own Adam, gradients averaged across ranks)."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.log_z = nn.Parameter(torch.zeros((), device=ctx.device))
        c = ctx.cfg.optim
        self.optimizer = torch.optim.Adam([self.log_z], lr=self.o.nce_log_z_lr or c.lr, betas=tuple(c.betas))
        self.noise: GaussianNoise | UniformNoise | None = None
        self.initialised = False
        if self.o.nce_noise == "uniform":
            self.noise = UniformNoise(*ctx.init_bounds, dim=math.prod(ctx.shape))

    def loss(self, x_pos, y, streams):
        gen = streams.torch("objective")
        h, n = self.ctx, x_pos.shape[0]
        if self.noise is None:  # fitted to the first batch (of every rank), then fixed
            self.noise = GaussianNoise.fit(x_pos, scale=self.o.nce_noise_scale)
        m = max(1, round(self.o.nce_noise_ratio * n))
        y = self.noise.sample(m, gen, device=h.device).view(m, *h.shape)
        e = self.energy(torch.cat([x_pos, y]))
        lp_data, lp_noise = self.noise.log_prob(x_pos), self.noise.log_prob(y)
        if not self.initialised:
            self._init_log_z(e[n:].detach(), lp_noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = nce_loss(e[:n], e[n:], lp_data, lp_noise, self.log_z, m / n)
        return loss, stats, y

    @torch.no_grad()
    def _init_log_z(self, e_noise: torch.Tensor, lp_noise: torch.Tensor) -> None:
        """Start log Z at its importance-sampling estimate under the noise, log mean exp(-E - log p_n)
        (averaged over ranks): the classifier starts calibrated instead of spending steps on it."""
        est = (torch.logsumexp(-e_noise - lp_noise, 0) - math.log(len(e_noise))).reshape(1)
        dist.all_reduce_sum(est).div_(self.ctx.world)
        self.log_z.fill_(float(est))
        self.initialised = True

    def after_step(self) -> None:
        average_grads([self.log_z], self.ctx.world)
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"log_z": self.log_z.detach().cpu(), "optimizer": self.optimizer.state_dict(),
                "noise": None if self.noise is None else self.noise.state_dict(), "initialised": self.initialised}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.log_z.copy_(torch.as_tensor(state["log_z"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise = None if state["noise"] is None else noise_from_state(state["noise"])
        self.initialised = bool(state["initialised"])


class Adversarial(Estimator):
    """Minimax training against a learned sampler q_phi (noisy generator or flow)."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        from ebmscale.models.samplers import build_sampler

        self.dim = math.prod(ctx.shape)
        lo, hi = ctx.init_bounds
        # Same initial sampler on every rank: its own seed, without touching the global stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(dist.derive_seed(ctx.cfg.train.seed, 0, 0, "sampler-init"))
            self.sampler = build_sampler(self.o, self.dim, init_scale=(hi - lo) / 4.0).to(ctx.device)
        self.optimizer = torch.optim.Adam(self.sampler.parameters(), lr=self.o.sampler_lr,
                                          betas=tuple(ctx.cfg.optim.betas))

    def loss(self, x_pos, y, streams):
        gen = streams.torch("objective")
        h, o, n = self.ctx, self.o, x_pos.shape[0]
        t0 = time.perf_counter()
        # 1. phi step on the current energy (frozen, unwrapped: no theta gradients, no collectives
        # but the sampler's own gradient average).
        draw = self.sampler.sample(n, gen)
        x_q = draw["x"].view(n, *h.shape)
        with sampling_mode(h.model) as m:
            with h.autocast():
                e_q = m(x_q).float()
        if h.settings.clamp is not None:
            e_q = e_q + domain_wall(x_q, *h.settings.clamp)
        if o.sampler == "flow":
            s_loss, s_stats = flow_sampler_loss(self.sampler, draw, e_q, o.entropy_weight)
        else:
            s_loss, s_stats = noisy_sampler_loss(self.sampler, draw, e_q, o.entropy_weight)
        self.optimizer.zero_grad(set_to_none=True)
        s_loss.backward()
        average_grads(list(self.sampler.parameters()), h.world)
        self.optimizer.step()
        # 2. theta's negatives: the same draws, optionally refined by short-run Langevin.
        x_neg = draw["x"].detach().view(n, *h.shape)
        if h.toy:  # the exact evaluation normalises over the box: keep negatives in it
            x_neg = x_neg.clamp(*h.init_bounds)
        if o.refine_steps > 0:
            x_neg = self.langevin(x_neg, o.refine_steps, gen)
        t1 = time.perf_counter()
        e = self.energy(torch.cat([x_pos, x_neg]))
        loss, stats = pcd_loss(e[:n], e[n:], o.alpha)
        return loss, {**stats, **s_stats, "sampler_time": t1 - t0}, x_neg

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.optimizer.load_state_dict(state["optimizer"])


_CLASSES = {"pcd": PersistentCD, "jem": JEM, "cd": ContrastiveDivergence, "sm": ScoreMatching,
            "dsm": ScoreMatching, "ssm": ScoreMatching, "nce": NoiseContrastive, "adversarial": Adversarial,
            "ksd": KernelStein, "mpf": ProbabilityFlow, "kl_contraction": KLContraction, "lsd": LearnedStein}
ESTIMATOR_KINDS = tuple(_CLASSES)


def estimator_class(kind: str) -> type[Estimator]:
    """The objective class of ``objective.kind`` (the config validates the kind)."""
    return _CLASSES[kind]


def build_estimator(ctx: Context) -> Estimator:
    """The objective of ``ctx.cfg.objective.kind``, built on its context."""
    return estimator_class(ctx.cfg.objective.kind)(ctx)
