"""Rank helpers that work with or without an initialised process group, and per-rank seeds.

Per-rank random streams are derived from (seed, rank, step, purpose) so that every rank draws
different Langevin noise and buffer samples, and so that a resumed run draws exactly what an
uninterrupted one would have drawn at the same step.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as tdist

from ebmscale.utils import hash_seed

# Named sub-streams so that adding a new consumer of randomness never shifts another's stream.
STREAMS = {"langevin": 1, "buffer": 2, "data": 3, "augment": 4, "init": 5, "eval": 6, "objective": 7,
           "sampler-init": 8, "rollback": 9, "monitor": 10, "critic-init": 11, "entropy": 12}


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    if is_initialized():
        return tdist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if is_initialized():
        return tdist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Let rank 0 do something (e.g. build a cache) before the others, who then reuse it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def init_from_env() -> bool:
    """Join the process group a launcher (torchrun, ``accelerate launch``) describes in the
    environment, when there is one of more than one process and none is up yet; returns whether
    this call started it (the caller then ends it with ``destroy_process_group``). For commands
    that need collectives but no data-parallel wrapper, e.g. distributed evaluation."""
    if is_initialized() or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend)
    return True


def comm_device() -> torch.device:
    """Where a tensor must live to take part in a collective: NCCL only moves CUDA tensors (and
    accelerate starts NCCL alone on GPUs), gloo only CPU ones."""
    if is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if is_initialized() and world_size() > 1:
        dev = comm_device()
        if t.device == dev:
            tdist.all_reduce(t, op=op)
        else:  # e.g. CPU metric sums under NCCL: reduce a device copy, write the result back
            buf = t.to(dev)
            tdist.all_reduce(buf, op=op)
            t.copy_(buf)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (no-op in one process), whatever device ``t`` is on; returns ``t``."""
    return _all_reduce(t, tdist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place element-wise max across ranks (no-op in one process); returns ``t``."""
    return _all_reduce(t, tdist.ReduceOp.MAX)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src`` (no-op in one process), whatever device ``t`` is on."""
    if is_initialized() and world_size() > 1:
        buf = t.to(comm_device())
        tdist.broadcast(buf, src=src)
        if buf is not t:
            t.copy_(buf)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (any picklable value; the identity in one process)."""
    if is_initialized() and world_size() > 1:
        box = [obj]
        tdist.broadcast_object_list(box, src=src, device=comm_device())
        return box[0]
    return obj


def derive_seed(seed: int, rank: int, step: int, stream: str) -> int:
    """A 63-bit seed for (seed, rank, step, stream) via NumPy's SeedSequence hashing."""
    return hash_seed(seed, rank, step, STREAMS[stream]) >> 1


def torch_generator(seed: int, rank: int, step: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator on ``device`` seeded for (seed, rank, step, stream)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, rank, step, stream))
    return g


def numpy_rng(seed: int, rank: int, step: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, rank, step, stream))
