"""Metrics: report values anywhere, reduce once per log interval, rank 0 writes them.

Values are accumulated locally as float64 (sum, count) pairs; ``flush`` all-reduces the sums and
counts of every rank in one collective, so the logged value is the global mean, never one
rank's local number. Rank 0 appends one JSON object per line to ``metrics.jsonl`` and, when
enabled, writes TensorBoard scalars.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict

import torch

from ebmscale import dist


class MetricLogger:
    """Accumulate named scalars; ``flush(step)`` reduces and writes them.

    Every rank must report the same set of names between flushes (the trainer does), because
    the reduction is a single all-reduce of a fixed-order vector. ``count`` metrics are summed
    over ranks instead of averaged (``kind='sum'``).
    """

    def __init__(self, run_dir: str | None, tensorboard: bool = True):
        self.run_dir = run_dir
        self._sums: OrderedDict[str, list] = OrderedDict()
        self._tb = None
        self._fh = None
        if run_dir is not None and dist.is_main():
            os.makedirs(run_dir, exist_ok=True)
            self._fh = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def report(self, name: str, value: float | torch.Tensor, weight: float = 1.0, kind: str = "mean") -> None:
        """Add one observation (a float or a 0-d tensor) of ``name``."""
        if isinstance(value, torch.Tensor):
            value = float(value.detach().float().item())
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
        vec = torch.tensor([v for n in names for v in self._sums[n][:2]], dtype=torch.float64)
        dist.all_reduce_sum(vec)
        out: dict[str, float] = {}
        for i, n in enumerate(names):
            s, c = float(vec[2 * i]), float(vec[2 * i + 1])
            out[n] = s if self._sums[n][2] == "sum" else (s / c if c > 0 else math.nan)
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
        if self._tb is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        return values

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
