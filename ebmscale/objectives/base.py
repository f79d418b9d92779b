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
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ebmscale import dist
from ebmscale.sampling import InputGradScaler, LangevinSettings, NoiseFn, langevin, sampling_mode


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
    # The latest class-conditional (chains, labels), for monitoring (written by negatives()).
    last_class_chains: tuple[torch.Tensor, torch.Tensor] | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The loss precision's context (autocast for DDP in bf16/fp16)."""
        return self.parallel.autocast()

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        """The training forward of ``x`` (and e.g. labels) through the data-parallel wrapper."""
        with self.parallel.autocast():
            return self.wrapped(self.parallel.cast_input(x), *args)

    def langevin(self, x0: torch.Tensor, steps: int, gen: torch.Generator) -> torch.Tensor:
        """``steps`` steps of the configured sampler from ``x0`` on the frozen, unwrapped model."""
        settings = dataclasses.replace(self.settings, steps=steps)
        with sampling_mode(self.model, checkpointing=self.cfg.train.sampler_checkpointing) as m:
            return langevin(m, x0, settings, gen, autocast_dtype=self.parallel.autocast_dtype)

    def negatives(self, n: int, labels: torch.Tensor | None, rng: np.random.Generator,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chain starts (replay buffer or fresh) -> K Langevin steps -> write back. With ``labels``
        the chains are class-conditional: starts come from those classes' buffer partitions and
        the energy is E(x, y). Returns (x-, labels of x-)."""
        if self.cfg.sampler.init == "buffer":
            x0_np, idx = self.buffer.draw(n, None if labels is None else labels.cpu().numpy(), rng)
            x0 = torch.from_numpy(x0_np).to(self.device)
        else:
            x0 = self.chain_init(n, gen)
            idx = None
        if x0.dim() == 4:
            x0 = x0.contiguous(memory_format=self.memory_format)
        # The unwrapped module: no gradient all-reduce, no buffer broadcast, no ZeRO collective.
        with sampling_mode(self.model, checkpointing=self.cfg.train.sampler_checkpointing):
            m = self.sampler_energy
            fn = (lambda x: m(x, labels)) if labels is not None else m
            x_neg = langevin(fn, x0, self.settings, gen, autocast_dtype=self.parallel.autocast_dtype,
                             noise_fn=self.noise_fn(n, gen), grad_scaler=self.grad_scaler)
        if idx is not None:
            self.buffer.write_back(idx, x_neg.cpu().numpy())
        if labels is not None:
            self.last_class_chains = (x_neg, labels)
        return x_neg, labels

    def prefetch(self, n: int, streams: Streams, unlabelled: bool) -> None:
        """Send the next step's first buffer draw now (after this step's write-backs), so it
        overlaps the loss forward/backward; only unlabelled draws (the next labels are unknown)."""
        if unlabelled and self.cfg.sampler.init == "buffer":
            self.buffer.prefetch(n, streams.numpy("buffer", ahead=1))


class Estimator:
    """Base class of every objective: ``loss(x_pos, y, streams)`` -> (loss, stats, negatives or
    None); ``stats`` may hold ``sampler_time`` (seconds spent sampling, popped by the trainer)."""

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
