"""Metrics: report values anywhere, reduce once per log interval, rank 0 writes them.

Values are accumulated locally as float64 (sum, count) pairs; ``flush`` all-reduces the sums and
counts of every rank in one collective, so the logged value is the global mean, never one
rank's local number. Rank 0 appends one JSON object per line to ``metrics.jsonl`` and hands the
values, images and histograms to the run's experiment trackers (accelerate's tracker objects,
started by ``ebmscale.parallel.start_trackers``; TensorBoard by default).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict

import numpy as np
import torch

from ebmscale import dist


class MetricLogger:
    """Accumulate named scalars; ``flush(step)`` reduces and writes them.

    Every rank must report the same set of names between flushes (the trainer does), because
    the reduction is a single all-reduce of a fixed-order vector. ``count`` metrics are summed
    over ranks instead of averaged (``kind='sum'``); ``kind='max'``/``'min'`` keep the extreme of
    the observations with a nonzero weight (one more all-reduce, only when such a name exists).
    """

    def __init__(self, run_dir: str | None, trackers: list | tuple = ()):
        self.run_dir = run_dir
        self._sums: OrderedDict[str, list] = OrderedDict()
        self._fh = None
        self._trackers: list = []
        if run_dir is not None and dist.is_main():
            os.makedirs(run_dir, exist_ok=True)
            self._fh = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
            self._trackers = list(trackers)

    def report(self, name: str, value: float | torch.Tensor, weight: float = 1.0, kind: str = "mean") -> None:
        """Add one observation (a float or a 0-d tensor) of ``name``."""
        if isinstance(value, torch.Tensor):
            value = float(value.detach().float().item())
        if kind in ("max", "min"):
            sign = 1.0 if kind == "max" else -1.0
            entry = self._sums.setdefault(name, [-math.inf, 0.0, kind])
            if weight > 0:  # kept as a max of sign * value: min = -max(-x)
                entry[0] = max(entry[0], sign * float(value))
                entry[1] += weight
            return
        entry = self._sums.setdefault(name, [0.0, 0.0, kind])
        entry[0] += float(value) * weight
        entry[1] += weight

    @property
    def pending(self) -> bool:
        """Whether values were reported since the last flush."""
        return bool(self._sums)

    def reduce(self) -> dict[str, float]:
        """Global values of everything reported since the last flush (collective call)."""
        names = list(self._sums)
        # The counts of every name are summed; the sums too, except for extrema (they are maxed).
        vec = torch.tensor([v if k == 1 or self._sums[n][2] not in ("max", "min") else 0.0
                            for n in names for k, v in enumerate(self._sums[n][:2])], dtype=torch.float64)
        dist.all_reduce_sum(vec)
        extrema = [n for n in names if self._sums[n][2] in ("max", "min")]
        if extrema:
            top = torch.tensor([self._sums[n][0] for n in extrema], dtype=torch.float64)
            dist.all_reduce_max(top)
            for n, v in zip(extrema, top.tolist()):
                vec[2 * names.index(n)] = v
        out: dict[str, float] = {}
        for i, n in enumerate(names):
            s, c, kind = float(vec[2 * i]), float(vec[2 * i + 1]), self._sums[n][2]
            if kind in ("max", "min"):
                out[n] = (s if kind == "max" else -s) if c > 0 else math.nan
            else:
                out[n] = s if kind == "sum" else (s / c if c > 0 else math.nan)
        self._sums.clear()
        return out

    def flush(self, step: int, extra: dict | None = None) -> dict[str, float]:
        """Reduce and (rank 0) write one record for ``step``; returns the reduced values."""
        values = self.reduce()
        if extra:
            values.update(extra)
        if self._fh is not None:
            record = {"step": step, "time": round(time.time(), 3)}
            record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
            self._fh.write(json.dumps(record) + "\n")
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        for tracker in self._trackers:
            tracker.log(finite, step=step)
        return values

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        """Rank 0: one uint8 HWC image under ``tag`` at ``step``, to every tracker that takes
        images (TensorBoard; the others through their ``log_images({tag: [image]})``, as wandb's)."""
        for tracker in self._trackers:
            if tracker.name == "tensorboard":
                tracker.tracker.add_image(tag, img, step, dataformats="HWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({tag: [img]}, step=step)

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        """Rank 0: a histogram of ``values`` under ``tag`` at ``step`` (TensorBoard, wandb);
        non-finite values are left out (TensorBoard rejects them), so a diverging run still logs
        the rest."""
        values = values[np.isfinite(values)]
        if not len(values):
            return
        for tracker in self._trackers:
            if tracker.name == "tensorboard":
                tracker.tracker.add_histogram(tag, values, step)
            elif tracker.name == "wandb":
                import wandb

                tracker.tracker.log({tag: wandb.Histogram(values)}, step=step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []
