"""FID during training: every ``train.fid_every`` steps, ``train.fid_samples`` samples of the
sampling weights (EMA when kept), split over ranks, scored against ``train.fid_ref_stats``.

Samples come from the run's own Langevin settings (``train.fid_steps`` steps) started from
uniform noise or from each rank's replay buffer (read, never written). Randomness comes from the
'eval' stream of (seed, rank, step), so an evaluation never shifts the training streams and a
resumed run stays bitwise identical. A class-conditional model is sampled with labels spread
evenly over the N samples (:func:`ebmscale.eval.generate.balanced_classes`), each chain at its own
label, from its class's part of the buffer or from noise (see docs/evaluation.md). Every rank gets the same FID (the statistics are
all-reduced); rank 0 also appends it, with the Inception's provenance, to ``fid.jsonl``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from ebmscale import dist
from ebmscale.data.transforms import to_uint8
from ebmscale.eval.fid import fid_against, inception_statistics, load_stats, rank_share
from ebmscale.eval.generate import balanced_classes, conditional_generate, generate
from ebmscale.sampling import sampling_mode

_REF_STATS: dict = {}  # (path, mtime, size) -> statistics: read once per file version, not per evaluation


def training_fid(trainer, batch_size: int = 100) -> float:
    """FID of the trainer's current model (a collective: every rank calls it at the same step)."""
    cfg, t = trainer.cfg, trainer.cfg.train
    t0 = time.perf_counter()
    from ebmscale.eval.inception import cached_fid_inception  # Inception only when FID is on

    detector = cached_fid_inception(t.fid_weights or None, None, trainer.device)
    st = os.stat(t.fid_ref_stats)
    key = (os.path.abspath(t.fid_ref_stats), st.st_mtime_ns, st.st_size)
    if key not in _REF_STATS:
        _REF_STATS[key] = load_stats(t.fid_ref_stats)
    ref = _REF_STATS[key]
    first, count = rank_share(t.fid_samples, trainer.rank, trainer.world)
    settings = dataclasses.replace(trainer.settings, steps=t.fid_steps or trainer.settings.steps)
    init = t.fid_init or cfg.sampler.init
    labels, extra = None, {}
    if cfg.model.conditional:
        all_labels, _ = balanced_classes(t.fid_samples, cfg.model.num_classes)
        labels = all_labels[first:first + count]
        extra = {"labels": "balanced", "class_counts": np.bincount(all_labels, minlength=cfg.model.num_classes).tolist()}
    starts = None
    if init == "buffer":
        rng = dist.numpy_rng(t.seed, trainer.rank, trainer.step, "eval")
        starts = trainer.buffer.peek(count, rng, labels)
    gen = dist.torch_generator(t.seed, trainer.rank, trainer.step, "eval", trainer.device)
    with sampling_mode(trainer.sampling_model(), checkpointing=t.sampler_checkpointing) as model:
        kw = dict(init_bounds=trainer.init_bounds, starts=starts, batch_size=batch_size, device=trainer.device,
                  autocast_dtype=trainer.parallel.autocast_dtype)
        if labels is not None:
            batches = conditional_generate(model, labels, first, trainer.shape, settings, t.seed, step=trainer.step, **kw)
        else:
            batches = generate(model, count, trainer.shape, settings, gen, **kw)
        stats, _ = inception_statistics((to_uint8(x, cfg.data.range) for x in batches), detector, first,
                                        trainer.device)
    fid = fid_against(stats, ref)
    if dist.is_main():
        with open(os.path.join(trainer.run_dir, "fid.jsonl"), "a") as fh:
            fh.write(json.dumps({"step": trainer.step, "fid": fid, "n": stats.n, "steps": settings.steps,
                                 "init": init, **extra, "seconds": round(time.perf_counter() - t0, 2),
                                 "weights": detector.provenance}) + "\n")
    return fid
