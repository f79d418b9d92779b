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

import copy
import dataclasses
import functools
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from ebmscale import dist, monitor, runguard
from ebmscale.buffer import build_buffer
from ebmscale.buffer import shardfile
from ebmscale.buffer.client import as_numpy
from ebmscale.buffer.reshard import reshard_buffer_states
from ebmscale.checkpoint import CheckpointError, complete_checkpoints, resolve, step_dir
from ebmscale.checkpoint_manager import CheckpointManager, SelfSavingWriter
from ebmscale.config import (TOY_DATASETS, Config, ConfigError, class_conditional_chains, dump_yaml, to_dict,
                             tracker_names)
from ebmscale.data import build_train_stream, data_shape
from ebmscale.data.lookahead import Lookahead
from ebmscale.data.reshard import remap_stream_state
from ebmscale.data.transforms import data_bounds, to_model_input
from ebmscale.metrics import MetricLogger
from ebmscale.models import build_model
from ebmscale.objectives import Context, Streams, estimator_class
from ebmscale.parallel import Parallel, resolve_device, start_trackers  # noqa: F401 (resolve_device: re-exported)
from ebmscale.performance import (compiled_energy, half_precision_gradient_errors, resolve_runtime,
                                  reuse_freed_cpu_memory)
from ebmscale.sampling import InputGradScaler, LangevinSettings, NoiseFn, acceptance_rate, uniform_noise

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
        objective = estimator_class(cfg.objective.kind)
        self.wrapped = self.parallel.prepare(objective.forward_module(self.model), self.optimizer)
        self.input_grad_scaler = InputGradScaler() if self.runtime.precision == "fp16" else None
        # One batch of lookahead: the next batch's labels let a class-conditional buffer draw be
        # prefetched (Context.prefetch); the batches and the checkpointed position are unchanged.
        self.stream = Lookahead(build_train_stream(cfg, self.rank, self.world))
        # Class-partitioned buffer whenever chains are class-conditional (JEM's p(x, y) term too).
        partitioned = class_conditional_chains(cfg)
        # One in-process buffer per rank, or the global one on Ray (config buffer.backend). Objectives
        # without persistent chains get a one-slot in-process buffer: the state layout stays, no Ray.
        bcfg = cfg
        if not objective.keeps_chains:
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
        # The objective sees this narrow context, never the trainer (ebmscale.objectives.base).
        self.context = Context(cfg=cfg, model=self.model, wrapped=self.wrapped, parallel=self.parallel,
                               sampler_energy=self.sampler_energy, settings=self.settings,
                               grad_scaler=self.input_grad_scaler, buffer=self.buffer, device=self.device,
                               shape=self.shape, init_bounds=self.init_bounds, toy=self.toy, world=self.world,
                               memory_format=self.memory_format, chain_init=self._chain_init,
                               noise_fn=self._noise_fn, next_labels=lambda: self.stream.peek()[1])
        self.estimator = objective(self.context)
        # For the monitor's images and histograms: the latest (positives, labels).
        self.last_positives: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.checkpoints = self._register_parts()
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

    def _chain_init(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Fresh chain starts for short-run sampling (uniform over the data range, this rank's
        stream). A seam for tests that feed every world size the same global starts."""
        return uniform_noise(n, self.shape, self.init_bounds, gen, self.device)

    def _noise_fn(self, n: int, gen: torch.Generator) -> NoiseFn | None:
        """The sampler's noise source; None = ``torch.randn`` on this rank's generator. A seam like
        :meth:`_chain_init`."""
        return None

    def _micro_step(self) -> tuple[torch.Tensor, dict, torch.Tensor | None, int, float, float]:
        """One micro-batch: positives, then the objective's loss (chains with their buffer
        write-backs, the loss forward through the wrapper). Returns (loss, stats, negatives, batch
        size, data seconds, sampler seconds)."""
        t0 = time.perf_counter()
        x_pos, y = self._positives(next(self.stream))
        n = x_pos.shape[0]
        if not self.precision_checked:
            self.check_half_precision(x_pos, y)
        t1 = time.perf_counter()
        loss, stats, x_neg = self._loss(x_pos, y)
        t2 = t1 + float(stats.pop("sampler_time", 0.0))
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
            self.micro = self.context.micro = j
            with self.parallel.micro_batch(j):
                loss, micro_stats, x_neg, n_j, t_data, t_sampler = self._micro_step()
                # Backward averages the gradients across ranks on the last micro-batch; no update
                # yet on any backend: the divergence check comes first (DeepSpeed's step too).
                self.parallel.backward(loss)
            for key, v in micro_stats.items():  # equal micro-batches: the mean of means is the mean
                stats[key] = stats.get(key, 0.0) + float(v) / k
            negatives.append(x_neg)
            n, data_time, sampler_time = n + n_j, data_time + t_data, sampler_time + t_sampler
        self.micro = self.context.micro = 0
        grad_norm, overflow = self.parallel.clip_grad_norm(self.optimizer, self.model.parameters(),
                                                           cfg.optim.grad_clip_norm)
        self._check_divergence(stats, grad_norm, overflow)
        self.parallel.step(self.optimizer)
        if self.parallel.is_deepspeed:
            ds_norm, ds_skipped = self.parallel.stepped()
            grad_norm, overflow = (ds_norm if grad_norm is None else grad_norm), overflow or ds_skipped
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

    def _loss(self, x_pos: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        """The objective's loss of this micro-batch on its streams of (seed, rank, tick): (loss,
        stats, negatives or None). One call, whatever the objective."""
        return self.estimator.loss(x_pos, y, Streams(self.seed, self.rank, self.tick, self.device))

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
        labels = y if self.cfg.model.conditional else None
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
        """A global (Ray-hosted) buffer is saved once, as its own file; a local one by every rank."""
        return bool(getattr(self.buffer, "is_global", False))

    def _register_parts(self) -> CheckpointManager:
        """Everything that must survive a restart, as parts of the checkpoint manager (loaded in
        this order): shared ones written once by rank 0, every rank's own, the global buffer."""
        ds = self.parallel.is_deepspeed
        ckpt = CheckpointManager(self.run_dir, self.rank, self.world, keep=self.cfg.train.keep_checkpoints,
                                 sharded=(self.parallel.save_sharded, self.parallel.load_sharded) if ds else None)
        shared = functools.partial(ckpt.register, scope="shared")
        mine = functools.partial(ckpt.register, scope="rank")
        shared("config", save=lambda: to_dict(self.cfg))
        shared("model", save=self.model.state_dict, load=self.model.load_state_dict)
        shared("ema", save=lambda: None if self.ema is None else self.ema.state_dict(),
               load=lambda s: s is not None and self.ema is not None and self.ema.load_state_dict(s))
        # Under DeepSpeed the optimizer state is sharded across ranks: it lives in DEEPSPEED_DIR.
        shared("optimizer", save=lambda: None if ds else self.optimizer.state_dict(), load=self._load_optimizer)
        shared("counters", save=lambda: {"rollbacks": self.rollbacks, "seed": self.seed, "lr_scale": self.lr_scale},
               load=self._load_counters)
        shared("scheduler", save=self.scheduler.state_dict, load=self._load_scheduler)
        shared("precision", save=self.parallel.state_dict, load=lambda s: self.parallel.load_state_dict(s or {}))
        shared("runtime", save=self.runtime.to_dict)  # what this run resolved to (information only)
        mine("rank", save=lambda: self.rank)
        mine("world", save=lambda: self.world)
        mine("sampler_grad_scaler",
             save=lambda: None if self.input_grad_scaler is None else self.input_grad_scaler.state_dict(),
             load=lambda s: s and self.input_grad_scaler is not None and self.input_grad_scaler.load_state_dict(s))
        if self.buffer_is_global:  # its shards write and read their own files
            ckpt.register("buffer", "global", save=lambda: as_numpy(self.buffer.state_dict()),
                          load=self._load_global_buffer, writer=functools.partial(SelfSavingWriter, owner=self.buffer))
        else:  # every rank's shard; re-dealt over a new number of ranks
            mine("buffer", save=self.buffer.state_dict,
                 load=lambda s: s is not None and self.buffer.load_state_dict(as_numpy(s)),
                 remap=lambda olds: None if olds[0] is None else
                 reshard_buffer_states([as_numpy(o) for o in olds], self.world, self.rank))
        mine("stream", save=self.stream.state_dict, load=self.stream.load_state_dict,
             remap=lambda olds: remap_stream_state(olds, self.stream.state_dict()))
        mine("objective", save=self.estimator.state_dict,
             load=lambda s: s is not None and self.estimator.load_state_dict(s))
        mine("torch_rng", save=torch.get_rng_state, load=torch.set_rng_state)
        cuda = self.device.type == "cuda"
        mine("cuda_rng", save=lambda: torch.cuda.get_rng_state(self.device) if cuda else None,
             load=lambda s: s is not None and cuda and torch.cuda.set_rng_state(s, self.device))
        shared("step", save=lambda: self.step, load=lambda s: setattr(self, "step", int(s)))
        return ckpt

    def _load_global_buffer(self, state: dict | None) -> None:
        if state is not None:
            try:
                self.buffer.load_state_dict(as_numpy(state))
            except shardfile.ShardFileError as exc:
                raise CheckpointError(str(exc)) from None

    def _load_optimizer(self, state: dict | None) -> None:
        if self.parallel.is_deepspeed:
            return  # restored from the ZeRO shards
        if state is None:
            dist.print0("warning: the checkpoint's optimizer state is in DeepSpeed shards; "
                        "this DDP run starts the optimizer afresh")
        else:
            self.optimizer.load_state_dict(state)

    def _load_counters(self, counters: dict | None) -> None:
        counters = counters or {}
        self.rollbacks = int(counters.get("rollbacks", 0))
        self.seed = int(counters.get("seed", self.cfg.train.seed))
        self.lr_scale = float(counters.get("lr_scale", 1.0))

    def _load_scheduler(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
        self._apply_lr()

    def state_dict(self) -> dict:
        """This rank's complete state as one dict (with a global buffer, its state on this rank:
        every shard on rank 0), so that an in-memory round trip restores it."""
        return self.checkpoints.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` output (or a checkpoint's read by the manager)."""
        self.checkpoints.load_state_dict(state)

    def _apply_lr(self) -> None:
        """Set the optimizer's learning rate from the scheduler at its current step (after a load
        or a change of ``lr_scale``): the same formula ``scheduler.step()`` uses."""
        lam = self.scheduler.lr_lambdas[0]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * lam(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def save(self) -> str:
        """Write checkpoint ``<run_dir>/checkpoints/step-<step>/`` (collective: call on every
        rank) and keep the newest ``train.keep_checkpoints``; see :mod:`ebmscale.checkpoint_manager`."""
        # A global buffer: every rank's write-backs land first, then each shard writes its own files.
        self.buffer.flush()
        return self.checkpoints.save(self.step)

    @property
    def last_class_chains(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The latest class-conditional (chains, labels), for the monitor."""
        return self.context.last_class_chains

    @property
    def sampler_counts(self) -> dict:
        """MALA's accepted / proposed chain-steps of the current step (sampler.kind=mala), counted
        by the objective's sampler calls."""
        return self.context.sampler_counts

    @property
    def saved_step(self) -> int | None:
        """Step of the checkpoint last written or loaded."""
        return self.checkpoints.saved_step

    def load_checkpoint(self, path: str) -> None:
        """Restore checkpoint ``path`` (a step directory) on every rank (collective)."""
        self.checkpoints.load(path)

    def load_latest(self, max_step: int | None = None) -> str | None:
        """Restore the newest complete checkpoint (at most ``max_step``) that every rank can read,
        falling back past damaged ones (collective); None when there is none."""
        return self.checkpoints.load_latest(max_step)

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
    skipped_seen = trainer.stream.skipped
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
                skipped_seen = trainer.stream.skipped
                if bar is not None:
                    bar.n = trainer.step
                    bar.refresh()
                continue
            stats["rollbacks"] = float(trainer.rollbacks)
            for k, v in stats.items():
                # Weight 0 keeps the name (every rank reports the same set) without a value.
                trainer.metrics.report(k, 0.0 if v is None else v, weight=0.0 if v is None else 1.0)
            # Corrupt/undecodable samples the stream skipped this step, summed over ranks.
            skipped = trainer.stream.skipped
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
