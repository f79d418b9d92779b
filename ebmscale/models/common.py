"""Pieces shared by every energy network: activations, spectral norm, the energy interface.

An energy network is a plain ``nn.Module`` whose ``forward(x, y=None)`` returns one energy per
sample (shape ``(N,)``), lower meaning more likely. Networks that are classifiers underneath
(JEM) also expose ``logits(x)``. Models know nothing about distributed training.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
# torch's own spectral-norm parametrization (private name, public behaviour): subclassed below.
from torch.nn.utils.parametrizations import _SpectralNorm


def _half_compute(x: torch.Tensor) -> bool:
    """Whether a CPU convolution on ``x`` would run in half precision (autocast or half input)."""
    if x.device.type != "cpu":
        return False
    if x.dtype in (torch.bfloat16, torch.float16):
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16)


def onednn_half_wgrad_unsafe(in_size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                             padding: tuple[int, ...], dilation: tuple[int, ...]) -> bool:
    """Whether a convolution of this geometry hits the oneDNN CPU bug in the bf16 *weight* gradient.

    Found on torch 2.14.1 (oneDNN, AVX512-BF16 / AMX CPUs): when a padded dimension yields a single
    output position and the stride exceeds the span the kernel can slide over (``stride >
    in + 2*pad - dilated_kernel + 1``), the weight gradient comes back as garbage -- NaN, inf or
    ~1e27, differing run to run (uninitialised memory), while the forward, the input gradient and
    fp32 are right. The default CNN on 8x8 digits hits it in its last stride-2 conv (1x1 -> 1x1).
    Measured over in 1..6, kernel 1/3/5, stride 1..5, padding 0..2: every bad case satisfies this
    test; it also flags a few harmless ones, which then merely run in fp32 (reproducer and scan:
    ``benchmarks/onednn_conv_bug.py``)."""
    for h, k, s, p, d in zip(in_size, kernel, stride, padding, dilation):
        span = d * (k - 1) + 1
        out = (h + 2 * p - span) // s + 1
        if p > 0 and out == 1 and s > h + 2 * p - span + 1:
            return True
    return False


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that is correct in half precision on CPUs: a layer whose geometry hits
    :func:`onednn_half_wgrad_unsafe` runs in fp32 (its output cast back), so its gradient is right.
    Such layers have a 1x1 output in the affected dimension, so the fp32 detour costs next to
    nothing; every other call is plain ``nn.Conv2d``, bitwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (isinstance(self.padding, tuple) and _half_compute(x)
                and onednn_half_wgrad_unsafe(tuple(x.shape[-2:]), self.kernel_size, self.stride, self.padding,
                                             self.dilation)):
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
            with torch.autocast("cpu", enabled=False):
                bias = None if self.bias is None else self.bias.float()
                out = self._conv_forward(x.float(), self.weight.float(), bias)
            return out.to(dtype)
        return super().forward(x)


class Swish(nn.Module):
    """x * sigmoid(x) (SiLU); IGEBM's ResNet128 uses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x)


def make_activation(name: str, leaky_slope: float = 0.2) -> nn.Module:
    """Build a fresh activation module by config name."""
    if name == "swish":
        return Swish()
    if name == "leaky_relu":
        return nn.LeakyReLU(leaky_slope)
    if name == "relu":
        return nn.ReLU()
    if name == "elu":
        return nn.ELU()
    if name == "softplus":
        return nn.Softplus()
    raise ValueError(f"unknown activation '{name}'")


def apply_spectral_norm(module: nn.Module, exclude: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Put torch's spectral-norm parametrization (one power iteration) on every Conv/Linear
    layer of ``module`` except those in ``exclude`` (normally the final linear layer).

    The power iteration only advances in training mode, so samplers that switch the module to
    eval mode (see :func:`ebmscale.sampling.langevin.sampling_mode`) leave its state untouched.
    """
    skip = {id(m) for m in exclude}
    for sub in list(module.modules()):
        if id(sub) in skip:
            continue
        if isinstance(sub, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)) and not parametrizations_present(sub):
            # As torch.nn.utils.parametrizations.spectral_norm(sub, n_power_iterations=1) does.
            dim = 1 if isinstance(sub, nn.ConvTranspose2d) else 0
            parametrize.register_parametrization(sub, "weight", SpectralNorm(sub.weight, 1, dim=dim, eps=1e-12))
    return module


@contextlib.contextmanager
def frozen_power_iteration(module: nn.Module) -> Iterator[None]:
    """Hold every weight parametrization of ``module`` (spectral norm, IGEBM's capped spectral
    norm) in eval mode for the block, leaving the rest of the module in its mode: the forward
    uses the current u, v vectors without advancing the power iteration. Gradient accumulation
    runs its 2nd..k-th micro-batches this way, so that k micro-batches advance the estimate once,
    like one forward over the whole batch does."""
    lists = [m for m in module.modules() if isinstance(m, parametrize.ParametrizationList) and m.training]
    for m in lists:
        m.eval()
    try:
        yield
    finally:
        for m in lists:
            m.train()


class SpectralNorm(_SpectralNorm):
    """torch's spectral-norm parametrization, with its power iteration and sigma kept in the dtype of
    its u, v vectors (fp32) when the weight is half precision. DeepSpeed bf16/fp16 casts a module's
    parameters but not its buffers, so torch's version would multiply a bf16 weight with fp32
    vectors and fail (``addmv input tensors must have the same dtype``); the fp32 estimate is also
    the accurate one. With an fp32 weight (DDP, autocast or not) it is torch's code path, bitwise."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dtype == self._u.dtype:
            return super().forward(weight)
        with torch.autocast(weight.device.type, enabled=False):
            return super().forward(weight.to(self._u.dtype)).to(weight.dtype)


def parametrizations_present(m: nn.Module) -> bool:
    return hasattr(m, "parametrizations") and "weight" in m.parametrizations


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars (spectral-norm u/v vectors are buffers, so not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def energy_from_head(out: torch.Tensor, num_classes: int, y: torch.Tensor | None = None) -> torch.Tensor:
    """Energy from a network's head output. Unconditional (``num_classes`` = 0): the single output
    is the energy. With classes the output is logits f(x) (JEM): E(x) = -logsumexp_y f(x)[y] and
    E(x, y) = -f(x)[y]."""
    if num_classes == 0:
        return out.squeeze(-1)
    if y is None:
        return -torch.logsumexp(out, dim=-1)
    return -out.gather(1, y.view(-1, 1)).squeeze(1)
