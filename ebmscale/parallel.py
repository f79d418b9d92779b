"""Data parallelism and mixed precision: the only module that imports accelerate and deepspeed.

:class:`Parallel` is built once per process from the config and owns

* the ``accelerate.Accelerator`` (gloo on CPU through ``InitProcessGroupKwargs``, NCCL on GPUs;
  a plain single process needs no launcher at all);
* the wrapper of the *loss* forward/backward: DDP, or a DeepSpeed ZeRO-1/2 engine that also owns
  the optimizer step. Gradients are averaged across ranks by the wrapper's backward;
* mixed precision. With DDP the loss forward runs under ``torch.autocast`` on fp32 weights (fp16
  adds a ``GradScaler``). DeepSpeed keeps its own scheme -- half-precision module weights, fp32
  master weights in the ZeRO optimizer, its own fp16 loss scaler -- and its engine switches off an
  outer autocast on GPUs, so the loss inputs are cast to the module's dtype instead.

The Langevin sampler never sees any of this: it runs on the unwrapped module (the model object
the trainer built; ZeRO-1/2 leave its parameters whole on every rank, so no gather is needed),
so its K steps cost no gradient all-reduce, no DDP buffer broadcast and no ZeRO collective.

accelerate's own ``--mixed_precision`` is not read: ``train.precision`` decides, so that one
config file means the same run under any launcher.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from typing import Iterator

import torch
from torch import nn

from ebmscale import dist
from ebmscale.config import Config, ConfigError
from ebmscale.performance import (AUTOCAST_DTYPES, Runtime, _flag, launched_with_deepspeed,  # noqa: F401 (re-exported)
                                  resolve_backend, resolve_device, resolve_runtime)

_ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

# The built-in DeepSpeed template, identical to launch/deepspeed/zero2.json (a test keeps the two
# equal). "auto" entries are filled from the ebmscale config by :func:`deepspeed_config`; the rest
# are ZeRO tuning knobs a cluster may want to change in its own copy of the JSON.
DEFAULT_DEEPSPEED_CONFIG: dict = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 200000000,
        "allgather_bucket_size": 200000000,
    },
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "zero_allow_untested_optimizer": True,
    "wall_clock_breakdown": False,
}


def _load_template(cfg: Config) -> tuple[dict, str]:
    """The DeepSpeed JSON to start from and where it came from."""
    path = cfg.train.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path != "none":
        if not os.path.isfile(path):
            raise ConfigError(f"DeepSpeed config '{path}' does not exist (train.deepspeed_config or the "
                              "accelerate config's deepspeed_config_file)")
        with open(path) as fh:
            try:
                return json.load(fh), path
            except json.JSONDecodeError as exc:
                raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON (line {exc.lineno})") from None
    return copy.deepcopy(DEFAULT_DEEPSPEED_CONFIG), "built-in"


def deepspeed_config(cfg: Config, world: int, precision: str | None = None) -> dict:
    """The DeepSpeed config for this run: the template with the training semantics -- micro
    batch, global batch, clipping, precision, ZeRO stage -- taken from the ebmscale config, so the
    JSON only carries tuning knobs and can never silently change what is trained. ``precision`` is
    the resolved one (:attr:`Runtime.precision`); None resolves ``cfg`` for this machine."""
    ds, origin = _load_template(cfg)
    zero = ds.setdefault("zero_optimization", {})
    stage = cfg.train.zero_stage or zero.get("stage", 2)
    if stage == "auto":
        stage = 2
    if stage not in (1, 2):
        # ZeRO-3 partitions the parameters themselves: the sampler would need a gather per
        # Langevin step, which is exactly the communication this design keeps out of the sampler.
        raise ConfigError(f"ZeRO stage {stage} from {origin} is not supported: use 1 or 2 (train.zero_stage)")
    zero["stage"] = int(stage)
    if zero.get("offload_param", {}).get("device", "none") not in ("none", None):
        raise ConfigError(f"{origin}: zero_optimization.offload_param moves parameters off the device the "
                          "sampler runs on; remove it")
    gas, k = ds.get("gradient_accumulation_steps", "auto"), cfg.optim.accumulate
    if gas not in (k, "auto"):
        raise ConfigError(f"{origin}: gradient_accumulation_steps is {gas}, but optim.accumulate is {k}; set it to "
                          "'auto' (optim.accumulate decides the micro-batches per optimizer step)")
    batch = cfg.data.batch_size
    ds.update(train_micro_batch_size_per_gpu=batch, train_batch_size=batch * world * k, gradient_accumulation_steps=k,
              gradient_clipping=float(cfg.optim.grad_clip_norm))
    p = precision or resolve_runtime(cfg, image_data=True).precision
    ds["bf16"] = {**{k: v for k, v in ds.get("bf16", {}).items() if k != "enabled"}, "enabled": p == "bf16"}
    fp16 = {k: v for k, v in ds.get("fp16", {}).items() if k not in ("enabled", "auto_cast")}
    # auto_cast off: the trainer casts the loss inputs itself, for bf16 and fp16 alike.
    ds["fp16"] = {**fp16, "enabled": p == "fp16", "auto_cast": False}
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds["steps_per_print"] = 2 ** 62  # DeepSpeed's own step logging stays off; MetricLogger reports
    return ds


class Parallel:
    """The distributed and precision context of one training process (see the module docstring).

    Usage by the trainer, in this order: ``prepare(forward_module, optimizer)`` once; per step
    ``zero_grad``, then for each of the ``optim.accumulate`` micro-batches, inside
    ``micro_batch(j)``, the loss forward inside ``autocast()`` on ``cast_input(x)`` and
    ``backward(loss)``; then ``clip_grad_norm(...)``, ``step(optimizer)``.
    """

    def __init__(self, cfg: Config, runtime: Runtime | None = None):
        self.cfg = cfg
        # Precision, backend and device come resolved (the config is never changed): the DeepSpeed
        # JSON, the scalers and the log all see the precision this run actually uses.
        self.runtime = runtime or resolve_runtime(cfg, image_data=True)
        device = self.runtime.device
        self.precision = self.runtime.precision
        self.autocast_dtype = self.runtime.autocast_dtype
        self.backend = self.runtime.backend
        launcher_mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
        # Refused whatever it says (bf16 included, even where train.precision resolves to bf16):
        # one config file must mean the same run under any launcher.
        if launcher_mp != "no":
            raise ConfigError(f"accelerate launch --mixed_precision {launcher_mp} is not read by ebmscale; set "
                              f"train.precision={launcher_mp} and leave the launcher's mixed_precision at 'no'")
        precision = self.precision
        cpu = device.type == "cpu"
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        # gloo on CPU; alone (no launcher) there is no process group to configure, and naming a
        # backend would make accelerate look for one.
        handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu and (launched or self.backend == "deepspeed") else []
        if self.backend == "deepspeed":
            if cpu:
                if _flag("ACCELERATE_USE_CPU"):
                    # accelerate silently drops DeepSpeed when ACCELERATE_USE_CPU is set.
                    raise ConfigError("train.distributed=deepspeed cannot run with ACCELERATE_USE_CPU=1 (accelerate "
                                      "then ignores DeepSpeed); unset it and export DS_ACCELERATOR=cpu")
                # Read when deepspeed is first imported (inside Accelerator); without it DeepSpeed
                # looks for CUDA.
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            if "LOCAL_RANK" not in os.environ:
                _single_process_rendezvous()
            os.environ.setdefault("TORCH_EXTENSIONS_DIR",  # DeepSpeed's JIT-built ops: never in $HOME
                                  os.path.abspath(os.path.join(cfg.data.cache_dir, "torch_extensions")))
            from accelerate.utils import DeepSpeedPlugin

            world = int(os.environ.get("WORLD_SIZE", "1"))
            self.ds_config = deepspeed_config(cfg, world, precision)
            plugin = DeepSpeedPlugin(hf_ds_config=self.ds_config, zero_stage=self.ds_config["zero_optimization"]["stage"],
                                     gradient_accumulation_steps=self.ds_config["gradient_accumulation_steps"],
                                     gradient_clipping=self.ds_config["gradient_clipping"])
            self.accelerator = Accelerator(mixed_precision=_ACCELERATE_PRECISION[precision], deepspeed_plugin=plugin,
                                           kwargs_handlers=handlers, device_placement=False)
        else:
            self.ds_config = None
            # cpu=True selects accelerate's gloo (MULTI_CPU) path; in a single process it must stay
            # False so that every Trainer in one process agrees with accelerate's process-wide state.
            self.accelerator = Accelerator(mixed_precision="no", cpu=cpu and launched, kwargs_handlers=handlers,
                                           device_placement=False)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.distributed = self.world > 1 or self.backend == "deepspeed"
        # Under a launcher the accelerator knows the local device (cuda:LOCAL_RANK); alone, the
        # config's explicit device is honoured.
        self.device = acc.device if self.distributed else device
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if self.precision == "fp16" and self.backend == "ddp" else None)
        self.engine = None
        self.wrapped: nn.Module | None = None
        self._skipped_before = 0
        self.accumulate = cfg.optim.accumulate
        self._boundary = True  # whether the current micro-batch is the last of its optimizer step

    # ------------------------------------------------------------------ wrapping
    @property
    def is_deepspeed(self) -> bool:
        return self.backend == "deepspeed"

    def prepare(self, forward_module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Wrap ``forward_module`` (the model, or an adapter sharing its parameters) for the loss
        forward/backward and return the wrapper. The optimizer stays the caller's torch optimizer
        (DeepSpeed wraps it internally; its param groups still carry the learning rate)."""
        if self.is_deepspeed:
            engine, _ = self.accelerator.prepare(forward_module, optimizer)
            self.engine = engine
            self.wrapped = engine
        elif self.world > 1:
            self.wrapped = self.accelerator.prepare_model(forward_module, device_placement=False)
        else:
            self.wrapped = forward_module
        return self.wrapped

    @property
    def module_dtype(self) -> torch.dtype:
        """dtype of the module's floating parameters (half under DeepSpeed bf16/fp16)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32) \
            if self.is_deepspeed else torch.float32

    # ------------------------------------------------------------------ precision
    def autocast(self) -> contextlib.AbstractContextManager:
        """Context of the loss forward: autocast for DDP in bf16/fp16, nothing otherwise (DeepSpeed
        computes in its module dtype)."""
        if self.autocast_dtype is None or self.is_deepspeed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        """The loss forward's input: floating tensors in the module dtype under DeepSpeed."""
        return x.to(self.module_dtype) if self.is_deepspeed and x.is_floating_point() else x

    # ------------------------------------------------------------------ one optimisation step
    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.is_deepspeed:  # the engine clears its gradients inside step()
            optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def micro_batch(self, index: int) -> Iterator[None]:
        """The context of micro-batch ``index`` (0 .. optim.accumulate - 1) of one optimizer step:
        its loss forward and backward run inside. DDP accumulates the gradients of all but the
        last micro-batch locally (``no_sync``: no all-reduce until the last backward); DeepSpeed is
        told where its accumulation boundary is."""
        self._boundary = index == self.accumulate - 1
        if not self._boundary and self.world > 1 and not self.is_deepspeed:
            with self.wrapped.no_sync():
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (its mean), weighted 1/optim.accumulate, with gradient
        averaging across ranks (DDP hooks / ZeRO reduce-scatter) on the last micro-batch. No
        parameter changes here on any backend: the update is :meth:`step`, once per optimizer step
        after the last micro-batch and the caller's divergence check. Under DeepSpeed the engine's
        own backward runs (not accelerate's, which also steps), with the accumulation boundary set
        by :meth:`micro_batch`; the engine itself divides the loss by its
        ``gradient_accumulation_steps``."""
        if self.is_deepspeed:
            if self._boundary:
                self._skipped_before = self.engine.skipped_steps
            self.engine.set_gradient_accumulation_boundary(is_boundary=self._boundary)
            self.engine.backward(loss)
            return
        if self.accumulate > 1:
            loss = loss / self.accumulate
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def clip_grad_norm(self, optimizer: torch.optim.Optimizer, params, max_norm: float) -> tuple[float | None, bool]:
        """The averaged gradients' norm before clipping, and whether they overflowed (an fp16
        overflow is a skipped step, not a divergence); before any parameter update. DDP clips here;
        DeepSpeed clips inside its step (``gradient_clipping``): its ZeRO optimizer's norm is read
        first (None where the optimizer has no such norm, ZeRO stage 0)."""
        if self.is_deepspeed:
            opt = self.engine.optimizer
            if not hasattr(opt, "scaled_global_norm"):
                return None, False
            gn = float(opt.scaled_global_norm()) / float(getattr(opt, "loss_scale", 1.0) or 1.0)
            return gn, self.precision == "fp16" and not math.isfinite(gn)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        gn = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
        return gn, self.scaler is not None and not math.isfinite(gn)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The parameter update (clip and step under DeepSpeed; an fp16 overflow skips it)."""
        if self.is_deepspeed:
            self.engine.step()
        elif self.scaler is not None:
            self.scaler.step(optimizer)  # skips the update when the gradients overflowed
            self.scaler.update()
        else:
            optimizer.step()

    def stepped(self) -> tuple[float | None, bool]:
        """After :meth:`step` under DeepSpeed: the norm its step computed and whether it skipped the
        update (fp16 overflow); (None, False) elsewhere."""
        if not self.is_deepspeed:
            return None, False
        gn = self.engine.get_global_grad_norm()
        return (math.nan if gn is None else float(gn)), self.engine.skipped_steps > self._skipped_before

    def grad_scale(self) -> float | None:
        """Current fp16 loss scale (None when there is none)."""
        if self.scaler is not None:
            return float(self.scaler.get_scale())
        if self.is_deepspeed and self.precision == "fp16":
            return float(self.engine.optimizer.loss_scale)
        return None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    def save_sharded(self, directory: str) -> None:
        """DeepSpeed only, collective: each rank writes its ZeRO shard (fp32 master weights and
        optimizer state) under ``directory``."""
        if self.is_deepspeed:
            self.engine.save_checkpoint(directory, tag="latest", save_latest=False)

    def load_sharded(self, directory: str) -> None:
        """DeepSpeed only, collective: restore module, master weights and optimizer shards."""
        if self.is_deepspeed:
            path, _ = self.engine.load_checkpoint(directory, tag="latest", load_lr_scheduler_states=False)
            if path is None:
                raise ConfigError(f"no DeepSpeed checkpoint under '{directory}' to resume from")

    def describe(self) -> str:
        """One line for the log: backend, world, device, precision."""
        extra = f" ZeRO-{self.ds_config['zero_optimization']['stage']}" if self.is_deepspeed else ""
        return (f"{self.backend}{extra} x{self.world} on {self.device.type} "
                f"({'gloo' if self.device.type == 'cpu' else 'nccl'}), precision {self.precision}")


