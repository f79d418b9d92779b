"""The training loop: ``train(cfg)``, ``Trainer.train_step()``, ``Trainer.state_dict()``.

One step of maximum-likelihood training with persistent chains:

1. take this rank's batch of positives x+ (uint8 from the stream, converted on the device);
2. draw chain starts from the replay buffer (or fresh noise for short-run sampling);
3. run K Langevin steps on the *unwrapped* module in sampling mode (no parameter gradients, no
   spectral-norm power iteration, no communication), write the chains back to the buffer;
4. one forward of [x+, x-] through the data-parallel wrapper (DDP or a DeepSpeed engine, see
   ``ebmscale.parallel``), the PCD loss, backward (gradients averaged across ranks), clip,
   optimizer step, EMA.

Mixed precision (``train.precision``) applies to the sampler's energy evaluations and to the loss
forward; chains, losses and master weights stay fp32.

All randomness of a step comes from streams derived from (seed, rank, step), so a resumed run
repeats exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ebmscale import dist, monitor, runguard
from ebmscale.buffer import build_buffer
from ebmscale.buffer import shardfile
from ebmscale.buffer.client import as_numpy
from ebmscale.buffer.reshard import reshard_buffer_states
from ebmscale.checkpoint import (BUFFER_FILE, DEEPSPEED_DIR, SHARED_FILE, CheckpointError, StepCheckpoint,
                                 complete_checkpoints, hang_for_tests, rank_file, resolve, save_checkpoint, step_dir)
from ebmscale.config import (TOY_DATASETS, Config, ConfigError, class_conditional_chains, dump_yaml, to_dict,
                             tracker_names)
from ebmscale.data import build_train_stream, data_shape
from ebmscale.data.lookahead import Lookahead
from ebmscale.data.reshard import remap_stream_state
from ebmscale.data.transforms import data_bounds, to_model_input
from ebmscale.metrics import MetricLogger
from ebmscale.models import build_model
from ebmscale.models.common import frozen_power_iteration
from ebmscale.objectives import ESTIMATOR_KINDS, build_estimator, jem_loss, pcd_loss
from ebmscale.objectives.improved_cd import differentiable_step, kl_surrogate, nn_entropy
from ebmscale.parallel import Parallel, resolve_device, start_trackers  # noqa: F401 (resolve_device: re-exported)
from ebmscale.performance import (compiled_energy, half_precision_gradient_errors, resolve_runtime,
                                  reuse_freed_cpu_memory)
from ebmscale.sampling import (InputGradScaler, LangevinSettings, NoiseFn, acceptance_rate, energy_and_grad, langevin,
                               sampling_mode, uniform_noise)

class DivergenceError(RuntimeError):
    """Training diverged; the message names the step and the metric that tripped."""


@dataclass
class TrainResult:
    steps: int
    run_dir: str
    last_metrics: dict
    checkpoint: str | None


def lr_factor(step: int, warmup: int, decay_steps: list, decay_factor: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then x ``decay_factor`` at each decay step."""
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return f * decay_factor ** sum(step >= s for s in decay_steps)


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


