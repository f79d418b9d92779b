"""The one interface every training objective implements, and the narrow context it gets.

An objective (:class:`Estimator`) computes the loss of one step from this rank's positives; the
trainer does the rest (zeroing gradients first, then backward through the data-parallel wrapper,
the divergence check, clipping, optimizer step, EMA, checkpoints). It never sees the trainer: it
gets a :class:`Context` -- the energy forward through the wrapper under the loss precision, the
sampler (unwrapped energy, settings, input-gradient scaler, chain starts) and the replay buffer --
and each step a :class:`Streams`, the step's random streams derived from (seed, rank, step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ebmscale import dist
from ebmscale.models.common import frozen_power_iteration
from ebmscale.objectives.improved_cd import differentiable_step
from ebmscale.sampling import InputGradScaler, LangevinSettings, NoiseFn, energy_and_grad, langevin, sampling_mode


@dataclass(frozen=True)
class Streams:
    """The random streams of one step: a stream named ``name`` depends on (seed, rank, step, name)
    only, so a resumed run draws exactly what an uninterrupted one would have drawn."""

    seed: int
    rank: int
    step: int
    device: torch.device

    def torch(self, name: str) -> torch.Generator:
        return dist.torch_generator(self.seed, self.rank, self.step, name, self.device)

    def numpy(self, name: str, ahead: int = 0) -> np.random.Generator:
        """The NumPy stream ``name`` of this step (``ahead=1``: of the next step, for prefetching)."""
        return dist.numpy_rng(self.seed, self.rank, self.step + ahead, name)


@dataclass
class Context:
    """What an objective may use. ``model`` is the plain module (the sampler's energy, frozen by
    :func:`sampling_mode`); the loss forward goes through :meth:`forward` only (the wrapper: DDP
    averages the gradients, one spectral-norm power iteration per step)."""

    cfg: Any  # the run's Config: objective, sampler and optimizer settings
    model: nn.Module
    wrapped: nn.Module
    parallel: Any  # ebmscale.parallel.Parallel: autocast, input cast, autocast dtype
    sampler_energy: nn.Module  # the module or one torch.compile wrapper of it
    settings: LangevinSettings
    grad_scaler: InputGradScaler | None
    buffer: Any  # ebmscale.buffer: draw / write_back / prefetch
    device: torch.device
    shape: tuple[int, ...]
    init_bounds: tuple[float, float]
    toy: bool
    world: int
    memory_format: torch.memory_format = torch.contiguous_format
    # Fresh chain starts and the sampler's noise source (None = torch.randn on the generator):
    # seams that tests override (the trainer passes its own methods).
    chain_init: Callable[[int, torch.Generator], torch.Tensor] | None = None
    noise_fn: Callable[[int, torch.Generator], NoiseFn | None] | None = None
    # The next batch's labels (read one batch ahead from the stream), for a labelled prefetch.
    next_labels: Callable[[], torch.Tensor | None] | None = None
    # The latest class-conditional (chains, labels), for monitoring (written by negatives()).
    last_class_chains: tuple[torch.Tensor, torch.Tensor] | None = None
    # Index of the micro-batch within the step (optim.accumulate; set by the trainer).
    micro: int = 0
    # MALA's accepted / proposed chain-steps of the current step's sampler calls (sampler.kind=mala;
    # the trainer reads and clears them).
    sampler_counts: dict = dataclasses.field(default_factory=dict)
    # Seconds spent in replay-buffer calls (draw, write-back, prefetch, peek) this step: the step's
    # buffer_time, which the trainer subtracts from the objective's sampler_time.
    buffer_time: float = 0.0

    def new_step(self) -> None:
        """Zero the per-step counters (MALA's acceptance counts, the buffer time)."""
        self.sampler_counts.clear()
        self.buffer_time = 0.0

    def buffer_call(self, method: str, *args: Any) -> Any:
        """``self.buffer.<method>(*args)``, its wall-clock time added to :attr:`buffer_time` (with
        the Ray buffer: the round trip or the wait for a prefetched draw, the sends of write-backs)."""
        t0 = time.perf_counter()
        try:
            return getattr(self.buffer, method)(*args)
        finally:
            self.buffer_time += time.perf_counter() - t0

    def autocast(self) -> contextlib.AbstractContextManager:
        """The loss precision's context (autocast for DDP in bf16/fp16)."""
        return self.parallel.autocast()

    def forward_context(self) -> contextlib.ExitStack:
        """Context of the wrapped loss forward: the loss precision's autocast, and from the second
        micro-batch of a step on a frozen power iteration, so that it advances once per step, as
        one forward over the whole batch would (entered around the forward only: the sampler's
        ``sampling_mode`` restores the module's modes when it returns)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.parallel.autocast())
        if self.micro:
            stack.enter_context(frozen_power_iteration(self.model))
        return stack

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        """The training forward of ``x`` (and e.g. labels) through the data-parallel wrapper."""
        with self.forward_context():
            return self.wrapped(self.parallel.cast_input(x), *args)

    def langevin(self, x0: torch.Tensor, steps: int, gen: torch.Generator) -> torch.Tensor:
        """``steps`` steps of the configured sampler from ``x0`` on the frozen, unwrapped model."""
        settings = dataclasses.replace(self.settings, steps=steps)
        with sampling_mode(self.model, checkpointing=self.cfg.train.sampler_checkpointing) as m:
            return langevin(m, x0, settings, gen, autocast_dtype=self.parallel.autocast_dtype,
                            stats=self.sampler_counts)

    def frozen_energy_and_grad(self, x: torch.Tensor, labels: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies and dE/dx on the frozen, unwrapped model (no parameter gradients, no
        collectives, no power-iteration step), energies under autocast as in the sampler."""
        with sampling_mode(self.model) as m:
            fn = (lambda z: m(z, labels)) if labels is not None else m
            return energy_and_grad(fn, x, autocast_dtype=self.parallel.autocast_dtype)

    def negatives(self, n: int, labels: torch.Tensor | None, rng: np.random.Generator,
                  gen: torch.Generator, last_step: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chain starts (replay buffer or fresh) -> K Langevin steps -> write back. With ``labels``
        the chains are class-conditional: starts come from those classes' buffer partitions and
        the energy is E(x, y). Returns (x-, labels of x-). With ``last_step`` (a list; improved
        CD's KL term) the K-th step keeps its graph to the parameters and its result is appended
        there."""
        if self.cfg.sampler.init == "buffer":
            x0_np, idx = self.buffer_call("draw", n, None if labels is None else labels.cpu().numpy(), rng)
            x0 = torch.from_numpy(x0_np).to(self.device)
        else:
            x0 = self.chain_init(n, gen)
            idx = None
        if x0.dim() == 4:
            x0 = x0.contiguous(memory_format=self.memory_format)
        # The unwrapped module: no gradient all-reduce, no buffer broadcast, no ZeRO collective.
        noise_fn = self.noise_fn(n, gen)
        settings = self.settings if last_step is None else dataclasses.replace(self.settings,
                                                                               steps=self.settings.steps - 1)
        with sampling_mode(self.model, checkpointing=self.cfg.train.sampler_checkpointing):
            m = self.sampler_energy
            fn = (lambda x: m(x, labels)) if labels is not None else m
            x_neg = langevin(fn, x0, settings, gen, autocast_dtype=self.parallel.autocast_dtype,
                             noise_fn=noise_fn, grad_scaler=self.grad_scaler, stats=self.sampler_counts)
        if last_step is not None:
            last_step.append(self._kl_last_step(x_neg, labels, gen, noise_fn))
            x_neg = last_step[-1].detach()
        if idx is not None:
            self.buffer_call("write_back", idx, x_neg.cpu().numpy())
        if labels is not None:
            self.last_class_chains = (x_neg, labels)
        return x_neg, labels

    def _kl_last_step(self, x: torch.Tensor, labels: torch.Tensor | None, gen: torch.Generator,
                      noise_fn: NoiseFn | None) -> torch.Tensor:
        """The sampler's last step with its graph to the parameters (improved CD's KL term): the
        unwrapped module in eval mode (no power-iteration step), its parameters live; the same
        update rule, noise stream, clip and clamp as the other steps."""
        a, sigma = self.settings.coefficients()
        noise = noise_fn(x) if noise_fn is not None else torch.randn(x.shape, device=x.device, dtype=x.dtype,
                                                                      generator=gen)
        m, was_training = self.model, self.model.training
        fn = (lambda z: m(z, labels)) if labels is not None else m
        m.eval()
        try:
            with self.parallel.autocast():
                return differentiable_step(fn, x, a, sigma, noise, self.settings.grad_clip, self.settings.clamp)
        finally:
            m.train(was_training)

    def prefetch(self, n: int, streams: Streams, labelled: bool) -> None:
        """Send the next micro-batch's first buffer draw now (after this one's write-backs), so it
        overlaps the loss forward/backward. A labelled draw takes the next batch's labels, read
        one batch ahead from the stream (only where the buffer prefetches: the Ray host)."""
        if self.cfg.sampler.init != "buffer" or not getattr(self.buffer, "use_prefetch", False):
            return
        labels = None
        if labelled:
            labels = self.next_labels()[:n].numpy()
        self.buffer_call("prefetch", n, streams.numpy("buffer", ahead=1), labels)


class Estimator:
    """Base class of every objective: ``loss(x_pos, y, streams)`` -> (loss, stats, negatives or
    None); ``stats`` may hold ``sampler_time`` (seconds spent sampling, buffer calls included: the
    trainer pops it and subtracts the context's ``buffer_time``)."""

    # Persistent chains in a replay buffer (PCD, JEM); the others get a one-slot local buffer,
    # which keeps the state layout and starts no Ray.
    keeps_chains = False

    @staticmethod
    def forward_module(model: nn.Module) -> nn.Module:
        """What the data-parallel wrapper wraps: the model, or an adapter sharing its parameters."""
        return model

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.o = ctx.cfg.objective

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward: through the data-parallel wrapper, in the loss precision."""
        e = self.ctx.forward(x).float()
        self._last_energy = e
        return e

    def _tie_constant(self, loss: torch.Tensor) -> torch.Tensor:
        """Score-based losses do not depend on the energy's additive constant (the head's bias gets
        no gradient), and DDP stops at a parameter that received none. A zero-weighted energy term
        keeps every parameter in the graph with an exactly zero contribution -- cheaper than
        ``find_unused_parameters``, which traverses the graph every step."""
        return loss + 0.0 * self._last_energy.sum()

    def langevin(self, x0: torch.Tensor, steps: int, gen: torch.Generator) -> torch.Tensor:
        return self.ctx.langevin(x0, steps, gen)

    def normal(self, shape: tuple, gen: torch.Generator) -> torch.Tensor:
        """Standard-normal draws of ``shape`` (first dimension: the batch) from this rank's stream."""
        return torch.randn(shape, generator=gen, device=self.ctx.device)

    def uniform(self, shape: tuple, gen: torch.Generator) -> torch.Tensor:
        """Uniform [0, 1) draws of ``shape`` (first dimension: the batch) from this rank's stream."""
        return torch.rand(shape, generator=gen, device=self.ctx.device)

    def frozen_energy_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ctx.frozen_energy_and_grad(x)

    def loss(self, x_pos: torch.Tensor, y: torch.Tensor | None,
             streams: Streams) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after the energy's optimizer step (extra parameters' updates)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def average_grads(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of parameters outside the wrapped module across ranks (one
    all-reduce of their concatenation; no-op in one process)."""
    if world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce_sum(flat).div_(world)
    i = 0
    for p, g in zip(params, grads):
        p.grad = flat[i:i + g.numel()].view_as(g).clone()
        i += g.numel()
