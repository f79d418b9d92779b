"""The run around a trainer: run directory, resume, the step loop with its logging, training-time
FID, sample images and periodic checkpoints, the time budget and rollbacks.

:func:`run` drives an already built :class:`ebmscale.trainer.Trainer` (``ebmscale.trainer.train``
builds it and calls this), through its interface only: ``train_step``, ``rollback``, ``save``,
``load_latest``/``load_checkpoint``, ``metrics``, ``buffer``, ``stream``, ``step``.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from ebmscale import dist, monitor
from ebmscale.checkpoint import complete_checkpoints, resolve, step_dir
from ebmscale.config import Config, dump_yaml
from ebmscale.guards import DivergenceError
from ebmscale.performance import Runtime


@dataclass
class TrainResult:
    steps: int
    run_dir: str
    last_metrics: dict
    checkpoint: str | None


def write_config(run_dir: str, cfg: Config) -> None:
    """Rank 0 creates the run directory and writes ``config.yaml``: what was asked, never changed."""
    if dist.is_main():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
            fh.write(dump_yaml(cfg))


def write_runtime(run_dir: str, runtime: Runtime) -> str:
    """Write ``<run_dir>/runtime.yaml``: the resolved :class:`~ebmscale.performance.Runtime` beside
    the asked ``config.yaml`` (train.precision=auto there, the precision actually used here)."""
    import yaml

    path = os.path.join(run_dir, "runtime.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(runtime.to_dict(), fh, sort_keys=False)
    return path


def save_samples(trainer: Any, tag: str) -> str | None:
    """Rank 0 writes a PNG of the latest negatives (grid for images, scatter for 2-D)."""
    if not dist.is_main() or trainer.last_negatives is None:
        return None
    return monitor.save_png(monitor.sample_image(trainer, trainer.last_negatives),
                            os.path.join(trainer.run_dir, "samples", f"{tag}.png"))


def _report_fid(trainer: Any) -> None:
    """Training-time FID of the current step (collective: every rank calls it) into the metrics."""
    from ebmscale.eval.training import training_fid  # Inception and scipy only when FID is on

    trainer.metrics.report("fid", training_fid(trainer))


def _out_of_time(t_start: float, budget_s: float) -> bool:
    """True once the wall-clock budget is spent (decided on rank 0, broadcast, so that every
    rank stops at the same step)."""
    over = torch.tensor([float(time.perf_counter() - t_start > budget_s)])
    dist.broadcast(over, src=0)
    return bool(over.item())


def _stream_counts(stream: Any) -> dict[str, int]:
    """The stream's running counters reported as per-interval metrics (the Stream protocol's)."""
    return {"data_skipped": stream.skipped, "data_worker_restarts": stream.worker_restarts}


def _resume(trainer: Any, resume: str | None) -> None:
    if resume == "auto":
        path = trainer.load_latest()
        dist.print0(f"resumed from {path} at step {trainer.step}" if path else
                    f"no complete checkpoint under {trainer.run_dir}: starting afresh")
    elif resume:
        path = resolve(resume)
        trainer.load_checkpoint(path)
        dist.print0(f"resumed from {path} at step {trainer.step}")


def run(trainer: Any, resume: str | None = None, max_steps: int | None = None) -> TrainResult:
    """Train ``trainer`` up to ``train.steps`` (at most ``max_steps``); see ``ebmscale.trainer.train``."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    if dist.is_main():
        # What was asked is config.yaml (never changed); what it resolved to on this hardware:
        write_runtime(run_dir, trainer.runtime)
    _resume(trainer, resume)
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
    seen = _stream_counts(trainer.stream)
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
                seen = _stream_counts(trainer.stream)
                if bar is not None:
                    bar.n = trainer.step
                    bar.refresh()
                continue
            stats["rollbacks"] = float(trainer.rollbacks)
            for k, v in stats.items():
                # Weight 0 keeps the name (every rank reports the same set) without a value.
                trainer.metrics.report(k, 0.0 if v is None else v, weight=0.0 if v is None else 1.0)
            # Corrupt/undecodable samples the stream skipped this step and loaders it restarted
            # after a worker died, summed over ranks.
            counts = _stream_counts(trainer.stream)
            for k in counts:
                trainer.metrics.report(k, counts[k] - seen[k], kind="sum")
            seen = counts
            for k, v in trainer.buffer.counters().items():  # e.g. buffer_restarts, summed over ranks
                trainer.metrics.report(k, v, kind="sum")
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
                save_samples(trainer, f"step-{s:07d}")
                monitor.log_visuals(trainer, s)
            if t.checkpoint_every and s % t.checkpoint_every == 0 and s != end:
                ckpt = trainer.save()
        if trainer.step == end and end > 0:
            save_samples(trainer, f"step-{end:07d}")
            save_samples(trainer, "final")
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
