"""Sampling from trained energies: N chains from noise or a replay buffer, K Langevin steps,
optionally class-conditional, and product-of-experts composition.

A product of experts p(x) ∝ prod_i p_i(x) has energy ``sum_i E_i(x)``: :func:`sum_energy` adds
the energies of several models (checkpoints) and/or several conditions E(x, y_c) of one model,
and the ordinary sampler runs on the sum. Each rank generates its share of N
(:func:`ebmscale.eval.fid.rank_share`) from its own stream derived from (seed, rank), so the
set of samples does not depend on the batch size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ebmscale import dist
from ebmscale.buffer.replay import decode
from ebmscale.config import Config, ConfigError
from ebmscale.sampling import LangevinSettings, langevin, sampling_mode, uniform_noise

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Expert:
    """One term of a product of experts: a model, and the class it is conditioned on (None =
    the model's unconditional energy E(x))."""

    model: nn.Module
    label: int | None = None

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        if self.label is None:
            return self.model(x)
        y = torch.full((x.shape[0],), int(self.label), dtype=torch.long, device=x.device)
        return self.model(x, y)


def sum_energy(experts: Sequence[Expert]) -> EnergyFn:
    """Energy of the product of the experts' densities: the sum of their energies."""
    if not experts:
        raise ValueError("a product of experts needs at least one expert")

    def energy(x: torch.Tensor) -> torch.Tensor:
        return sum(e.energy(x) for e in experts)

    return energy


def build_experts(models: Sequence[tuple[Config, nn.Module]], classes: Sequence[int]) -> list[Expert]:
    """Every model once per class in ``classes`` (once, unconditional, when empty). Raises a
    ConfigError naming the problem when a class is out of range or a model has no classes."""
    experts = []
    for i, (cfg, model) in enumerate(models):
        if not classes:
            experts.append(Expert(model))
            continue
        k = cfg.model.num_classes
        if k < 2:
            raise ConfigError(f"--class needs class-conditional energies; model {i + 1} has model.num_classes={k}")
        for c in classes:
            if not 0 <= c < k:
                raise ConfigError(f"--class {c} is out of range for model {i + 1} ({k} classes)")
            experts.append(Expert(model, int(c)))
    return experts


def _array(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def buffer_images(state: dict, n: int, first: int, labels: int | None = None) -> np.ndarray:
    """Chains ``first .. first + n - 1`` of a saved replay buffer (``ebmscale.checkpoint.load_buffer_state``)
    as float32, restricted to the slots of class ``labels`` when given. Raises ConfigError when
    the buffer holds fewer chains than asked for."""
    if labels is not None:
        return buffer_class_images(state, np.full(n, int(labels), np.int64), np.arange(first, first + n))
    data = _array(state["data"])
    if first + n > len(data):
        raise ConfigError(f"the replay buffer holds {len(data)} chains; asked for {first + n} "
                          "(lower --n or use --init noise)")
    return decode(data[first : first + n], state["storage"], tuple(state["bounds"]))


def buffer_class_images(state: dict, labels: np.ndarray, ordinals: np.ndarray) -> np.ndarray:
    """Per-sample chains of a saved class-partitioned replay buffer: for sample j, the
    ``ordinals[j]``-th chain (slot order) of class ``labels[j]``, as float32. Raises ConfigError
    when the buffer has no class partitions or a class holds fewer chains than asked for."""
    slot_labels = state.get("labels")
    if slot_labels is None:
        raise ConfigError("--init buffer for class-conditional samples needs a class-partitioned buffer; "
                          "this one has no labels (use --init noise)")
    slot_labels = _array(slot_labels)
    idx = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        slots = np.flatnonzero(slot_labels == c)
        need = int(ordinals[where].max()) + 1
        if need > len(slots):
            raise ConfigError(f"the replay buffer holds {len(slots)} chains of class {int(c)}; asked for {need} "
                              "(lower --n or use --init noise)")
        idx[where] = slots[ordinals[where]]
    return decode(_array(state["data"])[idx], state["storage"], tuple(state["bounds"]))


def balanced_classes(n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels of N class-conditional samples spread evenly over the classes, and each sample's
    ordinal within its class: global sample i has class ``i mod C`` and ordinal ``i div C``. Every
    class gets exactly floor(N/C) or ceil(N/C) samples (the first N mod C classes one more), and
    every contiguous share of [0, N) -- a rank's, a batch's -- mixes the classes."""
    i = np.arange(int(n), dtype=np.int64)
    return i % num_classes, i // num_classes


def conditional_generate(model: nn.Module, labels: np.ndarray, first: int, shape: tuple[int, ...],
                         settings: LangevinSettings, seed: int, *, step: int = 0,
                         init_bounds: tuple[float, float] = (-1.0, 1.0), starts: np.ndarray | None = None,
                         batch_size: int = 256, device: torch.device | str = "cpu",
                         autocast_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Yield class-conditional samples of ``model`` (in sampling mode) in batches: sample j
    (global index ``first + j``) is a chain at label ``labels[j]`` whose energy is evaluated once
    per Langevin step at its own label, E(x, y_j) -- never the marginal over classes, which costs
    one pass per class. Chains start from ``starts[j]`` (e.g. the class's buffer chains) or
    uniform noise over ``init_bounds``; starts and Langevin noise come from per-sample streams
    derived from (seed, global index, step), so the N samples are the same whatever the number of
    ranks and the batch size."""
    device = torch.device(device)
    for lo in range(0, len(labels), batch_size):
        hi = min(lo + batch_size, len(labels))
        y = torch.as_tensor(labels[lo:hi], dtype=torch.long, device=device)
        gens = [dist.torch_generator(seed, first + j, step, "eval", device) for j in range(lo, hi)]
        if starts is not None:
            x0 = torch.as_tensor(starts[lo:hi]).to(device, torch.float32)
        else:
            x0 = torch.cat([uniform_noise(1, shape, init_bounds, g, device) for g in gens])

        def noise(x: torch.Tensor, gens=gens) -> torch.Tensor:
            return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)
                              for g in gens])

        yield langevin(lambda x, y=y: model(x, y), x0, settings, None, autocast_dtype=autocast_dtype, noise_fn=noise)