class LogitsForward(nn.Module):
    """What the data-parallel wrapper runs for JEM: the classifier's logits. DDP and DeepSpeed only
    hook a module's ``forward``, and JEM's one training forward per step needs ``logits``; the
    adapter owns no parameters of its own, so wrapping it wraps exactly the model's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)


class Trainer:
    """Owns model, optimizer, buffer, stream and counters for one rank.

    ``self.model`` is the plain module (what the sampler, EMA, checkpoints and tests use);
    ``self.wrapped`` is what the loss forward runs through (the model itself in one process).
    """

    def __init__(self, cfg: Config, run_dir: str | None = None):
        self.cfg = cfg
        self.run_dir = run_dir or cfg.train.run_dir
        self.toy = cfg.data.dataset in TOY_DATASETS
        self.shape = data_shape(cfg)
        # Device, backend, precision, layout, compile, allocator: resolved once, read everywhere.
        self.runtime = resolve_runtime(cfg, image_data=len(self.shape) == 3)
        # The process group comes up first: rank, world and device come from it.
        self.parallel = Parallel(cfg, self.runtime)
        self.rank, self.world = self.parallel.rank, self.parallel.world
        self.device = self.parallel.device
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.bounds = (-math.inf, math.inf) if self.toy else data_bounds(cfg.data.range)
        self.init_bounds = self._init_bounds()
        # Model init from the global seed only: identical on every rank.
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, self.shape).to(self.device)
        if self.runtime.reuse_cpu_memory:
            reuse_freed_cpu_memory()
        # channels_last makes conv kernels markedly faster on CPU and GPU; layout only, same math.
        self.memory_format = torch.channels_last if self.runtime.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        # What the sampler evaluates: the module itself, or one torch.compile wrapper of it, built
        # once (it shares the module's parameters, so training updates reach it).
        self.sampler_energy = compiled_energy(self.model) if self.runtime.compile else self.model
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.optim.ema > 0 else None
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        o = cfg.optim
        # Counters that survive a restart (see state_dict): rollbacks so far, the seed the per-rank
        # streams derive from (a fresh one after each rollback), and the rollbacks' LR multiplier.
        self.rollbacks, self.seed, self.lr_scale = 0, cfg.train.seed, 1.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: self.lr_scale * lr_factor(s, o.warmup_steps, o.decay_steps, o.decay_factor))
        # Only the loss forward/backward goes through the wrapper (after the EMA copy, which
        # stays fp32 even where DeepSpeed casts the module to half precision).
        forward_module = LogitsForward(self.model) if cfg.objective.kind == "jem" else self.model
        self.wrapped = self.parallel.prepare(forward_module, self.optimizer)
        self.input_grad_scaler = InputGradScaler() if self.runtime.precision == "fp16" else None
        # One batch of lookahead: the next batch's labels let a class-conditional buffer draw be
        # prefetched (_prefetch_next); the batches and the checkpointed position are unchanged.
        self.stream = Lookahead(build_train_stream(cfg, self.rank, self.world))
        self.conditional = cfg.model.conditional
        # Class-partitioned buffer whenever chains are class-conditional (JEM's p(x, y) term too).
        partitioned = class_conditional_chains(cfg)
        # One in-process buffer per rank, or the global one on Ray (config buffer.backend). The other
        # estimators keep no persistent chains: a one-slot in-process buffer keeps the state layout
        # and starts no Ray.
        bcfg = cfg
        if cfg.objective.kind in ESTIMATOR_KINDS:
            bcfg = dataclasses.replace(cfg, buffer=dataclasses.replace(cfg.buffer, capacity=1, backend="local"))
        self.buffer = build_buffer(bcfg, self.shape, self.init_bounds, cfg.model.num_classes if partitioned else 0,
                                   self.rank, self.world, cfg.train.seed)
        # Toy chains are clamped to the quadrature box: the exact evaluation normalises over it.
        self.settings = LangevinSettings.from_config(cfg.sampler, self.init_bounds if self.toy else self.bounds)
        self.step = 0
        self.micro = 0  # index of the micro-batch within the step (optim.accumulate)
        self.metrics = MetricLogger(self.run_dir if dist.is_main() else None,
                                    start_trackers(tracker_names(cfg.train), self.run_dir, to_dict(cfg)))
        self.last_negatives: torch.Tensor | None = None
        # For the monitor's images and histograms: the latest (positives, labels) and class-conditional
        # (chains, labels).
        self.last_positives: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.last_class_chains: tuple[torch.Tensor, torch.Tensor] | None = None
        # MALA's accepted / proposed chain-steps of the current step (sampler.kind=mala).
        self.sampler_counts: dict = {}
        # CD-k, score matching, NCE, adversarial, KSD (None for pcd/jem): ebmscale.objectives.estimators.
        self.estimator = build_estimator(self)
        self.saved_step: int | None = None  # step of the checkpoint last written or loaded
        self.precision_checked = False  # the half-precision canary runs on this process's first step

    def _init_bounds(self) -> tuple[float, float]:
        """Range of uniform chain initialisation: the data range for images, the quadrature
        box for toy sets."""
        if not self.toy:
            return data_bounds(self.cfg.data.range)
        from ebmscale.data.toy import get_toy

        return tuple(get_toy(self.cfg.data.dataset).bounds)

    # ------------------------------------------------------------------ one step
    @property
    def tick(self) -> int:
        """What this micro-batch's random streams derive from, with (seed, rank): step x
        optim.accumulate + micro-batch index -- the step itself without accumulation."""
        return self.step * self.cfg.optim.accumulate + self.micro

    def _positives(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        y = None if y is None else y.to(self.device)
        if self.toy:
            return x.float(), y
        g = dist.torch_generator(self.seed, self.rank, self.tick, "augment", self.device)
        d = self.cfg.data
        x = to_model_input(x, d.range, flip=d.flip, noise_std=d.noise_std, generator=g)
        return x.contiguous(memory_format=self.memory_format), y

    def _negatives(self, n: int, labels: torch.Tensor | None, rng: np.random.Generator,
                   gen: torch.Generator, last_step: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chain starts -> K Langevin steps -> write back. With ``labels`` the chains are
        class-conditional: starts come from those classes' buffer partitions and the energy is
        E(x, y). Returns (x-, labels of x-). With ``last_step`` (a list; improved CD's KL term) the
        K-th step keeps its graph to the parameters and its result is appended there."""
        cfg = self.cfg
        if cfg.sampler.init == "buffer":
            x0_np, idx = self.buffer.draw(n, None if labels is None else labels.cpu().numpy(), rng)
            x0 = torch.from_numpy(x0_np).to(self.device)
        else:
            x0 = self._chain_init(n, gen)
            idx = None
        if x0.dim() == 4:
            x0 = x0.contiguous(memory_format=self.memory_format)
        # The unwrapped module: no gradient all-reduce, no buffer broadcast, no ZeRO collective.
        noise_fn = self._noise_fn(n, gen)
        settings = self.settings if last_step is None else dataclasses.replace(self.settings,
                                                                               steps=self.settings.steps - 1)
        with sampling_mode(self.model, checkpointing=cfg.train.sampler_checkpointing):
            m = self.sampler_energy
            fn = (lambda x: m(x, labels)) if labels is not None else m
            x_neg = langevin(fn, x0, settings, gen, autocast_dtype=self.parallel.autocast_dtype,
                             noise_fn=noise_fn, grad_scaler=self.input_grad_scaler,
                             stats=self.sampler_counts)
        if last_step is not None:
            last_step.append(self._kl_last_step(x_neg, labels, gen, noise_fn))
            x_neg = last_step[-1].detach()
        if idx is not None:
            self.buffer.write_back(idx, x_neg.cpu().numpy())
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

    def _kl_terms(self, x_tilde: torch.Tensor, labels: torch.Tensor | None,
                  past: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """Improved CD's objective.kl_weight * (E_frozen(x~) - entropy_weight * H_nn(x~)), as the
        surrogate whose gradient flows through the last sampler step only (see improved_cd)."""
        o = self.cfg.objective
        with sampling_mode(self.model) as m:
            fn = (lambda z: m(z, labels)) if labels is not None else m
            e, g = energy_and_grad(fn, x_tilde.detach(), autocast_dtype=self.parallel.autocast_dtype)
        term = kl_surrogate(x_tilde, g)
        stats = {"kl_energy": e.mean()}
        if past is not None:
            ent = nn_entropy(x_tilde, past)
            term = term - o.entropy_weight * ent
            stats["entropy"] = ent.detach()
        return o.kl_weight * term, stats

    def _prefetch_next(self, n: int, labelled: bool) -> None:
        """Send the next micro-batch's first buffer draw now (after this one's write-backs), so it
        overlaps the loss forward/backward. A labelled draw takes the next batch's labels, read
        one batch ahead from the stream (only where the buffer prefetches: the Ray host)."""
        if self.cfg.sampler.init != "buffer" or not getattr(self.buffer, "use_prefetch", False):
            return
        labels = None
        if labelled:
            y = self.stream.peek()[1]
            labels = y[:n].numpy()
        self.buffer.prefetch(n, dist.numpy_rng(self.seed, self.rank, self.tick + 1, "buffer"), labels)

    def _chain_init(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Fresh chain starts for short-run sampling (uniform over the data range, this rank's
        stream). A seam for tests that feed every world size the same global starts."""
        return uniform_noise(n, self.shape, self.init_bounds, gen, self.device)

    def _noise_fn(self, n: int, gen: torch.Generator) -> NoiseFn | None:
        """The sampler's noise source; None = ``torch.randn`` on this rank's generator. A seam like
        :meth:`_chain_init`."""
        return None

    def _forward_context(self) -> contextlib.ExitStack:
        """Context of the wrapped loss forward: autocast, and from the second micro-batch of a step
        on a frozen power iteration, so that it advances once per step, as one forward over the
        whole batch would (entered here, not around the micro-batch: the sampler's
        ``sampling_mode`` restores the module's modes when it returns)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.parallel.autocast())
        if self.micro:
            stack.enter_context(frozen_power_iteration(self.model))
        return stack

    def _micro_step(self) -> tuple[torch.Tensor, dict, torch.Tensor | None, int, float, float]:
        """One micro-batch: positives, chains (with their buffer write-backs), the loss forward
        through the wrapper. Returns (loss, stats, negatives, batch size, data seconds, sampler
        seconds)."""
        cfg, seed = self.cfg, self.seed
        t0 = time.perf_counter()
        x_pos, y = self._positives(next(self.stream))
        n = x_pos.shape[0]
        if not self.precision_checked:
            self.check_half_precision(x_pos, y)
        t1 = time.perf_counter()
        rng = dist.numpy_rng(seed, self.rank, self.tick, "buffer")
        gen = dist.torch_generator(seed, self.rank, self.tick, "langevin", self.device)
        o = cfg.objective
        # Chains per step: sampler.batch_size, or one per data example.
        m = cfg.sampler.batch_size or n
        if o.kind == "jem":
            parts = [x_pos]
            if o.px_weight > 0:
                parts.append(self._negatives(m, None, rng, gen)[0])
            if o.pxy_weight > 0:
                x_neg_y, y_neg = self._negatives(m, y[:m], rng, gen)
                parts.append(x_neg_y)
            t2 = time.perf_counter()
            self._prefetch_next(m, labelled=o.px_weight == 0)
            # One wrapped forward over every batch: one spectral-norm power iteration per step.
            with self._forward_context():
                logits = self.wrapped(self.parallel.cast_input(torch.cat(parts))).split([n] + [m] * (len(parts) - 1))
            it = iter(logits[1:])
            l_neg = next(it) if o.px_weight > 0 else None
            l_neg_y = next(it) if o.pxy_weight > 0 else None
            loss, stats = jem_loss(logits[0], y, l_neg, l_neg_y, y_neg if o.pxy_weight > 0 else None,
                                   clf_weight=o.clf_weight, px_weight=o.px_weight, pxy_weight=o.pxy_weight,
                                   alpha=o.alpha)
            x_neg = parts[1] if len(parts) > 1 else x_pos
        elif self.estimator is not None:
            x_neg, loss, stats, t2 = self._objective_step(x_pos, t1)
        else:
            # Improved CD: past chains for the entropy term, read before this step writes any back.
            kl = [] if o.kl_weight > 0 else None
            past = None
            if kl is not None and o.entropy_weight > 0:
                past_rng = dist.numpy_rng(seed, self.rank, self.tick, "entropy")
                past = torch.from_numpy(self.buffer.peek(o.entropy_batch, past_rng)).to(self.device)
            x_neg, y_neg = self._negatives(m, y[:m] if self.conditional else None, rng, gen, last_step=kl)
            t2 = time.perf_counter()
            self._prefetch_next(m, labelled=self.conditional)
            x_all = self.parallel.cast_input(torch.cat([x_pos, x_neg]))
            # One wrapped forward over [x+, x-]: one spectral-norm power iteration per step.
            with self._forward_context():
                e_all = self.wrapped(x_all, torch.cat([y, y_neg])) if self.conditional else self.wrapped(x_all)
            loss, stats = pcd_loss(e_all[:n], e_all[n:], o.alpha)
            if kl:
                term, kl_stats = self._kl_terms(kl[0], y_neg, past)
                loss, stats = loss + term, {**stats, **kl_stats}
        self.last_positives = (x_pos, y)  # the monitor's images and histograms
        return loss, stats, x_neg, n, t1 - t0, t2 - t1

    def train_step(self) -> dict[str, float]:
        """One optimisation step over ``optim.accumulate`` micro-batches (each with its own data,
        chains and buffer write-backs; gradients averaged over them and across ranks); returns
        this rank's (unreduced) statistics."""
        cfg = self.cfg
        k = cfg.optim.accumulate
        t0 = time.perf_counter()
        self.model.train()
        self.sampler_counts.clear()
        self.parallel.zero_grad(self.optimizer)
        stats: dict[str, float] = {}
        negatives, n, data_time, sampler_time = [], 0, 0.0, 0.0
        for j in range(k):
            self.micro = j
            with self.parallel.micro_batch(j):
                loss, micro_stats, x_neg, n_j, t_data, t_sampler = self._micro_step()
                if cfg.train.inject_nan_at_step == self.step + 1 and self.rank == 0 and j == 0 \
                        and self.rollbacks < cfg.train.inject_nan_repeats:
                    loss = loss * math.nan  # debug/tests: a real NaN through backward and the divergence check
                    micro_stats = {**micro_stats, "loss": loss.detach()}
                # Backward averages the gradients across ranks on the last micro-batch (and under
                # DeepSpeed then also steps).
                self.parallel.backward(loss)
            for key, v in micro_stats.items():  # equal micro-batches: the mean of means is the mean
                stats[key] = stats.get(key, 0.0) + float(v) / k
            negatives.append(x_neg)
            n, data_time, sampler_time = n + n_j, data_time + t_data, sampler_time + t_sampler
        self.micro = 0
        grad_norm, overflow = self.parallel.clip_grad_norm(self.optimizer, self.model.parameters(),
                                                           cfg.optim.grad_clip_norm)
        self._check_divergence(stats, grad_norm, overflow)
        self.parallel.step(self.optimizer)
        if self.estimator is not None:
            self.estimator.after_step()
        self.scheduler.step()
        if self.ema is not None:
            self._update_ema()
        self.step += 1
        self.last_negatives = negatives[0] if k == 1 else torch.cat(negatives)
        t3 = time.perf_counter()
        out: dict[str, float | None] = dict(stats)
        # None = no value this step (an fp16 overflow, or DeepSpeed not computing the norm).
        out.update(grad_norm=grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                   sampler_time=sampler_time, data_time=data_time, step_time=t3 - t0,
                   samples_per_s=n / (t3 - t0), lr=self.optimizer.param_groups[0]["lr"])
        if cfg.sampler.kind == "mala":  # None on a step without sampling (weight 0 in the metrics)
            out["accept_rate"] = acceptance_rate(self.sampler_counts)
        if self.runtime.precision == "fp16":
            out.update(skipped_step=float(overflow), grad_scale=self.parallel.grad_scale(),
                       sampler_grad_scale=self.input_grad_scaler.scale)
        return out

    def _objective_step(self, x_pos: torch.Tensor, t1: float) -> tuple[torch.Tensor | None, torch.Tensor, dict, float]:
        """The loss of an estimator of ``ebmscale.objectives.estimators`` (its energy forward goes
        through the wrapper); returns (negatives or None, loss, stats, end of its sampling time)."""
        gen = dist.torch_generator(self.seed, self.rank, self.tick, "objective", self.device)
        loss, stats, x_neg = self.estimator.loss(x_pos, gen)
        self.sampler_counts.update(self.estimator.sampler_counts)
        self.estimator.sampler_counts.clear()
        return x_neg, loss, stats, t1 + float(stats.pop("sampler_time", 0.0))

    def check_half_precision(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """The half-precision canary (``train.precision_check``): before the first update, the
        gradients of this batch's energies in the run's bf16/fp16 against fp32, per tensor. A kernel
        that is wrong on this hardware (like oneDNN's bf16 weight gradient for some stride-2 convs,
        see :class:`ebmscale.models.common.Conv2d`) stops the run with one line naming the layer,
        on every rank together, before it can corrupt a weight."""
        self.precision_checked = True
        tol = self.cfg.train.precision_check
        if not tol or self.runtime.autocast_dtype is None:
            return
        labels = y if self.conditional else None
        errors = half_precision_gradient_errors(self.model, lambda m, xi: m(xi, labels), x, self.runtime)
        bad = {k: v for k, v in errors.items() if not v <= tol}
        flag = torch.tensor([float(bool(bad))])
        if self.world > 1:
            dist.all_reduce_max(flag)
        if flag.item():
            what = (", ".join(f"'{k}' ({v:.3g})" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:3])
                    if bad else "a layer on another rank")
            raise ConfigError(f"{self.runtime.precision} gradients disagree with fp32 on this {self.device.type} "
                              f"(relative error > train.precision_check={tol:g}): {what}; a kernel is wrong for "
                              f"this layer here: set train.precision=fp32")

    def _check_divergence(self, stats: dict, grad_norm: float | None, overflow: bool = False) -> None:
        """Raise :class:`DivergenceError` naming the step and the metric. With several ranks the
        decision is global (one small all-reduce), because a rank that stopped alone would leave
        the others waiting in the next collective."""
        t = self.cfg.train
        checks = [("loss", float(stats["loss"]), math.inf)]
        if grad_norm is not None and not overflow:  # an fp16 overflow is a skipped step, not a divergence
            checks.append(("grad_norm", float(grad_norm), t.max_grad_norm))
        checks += [(k, float(stats[k]), t.max_abs_energy) for k in ("e_pos", "e_neg", "e_pos_y", "e_neg_y") if k in stats]
        if self.world > 1:
            values = [v for _, v, _ in checks]
            worst = torch.tensor([float(not math.isfinite(v)) for v in values]
                                 + [abs(v) if math.isfinite(v) else 0.0 for v in values], dtype=torch.float64)
            dist.all_reduce_max(worst)
            k = len(values)
            checks = [(name, math.nan if worst[i] > 0 else float(worst[k + i]), limit)
                      for i, (name, _, limit) in enumerate(checks)]
        for name, value, limit in checks:
            if not math.isfinite(value) or abs(value) > limit:
                where = "" if self.world == 1 else " on some rank"
                raise DivergenceError(f"training diverged at step {self.step}: {name}={value:.4g}{where} "
                                      f"(limit {limit:.4g}; see train.max_abs_energy / train.max_grad_norm)")

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.cfg.optim.ema
        for pe, p in zip(self.ema.parameters(), self.model.parameters()):
            pe.lerp_(p.detach().to(pe.dtype), 1.0 - d)  # the module may be half precision (DeepSpeed)
        for be, b in zip(self.ema.buffers(), self.model.buffers()):
            be.copy_(b)

    # ------------------------------------------------------------------ state
    @property
    def buffer_is_global(self) -> bool:
        """A global (Ray-hosted) buffer is saved once by rank 0; a local one by every rank."""
        return bool(getattr(self.buffer, "is_global", False))

    def shared_state(self) -> dict:
        """What is identical on every rank (written once, by rank 0): config, counters, model,
        EMA, optimizer, scheduler, loss scaler."""
        return {
            "config": to_dict(self.cfg),
            "step": self.step,
            "counters": {"rollbacks": self.rollbacks, "seed": self.seed, "lr_scale": self.lr_scale},
            "model": self.model.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            # Under DeepSpeed the optimizer state is sharded across ranks: it lives in DEEPSPEED_DIR.
            "optimizer": None if self.parallel.is_deepspeed else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "precision": self.parallel.state_dict(),
            "runtime": self.runtime.to_dict(),  # what this run resolved to (information only)
        }

    def rank_state(self) -> dict:
        """What each rank owns: RNG states, data position, its buffer shard, the sampler's scaler."""
        return {
            "rank": self.rank,
            "world": self.world,
            "buffer": None if self.buffer_is_global else self.buffer.state_dict(),
            "stream": self.stream.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "sampler_grad_scaler": None if self.input_grad_scaler is None else self.input_grad_scaler.state_dict(),
            "objective": None if self.estimator is None else self.estimator.state_dict(),
        }

    def state_dict(self) -> dict:
        """This rank's complete state (shared part and own part) as one dict; with a global buffer
        it holds the buffer's state too (every shard on rank 0), so that an in-memory round trip
        restores it. Checkpoints store that part as the shards' own files (Trainer.save)."""
        state = {**self.shared_state(), **self.rank_state()}
        if self.buffer_is_global:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` output (or a checkpoint's shared state merged with
        one rank's part, re-sharded to this rank when the world size changed)."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if state["optimizer"] is not None and not self.parallel.is_deepspeed:
            self.optimizer.load_state_dict(state["optimizer"])
        elif state["optimizer"] is None and not self.parallel.is_deepspeed:
            dist.print0("warning: the checkpoint's optimizer state is in DeepSpeed shards; "
                        "this DDP run starts the optimizer afresh")
        counters = state.get("counters") or {}
        self.rollbacks = int(counters.get("rollbacks", 0))
        self.seed = int(counters.get("seed", self.cfg.train.seed))
        self.lr_scale = float(counters.get("lr_scale", 1.0))
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_lr()
        self.parallel.load_state_dict(state.get("precision") or {})
        if self.input_grad_scaler is not None and state.get("sampler_grad_scaler"):
            self.input_grad_scaler.load_state_dict(state["sampler_grad_scaler"])
        if state.get("buffer") is not None:
            self.buffer.load_state_dict(as_numpy(state["buffer"]))
        self.stream.load_state_dict(state["stream"])
        if self.estimator is not None and state.get("objective") is not None:
            self.estimator.load_state_dict(state["objective"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = int(state["step"])

    def _apply_lr(self) -> None:
        """Set the optimizer's learning rate from the scheduler at its current step (after a load
        or a change of ``lr_scale``): the same formula ``scheduler.step()`` uses."""
        lam = self.scheduler.lr_lambdas[0]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * lam(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def save(self) -> str:
        """Write checkpoint ``<run_dir>/checkpoints/step-<step>/`` (collective: call on every
        rank) and keep the newest ``train.keep_checkpoints``; see :mod:`ebmscale.checkpoint`."""
        # A global buffer: every rank's write-backs land first, then each shard writes its own files.
        self.buffer.flush()
        path = save_checkpoint(self.run_dir, self.step, shared=self.shared_state() if self.rank == 0 else None,
                               rank_state=self.rank_state(),
                               write_sharded=self.parallel.save_sharded if self.parallel.is_deepspeed else None,
                               write_global=self.buffer.save_shards if self.buffer_is_global else None,
                               keep=self.cfg.train.keep_checkpoints)
        self.saved_step = self.step
        return path

    def _read_checkpoint(self, ck: StepCheckpoint) -> tuple[dict, dict | None]:
        """Read and verify everything this rank needs from ``ck``: (its merged state, the global
        buffer's state for rank 0 or None). Raises CheckpointError naming a bad file."""
        state = ck.read(SHARED_FILE)
        if ck.world == self.world:
            state.update(ck.read(rank_file(self.rank)))
        else:
            if self.parallel.is_deepspeed:
                # Not a damaged checkpoint (no fallback to an older one): a setting to change.
                raise ConfigError(f"checkpoint '{ck.path}' holds DeepSpeed ZeRO shards of {ck.world} ranks; "
                                  f"resume it on {ck.world} ranks (DeepSpeed shards are tied to the world size)")
            # Every old rank's part: the data position maps from all of them, the buffer re-splits.
            old = [ck.read(rank_file(r)) for r in range(ck.world)]
            mine = dict(old[self.rank % ck.world])
            mine["stream"] = remap_stream_state([o["stream"] for o in old], self.stream.state_dict())
            if old[0].get("buffer") is not None and not self.buffer_is_global:
                try:
                    mine["buffer"] = reshard_buffer_states([as_numpy(o["buffer"]) for o in old], self.world, self.rank)
                except ValueError as exc:
                    raise CheckpointError(f"checkpoint '{ck.path}': cannot re-shard the replay buffer ({exc})") from None
            state.update(mine)
        if self.parallel.is_deepspeed:
            ck.verify_tree(DEEPSPEED_DIR)
        global_buffer = None
        if self.buffer_is_global and shardfile.shard_entries(ck.files):
            # The shards read their own files (rank 0 has them checked here, in parallel).
            global_buffer = {"sharded": ck.path, "files": shardfile.shard_entries(ck.files)}
            try:
                error = self.buffer.verify_saved(ck.path, global_buffer["files"]) if self.rank == 0 else None
            except shardfile.ShardFileError as exc:
                error = str(exc)
            if error:
                raise CheckpointError(error)
        elif self.buffer_is_global and self.rank == 0 and ck.has(BUFFER_FILE):
            global_buffer = as_numpy(ck.read(BUFFER_FILE))
        return state, global_buffer

    def load_checkpoint(self, path: str) -> None:
        """Restore checkpoint ``path`` (a step directory) on every rank (collective)."""
        ck = StepCheckpoint(path)
        state, global_buffer = self._read_checkpoint(ck)
        self._apply_checkpoint(ck, state, global_buffer)

    def _apply_checkpoint(self, ck: StepCheckpoint, state: dict, global_buffer: dict | None) -> None:
        self.load_state_dict(state)
        if global_buffer is not None:
            try:
                self.buffer.load_state_dict(global_buffer)
            except shardfile.ShardFileError as exc:
                raise CheckpointError(str(exc)) from None
        if self.parallel.is_deepspeed:
            self.parallel.load_sharded(os.path.join(ck.path, DEEPSPEED_DIR))
        self.saved_step = self.step
        if self.buffer_is_global:
            dist.barrier()  # rank 0 alone restores a global buffer: nobody draws before it has

    def load_latest(self, max_step: int | None = None) -> str | None:
        """Restore the newest complete checkpoint of the run directory (at most ``max_step``) that
        every rank can read, falling back to older ones past a damaged one (collective). None
        when there is none."""
        for path in complete_checkpoints(self.run_dir):
            try:
                ck = StepCheckpoint(path)
                if max_step is not None and ck.step > max_step:
                    continue
                loaded, error = self._read_checkpoint(ck), None
            except CheckpointError as exc:
                loaded, error = None, exc
            # All ranks must pick the same checkpoint: one rank's bad file rejects it for all.
            bad = torch.tensor([float(error is not None)])
            dist.all_reduce_max(bad)
            if bad.item():
                if error is not None:
                    print(f"ebmscale: warning: {error}; trying the previous checkpoint", file=sys.stderr, flush=True)
                continue
            self._apply_checkpoint(ck, *loaded)
            return path
        return None

    def rollback(self, error: DivergenceError) -> str:
        """Recover from a divergence (collective): reload the newest good checkpoint -- model,
        optimizer, buffer, data position, RNG -- then lower the learning rate by
        ``train.rollback_lr_factor`` and switch to a fresh seed derived from (train.seed, number
        of rollbacks), so the retried steps draw new noise. Raises DivergenceError when
        ``train.rollback_max`` rollbacks are used up or there is no checkpoint."""
        t = self.cfg.train
        if self.rollbacks >= t.rollback_max:
            raise DivergenceError(f"{error}; gave up after {self.rollbacks} rollback(s) (train.rollback_max)") from None
        rollbacks, lr_scale, at = self.rollbacks + 1, self.lr_scale * t.rollback_lr_factor, self.step
        path = self.load_latest(max_step=at)
        if path is None:
            raise DivergenceError(f"{error}; no complete checkpoint to roll back to") from None
        self.rollbacks, self.lr_scale = rollbacks, lr_scale
        self.seed = dist.derive_seed(t.seed, 0, rollbacks, "rollback")
        self._apply_lr()
        dist.print0(f"ebmscale: {error}; rollback {rollbacks}/{t.rollback_max} from step {at} to {path}, "
                    f"learning rate x{lr_scale:.4g}, seed {self.seed}")
        return path

    def sampling_model(self) -> nn.Module:
        """The weights to sample and evaluate with: EMA when kept, else the live model."""
        return self.ema if self.ema is not None else self.model

    # ------------------------------------------------------------------ outputs
    def save_samples(self, tag: str) -> str | None:
        """Rank 0 writes a PNG of the latest negatives (grid for images, scatter for 2-D)."""
        if not dist.is_main() or self.last_negatives is None:
            return None
        return monitor.save_png(monitor.sample_image(self, self.last_negatives),
                                os.path.join(self.run_dir, "samples", f"{tag}.png"))


def write_runtime(run_dir: str, runtime) -> str:
    """Write ``<run_dir>/runtime.yaml``: the resolved :class:`~ebmscale.performance.Runtime` beside
    the asked ``config.yaml`` (train.precision=auto there, the precision actually used here)."""
    import yaml

    path = os.path.join(run_dir, "runtime.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(runtime.to_dict(), fh, sort_keys=False)
    return path


def _report_fid(trainer: Trainer) -> None:
    """Training-time FID of the current step (collective: every rank calls it) into the metrics."""
    from ebmscale.eval.training import training_fid  # Inception and scipy only when FID is on

    trainer.metrics.report("fid", training_fid(trainer))


def _out_of_time(t_start: float, budget_s: float) -> bool:
    """True once the wall-clock budget is spent (decided on rank 0, broadcast, so that every
    rank stops at the same step)."""
    over = torch.tensor([float(time.perf_counter() - t_start > budget_s)])
    dist.broadcast(over, src=0)
    return bool(over.item())


def train(cfg: Config, run_dir: str | None = None, resume: str | None = None,
          max_steps: int | None = None) -> TrainResult:
    """Train for ``cfg.train.steps`` steps and return where everything went.

    ``resume``: a checkpoint (step directory, or a run directory for its newest complete one), or
    'auto' for this run directory's newest complete checkpoint that loads (older ones are tried
    past a damaged one; none = start afresh). A divergence rolls back to the newest checkpoint up
    to ``train.rollback_max`` times (see :meth:`Trainer.rollback`).
    """
    run_dir = run_dir or cfg.train.run_dir
    # One writer per run directory (rank 0 holds its lock until the end), and a rank whose
    # launcher was killed stops instead of training on: see ebmscale.runguard.
    with runguard.guard(run_dir, main=dist.is_main()):
        return _train(cfg, run_dir, resume, max_steps)


def _train(cfg: Config, run_dir: str | None, resume: str | None, max_steps: int | None) -> TrainResult:
    run_dir = run_dir or cfg.train.run_dir
    if dist.is_main():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
            fh.write(dump_yaml(cfg))
    trainer = Trainer(cfg, run_dir)
    if dist.is_main():
        # What was asked is config.yaml (never changed); what it resolved to on this hardware:
        write_runtime(run_dir, trainer.runtime)
    if resume == "auto":
        path = trainer.load_latest()
        dist.print0(f"resumed from {path} at step {trainer.step}" if path else
                    f"no complete checkpoint under {run_dir}: starting afresh")
    elif resume:
        path = resolve(resume)
        trainer.load_checkpoint(path)
        dist.print0(f"resumed from {path} at step {trainer.step}")
    if trainer.parallel.distributed:
        dist.print0(f"data parallel: {trainer.parallel.describe()}")
    dist.print0(f"speed settings on {trainer.device.type}: {trainer.runtime.describe()}")
    t = cfg.train
    end = t.steps if max_steps is None else min(t.steps, max_steps)
    if t.rollback_max and not complete_checkpoints(run_dir) and trainer.step < end:
        trainer.save()  # something to roll back to before the first periodic checkpoint
    bar = None
    if t.progress and dist.is_main():
        from tqdm import tqdm

        bar = tqdm(total=end, initial=trainer.step, desc="train", dynamic_ncols=True, mininterval=1.0)
    last: dict = {}
    ckpt = None
    t_start = time.perf_counter()
    budget_s = t.max_minutes * 60.0
    skipped_seen = int(getattr(trainer.stream, "skipped", 0))
    try:
        while trainer.step < end:
            if budget_s and trainer.step > 0 and _out_of_time(t_start, budget_s):
                end = trainer.step
                # The run's last FID belongs to its last step, whether it ended on steps or on time.
                if t.fid_every and end % t.fid_every:
                    _report_fid(trainer)
                if trainer.metrics.pending:
                    last = trainer.metrics.flush(end)
                break
            try:
                stats = trainer.train_step()
            except DivergenceError as exc:
                # Decided across ranks, so every rank rolls back (or gives up) together.
                trainer.rollback(exc)
                skipped_seen = int(getattr(trainer.stream, "skipped", 0))
                if bar is not None:
                    bar.n = trainer.step
                    bar.refresh()
                continue
            stats["rollbacks"] = float(trainer.rollbacks)
            for k, v in stats.items():
                # Weight 0 keeps the name (every rank reports the same set) without a value.
                trainer.metrics.report(k, 0.0 if v is None else v, weight=0.0 if v is None else 1.0)
            # Corrupt/undecodable samples the stream skipped this step, summed over ranks.
            skipped = int(getattr(trainer.stream, "skipped", 0))
            trainer.metrics.report("data_skipped", skipped - skipped_seen, kind="sum")
            for k, v in trainer.buffer.counters().items():  # e.g. buffer_restarts, summed over ranks
                trainer.metrics.report(k, v, kind="sum")
            skipped_seen = skipped
            s = trainer.step
            if t.fid_every and (s % t.fid_every == 0 or s == end):
                _report_fid(trainer)
            if s % t.log_every == 0 or s == end:
                monitor.report_buffer_health(trainer)
                last = trainer.metrics.flush(s)
                if bar is not None:
                    bar.set_postfix({k: f"{last[k]:.3g}" for k in ("loss", "energy_gap", "train_acc", "samples_per_s")
                                     if k in last}, refresh=False)
            if bar is not None:
                bar.update(1)
            if t.sample_every and s % t.sample_every == 0 and s != end:
                trainer.save_samples(f"step-{s:07d}")
                monitor.log_visuals(trainer, s)
            if t.checkpoint_every and s % t.checkpoint_every == 0 and s != end:
                ckpt = trainer.save()
            hang_for_tests("step", s)
        if trainer.step == end and end > 0:
            trainer.save_samples(f"step-{end:07d}")
            trainer.save_samples("final")
            monitor.log_visuals(trainer, end)
        # A run resumed at its end has nothing new to save (and must not rewrite a good checkpoint).
        ckpt = trainer.save() if trainer.saved_step != trainer.step else step_dir(run_dir, trainer.step)
    finally:
        if bar is not None:
            bar.close()
        trainer.metrics.close()
        # Flush and shut the buffer's host down; after a failure only disconnect (no collective).
        trainer.buffer.close(clean=sys.exc_info()[0] is None)
    if t.report and dist.is_main():
        monitor.write_run_report(run_dir)
    return TrainResult(steps=trainer.step, run_dir=run_dir, last_metrics=last, checkpoint=ckpt)
