"""One rank's trainer, ``Trainer`` (its parts and ``train_step``), and ``train(cfg)``, which runs one.

A step, over ``optim.accumulate`` micro-batches: this rank's positives (uint8 from the stream,
converted on the device); the objective's loss, one call (``ebmscale.objectives``: chains from
the buffer or fresh starts, K sampler steps on the *unwrapped* module, the loss forward through the
data-parallel wrapper of ``ebmscale.parallel``); backward; the divergence check
(``ebmscale.guards``) before any update; clip, optimizer step, EMA. Mixed precision
(``train.precision``) applies to the sampler's energies and the loss forward; chains, losses and
master weights stay fp32. All randomness of a step comes from streams derived from (seed, rank,
step), so a resumed run repeats exactly what an uninterrupted one would have done. Checkpointed
parts: ``ebmscale.train_state``; the run around the steps: ``ebmscale.loop``.
"""
from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from ebmscale import dist, runguard
from ebmscale.buffer import build_buffer
from ebmscale.config import TOY_DATASETS, Config, class_conditional_chains, to_dict, tracker_names
from ebmscale.data import build_train_stream, data_shape
from ebmscale.data.lookahead import Lookahead
from ebmscale.data.transforms import data_bounds, to_model_input
from ebmscale.guards import DivergenceError, check_divergence, check_half_precision
from ebmscale.loop import TrainResult, run, write_config
from ebmscale.metrics import MetricLogger
from ebmscale.models import build_model
from ebmscale.objectives import Context, Streams, estimator_class
from ebmscale.optim import apply_lr, build_optimizer, build_scheduler, update_ema
from ebmscale.parallel import Parallel, start_trackers
from ebmscale.performance import compiled_energy, resolve_runtime, reuse_freed_cpu_memory
from ebmscale.sampling import InputGradScaler, LangevinSettings, NoiseFn, acceptance_rate, uniform_noise
from ebmscale.train_state import register_parts


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
        # Counters that survive a restart (see state_dict): rollbacks so far, the seed the per-rank
        # streams derive from (a fresh one after each rollback), and the rollbacks' LR multiplier.
        self.rollbacks, self.seed, self.lr_scale = 0, cfg.train.seed, 1.0
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, lambda: self.lr_scale)
        # Only the loss forward/backward goes through the wrapper (after the EMA copy, which
        # stays fp32 even where DeepSpeed casts the module to half precision).
        objective = estimator_class(cfg.objective.kind)
        self.wrapped = self.parallel.prepare(objective.forward_module(self.model), self.optimizer)
        self.input_grad_scaler = InputGradScaler() if self.runtime.precision == "fp16" else None
        # One batch of lookahead: the next batch's labels let a class-conditional buffer draw be
        # prefetched (Context.prefetch); the batches and the checkpointed position are unchanged.
        self.stream = Lookahead(build_train_stream(cfg, self.rank, self.world))
        # Class-partitioned whenever chains are class-conditional (JEM's p(x, y) term too); one
        # in-process buffer per rank or the global one on Ray (buffer.backend); one slot without chains.
        self.buffer = build_buffer(cfg, self.shape, self.init_bounds,
                                   cfg.model.num_classes if class_conditional_chains(cfg) else 0, self.rank,
                                   self.world, cfg.train.seed, keeps_chains=objective.keeps_chains)
        # Toy chains are clamped to the quadrature box: the exact evaluation normalises over it.
        self.settings = LangevinSettings.from_config(cfg, self.init_bounds if self.toy else self.bounds)
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
        self.checkpoints = register_parts(self)  # everything a checkpoint holds (ebmscale.train_state)
        self.precision_checked = False  # the half-precision canary runs on this process's first step

    def _init_bounds(self) -> tuple[float, float]:
        """Range of uniform chain initialisation: the data range for images, the quadrature
        box for toy sets."""
        if not self.toy:
            return data_bounds(self.cfg.data.range)
        from ebmscale.data.toy import get_toy

        return tuple(get_toy(self.cfg.data.dataset).bounds)

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
        x = to_model_input(x, d.range, flip=d.flip, noise_std=d.noise_std, noise_std_max=d.noise_std_max, generator=g)
        return x.contiguous(memory_format=self.memory_format), y

    def _chain_init(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Fresh chain starts for short-run sampling (uniform over the data range, this rank's
        stream). A seam for tests that feed every world size the same global starts."""
        return uniform_noise(n, self.shape, self.init_bounds, gen, self.device)

    def _noise_fn(self, n: int, gen: torch.Generator) -> NoiseFn | None:
        """The sampler's noise source; None = ``torch.randn`` on this rank's generator (a seam too)."""
        return None

    def _micro_step(self) -> tuple[torch.Tensor, dict, torch.Tensor | None, int, float, float]:
        """One micro-batch: positives, then the objective's loss (chains with their buffer
        write-backs, the loss forward through the wrapper). Returns (loss, stats, negatives, batch
        size, data seconds, sampler seconds)."""
        t0 = time.perf_counter()
        x_pos, y = self._positives(next(self.stream))
        n = x_pos.shape[0]
        if not self.precision_checked:  # the half-precision canary, before the first update
            self.precision_checked = True
            check_half_precision(self.model, x_pos, y if self.cfg.model.conditional else None, self.runtime,
                                 self.cfg.train.precision_check, self.world)
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
        self.context.new_step()  # MALA's counts; the buffer time, split out of the sampler time below
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
        check_divergence(stats, grad_norm, overflow, cfg.train, self.step, self.world)
        self.parallel.step(self.optimizer)
        if self.parallel.is_deepspeed:
            ds_norm, ds_skipped = self.parallel.stepped()
            grad_norm, overflow = (ds_norm if grad_norm is None else grad_norm), overflow or ds_skipped
        self.estimator.after_step()
        self.scheduler.step()
        if self.ema is not None:
            update_ema(self.ema, self.model, cfg.optim.ema)
        self.step += 1
        self.last_negatives = negatives[0] if k == 1 else torch.cat(negatives)
        t3 = time.perf_counter()
        out: dict[str, float | None] = dict(stats)
        # None = no value this step (an fp16 overflow, or DeepSpeed not computing the norm).
        out.update(grad_norm=grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                   sampler_time=max(0.0, sampler_time - self.context.buffer_time), data_time=data_time,
                   buffer_time=self.context.buffer_time, step_time=t3 - t0, samples_per_s=n / (t3 - t0),
                   lr=self.optimizer.param_groups[0]["lr"])
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

    def state_dict(self) -> dict:
        """This rank's complete state as one dict (with a global buffer, its state on this rank:
        every shard on rank 0), so that an in-memory round trip restores it."""
        return self.checkpoints.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` output (or a checkpoint's read by the manager)."""
        self.checkpoints.load_state_dict(state)

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
        """MALA's accepted / proposed chain-steps of the current step, counted by the sampler calls."""
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
        apply_lr(self.scheduler, self.optimizer)
        dist.print0(f"ebmscale: {error}; rollback {rollbacks}/{t.rollback_max} from step {at} to {path}, "
                    f"learning rate x{lr_scale:.4g}, seed {self.seed}")
        return path

    def sampling_model(self) -> nn.Module:
        """The weights to sample and evaluate with: EMA when kept, else the live model."""
        return self.ema if self.ema is not None else self.model


def train(cfg: Config, run_dir: str | None = None, resume: str | None = None,
          max_steps: int | None = None) -> TrainResult:
    """Train for ``cfg.train.steps`` steps and return where everything went.

    ``resume``: a checkpoint (step directory, or a run directory for its newest complete one), or
    'auto' for this run directory's newest complete checkpoint that loads (older ones are tried
    past a damaged one; none = start afresh). A divergence rolls back to the newest checkpoint up
    to ``train.rollback_max`` times (see :meth:`Trainer.rollback`). The loop: :func:`ebmscale.loop.run`.
    """
    run_dir = run_dir or cfg.train.run_dir
    # One writer per run directory (rank 0 holds its lock until the end), and a rank whose
    # launcher was killed stops instead of training on: see ebmscale.runguard.
    with runguard.guard(run_dir, main=dist.is_main()):
        write_config(run_dir, cfg)
        # Looked up at call time: tests/faults.py installs a subclass here.
        return run(Trainer(cfg, run_dir), resume, max_steps)
