"""Image training data: one path for every source.

Every image dataset is read as webdataset shards by :class:`ebmscale.data.stream.ShardStream`.
``dataset: shards`` reads the user's shards (``data.path``: folder, manifest or pattern); every
other image dataset -- the built-in ``mnist`` and ``digits``, a ``folder`` tree, a ``cifar10`` /
``cifar100`` python archive, an ``npz`` file -- is converted into shards under
``<data.cache_dir>/shards/`` the first time it is used and read from there afterwards.
"""
from __future__ import annotations

import os
import sys

from ebmscale.config import Config
from ebmscale.data.builtin import BUILTIN_IMAGE_SETS, DataError

# Native (C, H, W) of the sources whose size is known without reading them.
_NATIVE = {"mnist": (1, 28, 28), "digits": (1, 8, 8), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}


def _native_shape(cfg: Config) -> tuple[int, int, int] | None:
    """The source's own image shape (None for a folder tree, whose images vary)."""
    d = cfg.data
    if d.dataset in _NATIVE:
        return _NATIVE[d.dataset]
    if d.dataset == "npz":
        from ebmscale.data.sources import npz_image_shape

        return npz_image_shape(d.path)
    return None


def _conversion_resolution(cfg: Config) -> int:
    """The resolution a source is converted at: 0 (keep) when the config asks for the native size,
    so that resolution=0 and resolution=<native> share one cache."""
    native = _native_shape(cfg)
    res = cfg.data.resolution
    return 0 if native is not None and res in (0, native[1]) and native[1] == native[2] else res


def image_shape(cfg: Config) -> tuple[int, int, int]:
    """(C, H, W) of the model's input, without converting anything.

    Shards: from their manifest; a ``data.resolution`` that differs fails here, naming both.
    Convertible sources: the native shape, or ``data.resolution`` squared when set (they are
    resized and centre-cropped on conversion).
    """
    d = cfg.data
    if d.dataset == "shards":
        from ebmscale.data.manifest import open_shard_set

        shards = open_shard_set(d.path, d.manifest, holdout=0)
        c, h, w = shards.shape
        if d.resolution and (h, w) != (d.resolution, d.resolution):
            raise DataError(f"shards '{d.path}' hold {h}x{w} images but data.resolution is {d.resolution}: "
                            f"set data.resolution={h} (or 0), or write shards at {d.resolution}")
        return shards.shape
    native = _native_shape(cfg)
    if d.dataset == "folder":
        if not d.resolution:
            raise DataError("dataset 'folder' needs data.resolution (images are resized and centre-cropped to it)")
        return (3, d.resolution, d.resolution)
    if native is None:
        raise DataError(f"dataset '{d.dataset}' is not an image dataset")
    res = _conversion_resolution(cfg)
    return native if res == 0 else (native[0], res, res)


def shard_location(cfg: Config, rank: int = 0) -> tuple[str, str]:
    """(shard path, manifest) to stream from; non-shard sources are converted into the cache on
    first use (rank 0 shows progress; concurrent ranks wait for one conversion)."""
    d = cfg.data
    if d.dataset == "shards":
        return d.path, d.manifest
    if d.dataset not in BUILTIN_IMAGE_SETS + ("folder", "cifar10", "cifar100", "npz"):
        raise DataError(f"dataset '{d.dataset}' is not an image dataset")
    from ebmscale.data.writer import cached_shards

    def say(msg: str) -> None:
        if rank == 0:
            print(f"ebmscale: {msg}", file=sys.stderr, flush=True)

    out = cached_shards(d.dataset, d.path, d.cache_dir, split="train", resolution=_conversion_resolution(cfg),
                        processes=d.convert_processes, progress=rank == 0 and sys.stderr.isatty(), log=say)
    return out, ""


def build_image_stream(cfg: Config, rank: int, world: int):
    """This rank's endless, resumable :class:`~ebmscale.data.stream.ShardStream`."""
    from ebmscale.data.manifest import open_shard_set
    from ebmscale.data.stream import ShardStream

    d = cfg.data
    expected = image_shape(cfg)
    path, manifest = shard_location(cfg, rank)
    shards = open_shard_set(path, manifest, holdout=d.holdout)
    if shards.shape != expected:
        # A cache built by an older converter, or shards swapped under a running config.
        raise DataError(f"shards '{path}' hold images of shape {shards.shape}, the config expects {expected}")
    return ShardStream(shards, d.batch_size, seed=cfg.train.seed, rank=rank, world=world,
                       num_workers=resolve_num_workers(d.num_workers), shuffle_buffer=d.shuffle_buffer,
                       pin_memory=_trains_on_cuda(cfg.train.device))


def cpus_per_rank() -> int:
    """CPU cores this process may use, shared among the ranks of its node (LOCAL_WORLD_SIZE)."""
    from ebmscale.data.writer import default_processes

    return max(1, default_processes() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def resolve_num_workers(requested: int, max_workers: int = 8) -> int:
    """``data.num_workers``; -1 (auto) = this rank's CPU cores minus one for the training
    process, at least 1 and at most ``max_workers``. The sample order depends on the number (see
    :mod:`ebmscale.data.stream`), so a resume on a machine with other core counts names
    data.num_workers; set it explicitly to move runs between machines."""
    if requested >= 0:
        return requested
    return max(1, min(max_workers, cpus_per_rank() - 1))


def _trains_on_cuda(device: str) -> bool:
    """Whether ``train.device`` puts training on a GPU (then the stream pins its batches)."""
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