@contextlib.contextmanager
def models_sampling(models: Sequence[nn.Module]) -> Iterator[None]:
    """:func:`sampling_mode` for several models at once (each model once, however many experts
    share it)."""
    with contextlib.ExitStack() as stack:
        for m in {id(m): m for m in models}.values():
            stack.enter_context(sampling_mode(m))
        yield


def generate(energy_fn: EnergyFn, n: int, shape: tuple[int, ...], settings: LangevinSettings,
             generator: torch.Generator, *, init_bounds: tuple[float, float] = (-1.0, 1.0),
             starts: np.ndarray | torch.Tensor | None = None, batch_size: int = 256,
             device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Yield ``n`` samples in batches of at most ``batch_size``: chains from ``starts`` (e.g.
    buffer chains, ``(n, *shape)``) or uniform noise over ``init_bounds``, after
    ``settings.steps`` Langevin steps on ``energy_fn``. Models inside ``energy_fn`` must already
    be in sampling mode."""
    done = 0
    while done < n:
        m = min(batch_size, n - done)
        if starts is not None:
            x0 = torch.as_tensor(starts[done : done + m]).to(device, torch.float32)
        else:
            x0 = uniform_noise(m, shape, init_bounds, generator, device)
        yield langevin(energy_fn, x0, settings, generator, autocast_dtype=autocast_dtype)
        done += m


def gather_arrays(x: np.ndarray) -> np.ndarray:
    """Every rank's array concatenated in rank order, on every rank (the array itself in one
    process). For per-sample results whose global order matters (scores, images)."""
    if not dist.is_initialized() or dist.world_size() == 1:
        return x
    import torch.distributed as tdist

    parts: list = [None] * dist.world_size()
    tdist.all_gather_object(parts, x)
    return np.concatenate(parts)
