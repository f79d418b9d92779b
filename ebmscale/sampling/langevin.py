"""Langevin MCMC over an energy function.

Two parametrisations, both common in the literature:

* ``langevin`` (proper, unadjusted Langevin):  x <- x - (eps^2 / 2) * dE/dx + eps * N(0, I).
  For small eps its stationary law is p(x) ∝ exp(-E(x)), so it samples the model itself.
* ``sgld`` (what IGEBM and JEM actually run):   x <- x - a * dE/dx + sigma * N(0, I), with the
  gradient weight ``a`` and the noise ``sigma`` chosen independently (JEM: a = 1, sigma = 0.01;
  IGEBM: a = 10, sigma = 0.005). This equals proper Langevin on the tempered density
  exp(-E / T) with T = sigma^2 / (2a) -- e.g. T = 5e-5 for JEM -- so it is a noisy gradient
  descent that finds low-energy modes rather than a sampler of exp(-E). The training signal
  still works because the model learns to shape its energy for *that* sampler.
* ``mala`` (Metropolis-adjusted Langevin, :mod:`ebmscale.sampling.mala`): proper Langevin's
  proposal plus an accept/reject test, so exp(-E) is sampled without step-size bias.
* ``annealed`` (:mod:`ebmscale.sampling.annealed`): proper Langevin on E(x)/sigma_i over a
  decreasing ladder of noise levels, for noise-conditional energies (score matching, LSD).

The sampler is pure: it never accumulates parameter gradients (only d E / d x is taken, with the
parameters' ``requires_grad`` switched off by :func:`sampling_mode`), and it never advances the
spectral-norm power iteration (the module is in eval mode while sampling). It is called with
the *unwrapped* module, so it costs no collective communication under DDP or DeepSpeed.

Mixed precision: energies may be evaluated under bf16/fp16 autocast while the chains and every
update stay fp32; fp16 input gradients are loss-scaled (:class:`InputGradScaler`). At high
resolution, :func:`sampling_mode` can turn on activation checkpointing of the network's blocks.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

EnergyFn = Callable[[torch.Tensor], torch.Tensor]
# Maps the current chains to a standard-normal tensor of their shape (one call per step).
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LangevinSettings:
    """Settings of one sampler call (built from ``SamplerConfig``)."""

    steps: int = 20
    step_size: float = 1.0
    noise_std: float = 0.01
    kind: str = "sgld"  # "sgld" | "langevin" | "mala" | "annealed"
    grad_clip: float = 0.0  # per-step L-inf clip of dE/dx (IGEBM's 0.01); 0 = off
    clamp: tuple[float, float] | None = None  # data range, applied after every step (annealed: at the end)
    # annealed: noise levels, geometric from sigma_max down to sigma_min (steps = steps per level).
    levels: int = 10
    sigma_min: float = 0.01
    sigma_max: float = 1.0

    @classmethod
    def from_config(cls, config, clamp_range: tuple[float, float] | None) -> "LangevinSettings":
        """From a run's ``Config``: its ``sampler`` settings, and for annealed the noise range the
        noise-conditional energy was trained on (``objective.sigma_min/max``) unless
        ``sampler.sigma_min`` / ``sigma_max`` set the ladder's ends."""
        cfg, o = config.sampler, config.objective
        return cls(steps=cfg.steps, step_size=cfg.step_size, noise_std=cfg.noise_std, kind=cfg.kind,
                   grad_clip=cfg.grad_clip, clamp=clamp_range if cfg.clamp else None, levels=cfg.levels,
                   sigma_min=float(cfg.sigma_min or o.sigma_min), sigma_max=float(cfg.sigma_max or o.sigma_max))

    def coefficients(self) -> tuple[float, float]:
        """(gradient weight, noise std) of one step."""
        if self.kind in ("langevin", "mala"):
            return 0.5 * self.step_size ** 2, self.step_size
        return self.step_size, self.noise_std


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_layer(m: nn.Module) -> bool:
    """A leaf layer (Conv2d, Linear, an activation), spectral-norm parametrizations aside."""
    return all(name == "parametrizations" for name, _ in m.named_children())