def _single_process_rendezvous() -> None:
    """DeepSpeed always needs a process group; without a launcher, describe a world of one (what
    torchrun would export) so that ``ebmscale train train.distributed=deepspeed`` runs as is."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def count_collectives() -> Iterator[list[str]]:
    """Record every c10d collective (dispatcher op ``c10d::*``) issued in the block, from any
    thread, including the ones DDP's reducer launches from C++ and DeepSpeed's; yields the list
    of op names, filled when the block exits. For tests and debugging: it runs the profiler."""
    from torch.profiler import ProfilerActivity, profile

    names: list[str] = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield names
    names.extend(e.name for e in prof.events() if e.name.startswith("c10d::"))


# --------------------------------------------------------------------------- experiment trackers
def start_trackers(names: list[str], run_dir: str, config: dict) -> list:
    """accelerate's trackers (``accelerate.tracking``) named in ``names`` (``train.trackers``),
    started on rank 0 for this run; ``[]`` on other ranks. TensorBoard writes to ``<run_dir>/tb``;
    trackers that keep local files (wandb, mlflow, ...) keep them inside the run directory, never in
    $HOME (wandb offline: ``WANDB_MODE=offline``). A tracker registered with accelerate's
    ``register_tracker_class`` is used by its name like the built-in ones. A name accelerate does
    not know, or whose package is not installed, is a :class:`ConfigError` naming train.trackers."""
    if not names or not dist.is_main():
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    built_in = {str(t) for t in LoggerType}
    available = {str(t) for t in get_available_trackers()}
    trackers = []
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"train.trackers: accelerate knows no tracker '{name}' "
                              f"(known: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
        if name in built_in and name not in available:
            raise ConfigError(f"train.trackers: '{name}' is not installed in this environment "
                              f"(pip install {name}, or leave it out of train.trackers)")
        cls = LOGGER_TYPE_TO_CLASS[name]
        project = os.path.basename(os.path.abspath(run_dir)) or "ebmscale"
        if name == "tensorboard":
            tracker = cls("tb", run_dir)  # <run_dir>/tb, where the event file always was
        elif name == "wandb":
            tracker = cls(project, dir=run_dir)
        elif name == "mlflow":
            tracker = cls(project, logging_dir=os.path.join(run_dir, "mlruns"))
        elif cls.requires_logging_directory:
            tracker = cls(project, run_dir)
        else:
            tracker = cls(project)
        tracker.start()
        if name != "tensorboard":  # TensorBoard's hparams would add a second event file; config.yaml has it
            tracker.store_init_configuration(config)
        trackers.append(tracker)
    return trackers
