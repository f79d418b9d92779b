"""Image training streams. (Interim: built-in sets from memory; the webdataset shard path of the
data issue replaces this so that all image data goes through one path.)"""
from __future__ import annotations

import numpy as np
import torch

from ebmscale.config import Config
from ebmscale.data.builtin import BUILTIN_IMAGE_SETS, DataError, load_builtin
from ebmscale.data.memory import ArrayStream

_NATIVE = {"mnist": (1, 28, 28), "digits": (1, 8, 8)}


def image_shape(cfg: Config) -> tuple[int, int, int]:
    d = cfg.data
    if d.dataset not in _NATIVE:
        raise DataError(f"dataset '{d.dataset}' is not available yet")
    c, h, w = _NATIVE[d.dataset]
    if d.resolution and d.resolution != h:
        raise DataError(f"data.resolution={d.resolution} differs from {d.dataset}'s {h}x{w} images")
    return c, h, w


def build_image_stream(cfg: Config, rank: int, world: int) -> ArrayStream:
    d = cfg.data
    if d.dataset not in BUILTIN_IMAGE_SETS:
        raise DataError(f"dataset '{d.dataset}' is not available yet")
    image_shape(cfg)
    x, y = load_builtin(d.dataset, "train")
    if d.holdout:
        x, y = x[: len(x) - d.holdout], y[: len(y) - d.holdout]
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return ArrayStream(x, torch.from_numpy(y), d.batch_size, seed=cfg.train.seed, rank=rank, world=world)
