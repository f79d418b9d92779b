"""What a run shows while it trains, beyond the scalar losses (called by the training loop):

* every log interval, the replay buffer's health figures (:mod:`ebmscale.buffer.health`) go into
  the metrics like any scalar (every rank reports; one reduction at the flush);
* every ``train.sample_every`` steps, rank 0 alone logs images -- the latest negatives, a draw of
  stored chains for buffer runs, one row per class for class-conditional chains -- and histograms
  of the energies of the latest positives, negatives and buffer chains (class-conditional ones
  drawn from random classes and scored at their class), to TensorBoard (or the
  trackers) and as PNG files under ``<run_dir>/samples``. The energies are evaluated on the
  unwrapped module in sampling mode (no parameter gradients, no spectral-norm update, no DDP or
  ZeRO collective), so the other ranks never wait for it.

Functions take the trainer duck-typed (``cfg``, ``buffer``, ``metrics``, ``model``, ...), so this
module sits below ``ebmscale.trainer``.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ebmscale import dist
from ebmscale.buffer import health
from ebmscale.data.transforms import data_bounds
from ebmscale.sampling import sampling_mode

GRID_IMAGES = 64  # images per sample grid (8 x 8)
CLASS_ROWS = 10  # class-conditional grid: at most this many classes, one row each


def persistent_chains(cfg: Any) -> bool:
    """Whether the run keeps chains in a replay buffer: buffer starts and an objective that keeps
    chains (the objective class says so, as for the trainer's buffer and the SLURM script)."""
    from ebmscale.objectives import estimator_class

    return cfg.sampler.init == "buffer" and estimator_class(cfg.objective.kind).keeps_chains


def report_buffer_health(trainer: Any) -> None:
    """Put the buffer health figures into ``trainer.metrics`` (every rank, before a flush: the
    figures of the whole buffer come out of the flush's reduction)."""
    if not persistent_chains(trainer.cfg):
        return
    raw = trainer.buffer.health()
    if raw is None:  # a global buffer: rank 0 reports it; this rank adds weight 0 under the same names
        raw = health.empty_stats(trainer.buffer.num_classes)
    for name, (value, weight, kind) in health.figures(raw).items():
        trainer.metrics.report(name, value, weight=weight, kind=kind)


# --------------------------------------------------------------------------- images
def _to_unit(x: torch.Tensor, range_name: str) -> torch.Tensor:
    lo, hi = data_bounds(range_name)
    return ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)


def grid_image(x: torch.Tensor, range_name: str, nrow: int = 8) -> np.ndarray:
    """Images (model range, NCHW) -> one grid as uint8 HWC (3 channels)."""
    from torchvision.utils import make_grid

    g = make_grid(_to_unit(x, range_name), nrow=nrow, padding=2)
    return (g.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()).copy()


def scatter_image(points: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """2-D samples -> a scatter plot as uint8 HWC (3 channels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
    if bounds is not None:
        ax.set_xlim(*bounds)
        ax.set_ylim(*bounds)
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def class_grid_image(x: torch.Tensor, labels: torch.Tensor, range_name: str, per_class: int = 8,
                     max_classes: int = CLASS_ROWS) -> np.ndarray:
    """Class-conditional chains -> one row per class (the lowest ``max_classes`` labels present),
    up to ``per_class`` images each; short rows are padded with black."""
    labels = labels.detach().cpu()
    classes = torch.unique(labels)[:max_classes].tolist()
    blank = torch.full_like(x[:1], data_bounds(range_name)[0])
    rows = []
    for c in classes:
        xs = x[labels == c][:per_class]
        rows.append(torch.cat([xs, blank.expand(per_class - len(xs), *x.shape[1:])]) if len(xs) < per_class else xs)
    return grid_image(torch.cat(rows), range_name, nrow=per_class)


def sample_image(trainer: Any, x: torch.Tensor) -> np.ndarray:
    """The picture of a batch of chains: an image grid, or a scatter plot for 2-D data."""
    if trainer.toy:
        return scatter_image(x.detach().float().cpu().numpy(), tuple(trainer.init_bounds))
    return grid_image(x[:GRID_IMAGES], trainer.cfg.data.range)


def save_png(img: np.ndarray, path: str) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path)
    return path


@torch.no_grad()
def _energies(trainer: Any, x: torch.Tensor, y: torch.Tensor | None) -> np.ndarray:
    """Energies of ``x`` on the unwrapped training module (no collective, no state change)."""
    p = trainer.parallel
    with sampling_mode(trainer.model) as m:
        x = p.cast_input(x.to(trainer.device))
        e = m(x, y.to(trainer.device)) if y is not None else m(x)
    return e.detach().float().cpu().numpy()


def log_visuals(trainer: Any, step: int) -> dict[str, str]:
    """Rank 0: log the sample images and energy histograms of ``step`` (see the module docstring)
    and write the extra PNGs (``samples/buffer-step-N.png``, ``samples/classes-step-N.png``; the
    negatives' PNG is :func:`ebmscale.loop.save_samples`'s). Returns the PNG paths written."""
    if not dist.is_main() or trainer.last_negatives is None:
        return {}
    metrics, out = trainer.metrics, {}
    samples_dir = os.path.join(trainer.run_dir, "samples")
    metrics.image("samples/negatives", sample_image(trainer, trainer.last_negatives), step)
    pos, y_pos = trainer.last_positives
    cond = trainer.cfg.model.conditional
    metrics.histogram("energy/positive", _energies(trainer, pos, y_pos if cond else None), step)
    neg_labels = trainer.last_class_chains[1] if cond else None
    metrics.histogram("energy/negative", _energies(trainer, trainer.last_negatives, neg_labels), step)
    if persistent_chains(trainer.cfg):
        rng = dist.numpy_rng(trainer.seed, 0, step, "monitor")  # its own stream: training draws are unchanged
        n = GRID_IMAGES if not trainer.toy else 512
        labels = None
        if cond:  # a conditional energy's chains are kept per class
            # Chains of random classes, each scored at its own class, E(x, y): how they are sampled,
            # and one forward -- the marginal E(x) costs one pass per class (1,000 on ImageNet).
            labels = rng.integers(0, trainer.cfg.model.num_classes, size=n)
        drawn = torch.from_numpy(trainer.buffer.peek(n, rng, labels))
        img = sample_image(trainer, drawn)
        metrics.image("samples/buffer", img, step)
        out["buffer"] = save_png(img, os.path.join(samples_dir, f"buffer-step-{step:07d}.png"))
        # Unlabelled stored chains (JEM's p(x) chains) are scored by the marginal E(x).
        metrics.histogram("energy/buffer", _energies(trainer, drawn, None if labels is None else torch.from_numpy(labels)),
                          step)
    chains = trainer.last_class_chains
    if chains is not None and not trainer.toy:
        img = class_grid_image(chains[0], chains[1], trainer.cfg.data.range)
        metrics.image("samples/classes", img, step)
        out["classes"] = save_png(img, os.path.join(samples_dir, f"classes-step-{step:07d}.png"))
    return out


def write_run_report(run_dir: str) -> str | None:
    """Rank 0, after training: ``<run_dir>/report.html``. The run's results are already on disk,
    so a report that cannot be written is a warning, not a failed run."""
    import sys

    from ebmscale.report import write_report

    try:
        path = write_report(run_dir)
    except OSError as exc:
        print(f"ebmscale: warning: no run report written ({exc})", file=sys.stderr, flush=True)
        return None
    dist.print0(f"run report: {path}")
    return path