def checkpoint_units(module: nn.Module) -> tuple[list[nn.Module], list[nn.Sequential]]:
    """Where activation checkpointing cuts an energy network, found from its structure alone
    (models stay free of training code):

    * blocks: composite modules held in an ``nn.ModuleList`` / ``nn.Sequential`` -- the IGEBM,
      WRN and ResNet residual blocks. Each is recomputed on its own in the backward pass, so only
      block inputs stay in memory;
    * sequences: ``nn.Sequential`` stacks of leaf layers (the strided CNN's body, the MLP's),
      checkpointed in about sqrt(n) segments.

    The outermost match wins and containers are looked into, so a stage of blocks is cut per
    block, never per stage."""
    blocks: list[nn.Module] = []
    sequences: list[nn.Sequential] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(m, (nn.Sequential, nn.ModuleList)) and not isinstance(child, _CONTAINERS) \
                    and not _is_layer(child):
                blocks.append(child)
            elif isinstance(child, nn.Sequential) and len(child) >= 2 and all(_is_layer(c) for c in child):
                sequences.append(child)
            else:
                visit(child)

    visit(module)
    return blocks, sequences


@contextlib.contextmanager
def _checkpointed(module: nn.Module) -> Iterator[None]:
    """Temporarily route the forward of every checkpoint unit of ``module`` through
    ``torch.utils.checkpoint`` (non-reentrant, so it composes with ``autograd.grad`` w.r.t. the
    chains while the parameters need no gradient)."""
    blocks, sequences = checkpoint_units(module)
    saved: list[tuple[nn.Module, object]] = []

    def patch(m: nn.Module, fn: Callable) -> None:
        saved.append((m, m.__dict__.get("forward")))  # an instance-level forward someone else set
        m.forward = fn

    for b in blocks:
        patch(b, lambda *args, _f=b.forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw))
    for q in sequences:
        segments = max(1, round(math.sqrt(len(q))))
        patch(q, lambda x, _q=q, _n=segments: checkpoint_sequential(_q, _n, x, use_reentrant=False))
    try:
        yield
    finally:
        for m, previous in reversed(saved):
            del m.forward
            if previous is not None:
                m.forward = previous


@contextlib.contextmanager
def sampling_mode(module: nn.Module, checkpointing: bool = False) -> Iterator[nn.Module]:
    """Put ``module`` in the state the sampler needs and restore it afterwards: eval mode (no
    spectral-norm power iteration, no dropout) and parameters with ``requires_grad=False`` (no
    parameter-gradient graph is built, so sampling is cheaper and cannot touch ``.grad``).

    ``checkpointing`` also turns on activation checkpointing of the network's blocks (see
    :func:`checkpoint_units`) for the duration: each Langevin step then keeps only block inputs
    alive and recomputes the rest in its backward pass -- about one extra forward per step for
    activation memory that no longer grows with depth. Safe only here: in eval mode the
    recomputed forward is identical (no power-iteration update, no dropout draw)."""
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        if checkpointing:
            with _checkpointed(module):
                yield module
        else:
            yield module
    finally:
        for p, req in flags:
            p.requires_grad_(req)
        module.train(was_training)


