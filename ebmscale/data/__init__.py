"""Data: built-in sets, toy densities, converters to shards, and the training streams.

``build_train_stream`` is the single entry point the trainer uses; every stream it returns is a
:class:`Stream`.

Modules by concern: ``sources`` (readers of folder trees, CIFAR, npz, the built-in sets),
``codec`` (image members: encode, resize, decode), ``tar`` (the tar writer and reader),
``writer`` (sources to shards, the first-use cache), ``manifest`` (the manifest and the shard set
a path names), ``stream`` (the resumable shard stream), ``memory`` (in-memory arrays: toy sets),
``lookahead`` (one batch of peeking for the trainer), ``reshard`` (a stream position across a
world-size change).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

from ebmscale.config import TOY_DATASETS, Config
from ebmscale.data.builtin import DataError

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Stream(Protocol):
    """What the trainer asks of a training stream (:class:`~ebmscale.data.stream.ShardStream`,
    :class:`~ebmscale.data.memory.ArrayStream`, and :class:`~ebmscale.data.lookahead.Lookahead`
    around either).

    Endless batches ``(x, y)``: uint8 NCHW images (converted on the device by ``transforms``) or
    float32 2-D points for the toy sets, with int64 labels or None. ``state_dict`` is the position
    of the next batch and ``load_state_dict`` continues from one exactly (the trainer checkpoints
    it per rank); ``skipped`` counts the samples this rank dropped as unreadable so far (reported
    as the ``data_skipped`` metric; 0 for streams that cannot meet bad input), and
    ``worker_restarts`` the loaders restarted after a worker died (``data_worker_restarts``; 0 for
    streams without workers).
    """

    skipped: int
    worker_restarts: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]: ...

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def build_train_stream(cfg: Config, rank: int = 0, world: int = 1) -> Stream:
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


__all__ = ["Stream", "build_train_stream", "data_shape", "toy_splits", "DataError"]
