"""Data: built-in sets, toy densities, converters to shards, and the training streams.

``build_train_stream`` is the single entry point the trainer uses; every stream yields
``(x, y)`` batches -- uint8 NCHW images (converted on the device by ``transforms``) or float32
2-D points for the toy sets -- and has ``state_dict``/``load_state_dict`` for exact resume.
"""
from __future__ import annotations

from ebmscale.config import TOY_DATASETS, Config
from ebmscale.data.builtin import DataError


def build_train_stream(cfg: Config, rank: int = 0, world: int = 1):
    """The endless, resumable training stream for this rank."""
    d = cfg.data
    if d.dataset in TOY_DATASETS:
        from ebmscale.data.memory import ArrayStream

        splits = toy_splits(cfg)
        return ArrayStream(splits["train"], None, d.batch_size, seed=cfg.train.seed, rank=rank, world=world)
    from ebmscale.data.images import build_image_stream

    return build_image_stream(cfg, rank, world)


def toy_splits(cfg: Config) -> dict:
    """The fixed train/val/test samples of a toy density (val/test sizes fixed at 10,000)."""
    from ebmscale.data.toy import make_splits

    return make_splits(cfg.data.dataset, train=cfg.data.toy_train_size, val=10000, test=10000,
                       seed=cfg.train.seed)


def data_shape(cfg: Config) -> tuple[int, ...]:
    """Shape of one model input: (2,) for toy sets, (C, H, W) for images."""
    if cfg.data.dataset in TOY_DATASETS:
        return (2,)
    from ebmscale.data.images import image_shape

    return image_shape(cfg)


__all__ = ["build_train_stream", "data_shape", "toy_splits", "DataError"]
