"""What a trainer checkpoints: its stateful parts, registered with the checkpoint manager.

:func:`register_parts` is the one list of everything that must survive a restart (loaded in this
order): shared parts written once by rank 0, every rank's own (with a re-split where the number of
processes may change), the global buffer. It reads the attributes of an
:class:`ebmscale.trainer.Trainer` (model, EMA, optimizer, scheduler, counters, buffer, stream,
objective, RNG) and is called once by its constructor; the manager owns the I/O.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ebmscale import dist
from ebmscale.buffer import shardfile
from ebmscale.buffer.client import as_numpy
from ebmscale.buffer.reshard import reshard_buffer_states
from ebmscale.checkpoint import CheckpointError
from ebmscale.checkpoint_manager import CheckpointManager, SelfSavingWriter
from ebmscale.config import to_dict
from ebmscale.data.reshard import remap_stream_state
from ebmscale.optim import apply_lr


def register_parts(tr: Any) -> CheckpointManager:
    """A :class:`CheckpointManager` for the trainer ``tr`` with all its parts registered."""
    ds = tr.parallel.is_deepspeed
    ckpt = CheckpointManager(tr.run_dir, tr.rank, tr.world, keep=tr.cfg.train.keep_checkpoints,
                             sharded=(tr.parallel.save_sharded, tr.parallel.load_sharded) if ds else None)
    shared = functools.partial(ckpt.register, scope="shared")
    mine = functools.partial(ckpt.register, scope="rank")
    shared("config", save=lambda: to_dict(tr.cfg))
    shared("model", save=tr.model.state_dict, load=tr.model.load_state_dict)
    shared("ema", save=lambda: None if tr.ema is None else tr.ema.state_dict(),
           load=lambda s: s is not None and tr.ema is not None and tr.ema.load_state_dict(s))
    # Under DeepSpeed the optimizer state is sharded across ranks: it lives in DEEPSPEED_DIR.
    shared("optimizer", save=lambda: None if ds else tr.optimizer.state_dict(),
           load=functools.partial(_load_optimizer, tr))
    shared("counters", save=lambda: {"rollbacks": tr.rollbacks, "seed": tr.seed, "lr_scale": tr.lr_scale},
           load=functools.partial(_load_counters, tr))
    shared("scheduler", save=tr.scheduler.state_dict, load=functools.partial(_load_scheduler, tr))
    shared("precision", save=tr.parallel.state_dict, load=lambda s: tr.parallel.load_state_dict(s or {}))
    shared("runtime", save=tr.runtime.to_dict)  # what this run resolved to (information only)
    mine("rank", save=lambda: tr.rank)
    mine("world", save=lambda: tr.world)
    mine("sampler_grad_scaler",
         save=lambda: None if tr.input_grad_scaler is None else tr.input_grad_scaler.state_dict(),
         load=lambda s: s and tr.input_grad_scaler is not None and tr.input_grad_scaler.load_state_dict(s))
    if getattr(tr.buffer, "is_global", False):  # a Ray-hosted buffer: its shards write and read their own files
        ckpt.register("buffer", "global", save=lambda: as_numpy(tr.buffer.state_dict()),
                      load=functools.partial(_load_global_buffer, tr.buffer),
                      writer=functools.partial(SelfSavingWriter, owner=tr.buffer))
    else:  # every rank's shard; re-dealt over a new number of ranks
        mine("buffer", save=tr.buffer.state_dict,
             load=lambda s: s is not None and tr.buffer.load_state_dict(as_numpy(s)),
             remap=lambda olds: None if olds[0] is None else
             reshard_buffer_states([as_numpy(o) for o in olds], tr.world, tr.rank))
    mine("stream", save=tr.stream.state_dict, load=tr.stream.load_state_dict,
         remap=lambda olds: remap_stream_state(olds, tr.stream.state_dict()))
    mine("objective", save=tr.estimator.state_dict, load=lambda s: s is not None and tr.estimator.load_state_dict(s))
    mine("torch_rng", save=torch.get_rng_state, load=torch.set_rng_state)
    cuda = tr.device.type == "cuda"
    mine("cuda_rng", save=lambda: torch.cuda.get_rng_state(tr.device) if cuda else None,
         load=lambda s: s is not None and cuda and torch.cuda.set_rng_state(s, tr.device))
    shared("step", save=lambda: tr.step, load=lambda s: setattr(tr, "step", int(s)))
    return ckpt


def _load_global_buffer(buffer: Any, state: dict | None) -> None:
    if state is not None:
        try:
            buffer.load_state_dict(as_numpy(state))
        except shardfile.ShardFileError as exc:
            raise CheckpointError(str(exc)) from None


def _load_optimizer(tr: Any, state: dict | None) -> None:
    if tr.parallel.is_deepspeed:
        return  # restored from the ZeRO shards
    if state is None:
        dist.print0("warning: the checkpoint's optimizer state is in DeepSpeed shards; "
                    "this DDP run starts the optimizer afresh")
    else:
        tr.optimizer.load_state_dict(state)


def _load_counters(tr: Any, counters: dict | None) -> None:
    counters = counters or {}
    tr.rollbacks = int(counters.get("rollbacks", 0))
    tr.seed = int(counters.get("seed", tr.cfg.train.seed))
    tr.lr_scale = float(counters.get("lr_scale", 1.0))


def _load_scheduler(tr: Any, state: dict) -> None:
    tr.scheduler.load_state_dict(state)
    apply_lr(tr.scheduler, tr.optimizer)