@dataclass
class InputGradScaler:
    """Dynamic scale for the input gradient dE/dx when energies run in fp16.

    fp16 stops at 6e-8 (subnormal), and the per-pixel gradients of an image energy (and the
    activation gradients behind them) fall below that, so they would flush to zero. The sampler
    differentiates ``scale * sum E`` instead and divides the fp32 result by ``scale``. A
    non-finite gradient means the scale overflowed a backward intermediate: the step's gradient is
    recomputed at half the scale (the noise is drawn only after, so the random stream is not
    shifted). After ``growth_interval`` clean steps the scale doubles again. Keep one instance
    across sampler calls (the trainer does) so the scale it learned carries over; the state is
    per rank and needs no communication.

    The initial scale is below fp16's maximum (65504) because the upstream gradient of each
    sample's energy *is* the scale, and it enters the fp16 backward as is."""

    scale: float = 2.0 ** 12
    growth_interval: int = 100
    max_scale: float = 2.0 ** 15
    min_scale: float = 1.0
    good_steps: int = 0
    backoffs: int = 0

    def grad(self, energy_and_sum: Callable[[], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """dE/dx in fp32, unscaled; ``energy_and_sum`` recomputes the summed energy (a retry
        needs a fresh graph)."""
        while True:
            (g,) = torch.autograd.grad(energy_and_sum() * self.scale, x)
            g = g.float() / self.scale
            if bool(torch.isfinite(g).all()) or self.scale <= self.min_scale:
                # At the minimum scale a non-finite gradient is the energy's own (e.g. an fp16
                # forward overflow), not the scale's: pass it on for divergence detection.
                break
            self.scale /= 2.0
            self.good_steps = 0
            self.backoffs += 1
        self.good_steps += 1
        if self.good_steps >= self.growth_interval and self.scale < self.max_scale:
            self.scale *= 2.0
            self.good_steps = 0
        return g

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "backoffs": self.backoffs}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.backoffs = int(state.get("backoffs", 0))


def langevin(energy_fn: EnergyFn, x0: torch.Tensor, settings: LangevinSettings,
             generator: torch.Generator | None = None, *, autocast_dtype: torch.dtype | None = None,
             trajectory: list | None = None, grads: list | None = None, noise_fn: NoiseFn | None = None,
             grad_scaler: InputGradScaler | None = None, stats: dict | None = None) -> torch.Tensor:
    """Run ``settings.steps`` Langevin steps from ``x0`` and return the final chains (detached,
    same dtype as ``x0``, which should be float32). ``energy_fn`` maps a batch to per-sample
    energies; it is evaluated under autocast when ``autocast_dtype`` is given, while the chains
    themselves stay in float32 and every update is computed in float32.

    With ``autocast_dtype=torch.float16`` the input gradient is loss-scaled by ``grad_scaler``
    (a fresh :class:`InputGradScaler` when None) so it does not underflow. Noise comes only from
    ``generator`` unless ``noise_fn`` supplies it (tests inject the slice of a global batch's
    noise). ``trajectory`` / ``grads``, when given, collect the chains after each step and the
    (unclipped, fp32) energy gradient of each step. ``settings.kind == "mala"`` runs
    :func:`ebmscale.sampling.mala.mala` (same arguments; ``stats`` collects its acceptance counts)
    and ``"annealed"`` :func:`ebmscale.sampling.annealed.annealed_langevin`, so every caller of the
    sampler gets them by configuration alone."""
    if settings.kind in ("mala", "annealed"):
        # Both import this module: resolved at call time.
        if settings.kind == "mala":
            from ebmscale.sampling.mala import mala as kind_fn
        else:
            from ebmscale.sampling.annealed import annealed_langevin as kind_fn
        return kind_fn(energy_fn, x0, settings, generator, autocast_dtype=autocast_dtype, trajectory=trajectory,
                       grads=grads, noise_fn=noise_fn, grad_scaler=grad_scaler, stats=stats)
    a, sigma = settings.coefficients()
    x = x0.detach().clone()
    device_type = x.device.type
    if autocast_dtype == torch.float16 and grad_scaler is None:
        grad_scaler = InputGradScaler()
    scaler = grad_scaler if autocast_dtype == torch.float16 else None

    def summed_energy() -> torch.Tensor:
        if autocast_dtype is not None:
            with torch.autocast(device_type=device_type, dtype=autocast_dtype):
                e = energy_fn(x)
        else:
            e = energy_fn(x)
        return e.float().sum()

    for _ in range(settings.steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            if scaler is not None:
                grad = scaler.grad(summed_energy, x)
            else:
                (grad,) = torch.autograd.grad(summed_energy(), x)
        grad = grad.float()
        if grads is not None:
            grads.append(grad.detach().clone())
        if settings.grad_clip > 0:
            grad = grad.clamp(-settings.grad_clip, settings.grad_clip)
        x = x.detach() - a * grad
        if sigma > 0:
            eps = (noise_fn(x) if noise_fn is not None
                   else torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator))
            x = x + sigma * eps
        if settings.clamp is not None:
            x = x.clamp(settings.clamp[0], settings.clamp[1])
        if trajectory is not None:
            trajectory.append(x.detach().clone())
    return x.detach()


def uniform_noise(n: int, shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Fresh chain starts, uniform over the data range (IGEBM/JEM's noise initialisation)."""
    lo, hi = bounds
    return torch.rand((n, *shape), generator=generator, device=device) * (hi - lo) + lo
