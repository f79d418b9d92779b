"""IGEBM's ResNet energy family (Du & Mordatch 2019), reimplemented in PyTorch.

The architecture follows the official TensorFlow release (openai/ebm_code_release, ``models.py`` and
the block helpers in ``utils.py``); what that code does, read from it:

* A stem: one 3x3 convolution (no bias) followed by the activation.
* Residual blocks ``act(pool?(conv2(act(conv1(h + b1)) + b2) * g2 + skip(h)))`` where
  - ``b1`` / ``b2`` are learned per-channel biases added to the *input* of each convolution (the
    convolutions themselves have no bias: the code creates one per conv, but its block helper never
    adds it, so it never receives a gradient),
  - ``g2`` is a learned per-channel gain on the output of the second convolution,
  - the skip path is the identity, or a bias-free *3x3* convolution when the channel count changes,
  - downsampling is a 2x2 average pool applied after the residual sum, before the activation.
* The first block of every stage downsamples; the stage widths are multiples of the base filter
  count F (``num_filters``):

  ========================  ======  ===========  ================  =========================
  variant                   F       stem         widths x blocks   released for
  ========================  ======  ===========  ================  =========================
  ResNet32                  128     F            F,2F,2F  x 2,2,2  CIFAR-10 conditional
  ResNet32Large             128     F            F,2F,4F  x 3,3,3  CIFAR-10 unconditional
  ResNet32Wider             256     128 (fixed)  F,2F,4F  x 3,3,3  ImageNet 32x32 conditional
  ResNet128                 64      64 (fixed)   F,2F,4F,8F,8F x 1,1,1,1,2  ImageNet 128 cond.
  ========================  ======  ===========  ================  =========================

  (CIFAR-10 runs of ResNet32Wider used F=192.) Every released network reaches a 4x4 map before
  the head.
* Head: a non-linearity (ReLU, or swish in the swish models), a *sum* over spatial positions and one
  linear layer to a scalar energy. The head is the only layer without spectral norm.
* Activation: leaky-ReLU with TensorFlow's default slope 0.2, or swish with ``--swish_act`` (the
  ImageNet 128 model).

Label conditioning (``cclass``): the label enters every residual block as a *class-conditional
gain and bias*. The per-channel input biases ``b1``, ``b2`` and the output gain ``g2`` become tables
with one row per class; a one-hot (or any soft) label vector ``l`` selects ``l @ table``, and the
gain gets a shared, class-independent offset added (``g2 = l @ G + c``). The stem, skip convolutions
and head are not conditioned. So E(x, y) is one network whose normalisation-free "FiLM" parameters
depend on y. The unconditional model has the same parameters with a single row.

Spectral norm (IGEBM's default): every convolution and hidden linear layer is divided by its
largest singular value (one power iteration per training step), except the second convolution of
each residual branch, which the original initialises near zero (N(0, 1e-10)) and divides by
``max(sigma, 1)`` instead: the branch starts as a no-op and may grow up to norm 1. We keep both
details: that convolution gets :class:`CappedSpectralNorm` here, the others torch's spectral norm
through :func:`apply_spectral_norm`. Without spectral norm the original zero-initialises it; so do we.

Departures from the original, on purpose:

* The marginal energy of a conditional model, E(x) = -logsumexp_y(-E(x, y)), exists here (the
  original always trains and samples with a given label); it costs one pass of the blocks per
  class -- 1000 for the ImageNet models, so feed those labels.
* Downsampling uses ``ceil_mode`` so odd maps (28 -> 14 -> 7 -> 4 for MNIST) keep their border;
  for even sizes, all the original ever saw, it is the same as TensorFlow's VALID pooling.
* One activation throughout. The original's first block of ResNet32Wider / ResNet128 always used
  leaky-ReLU even in swish runs, and its ResNet32Large ended with leaky-ReLU instead of ReLU when
  conditional (a combination never released); we use ReLU before the sum for leaky-ReLU models and
  swish for swish models.
* Dropout (``dropout`` > 0) sits where the original's did, after the first convolution of each
  block. The original's train.py builds ResNet32Large with ``train=True``, which means rate 0.5 in
  every block, on during Langevin sampling too. Here it follows train/eval mode, so samplers that
  switch to eval mode sample a deterministic energy; set ``model.dropout`` to reproduce 0.5.
* The self-attention block (``--use_attention``, off in every released command) is not implemented.

64x64 (a resolution the original did not release) gets ``resnet64``: ResNet32Wider's layout at
F=128 with a 128-channel stem (its constructor default) plus one extra downsampling block at 4F, so
the map before the head is 4x4 as in every released network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from ebmscale.models.common import Conv2d, Swish, apply_spectral_norm, make_activation


@dataclass(frozen=True)
class IGEBMSpec:
    """One IGEBM ResNet layout. ``stem`` is the original's stem width at ``width`` filters (None:
    same as ``width``); it scales with the width when a different width is asked for."""

    width: int
    stage_multipliers: tuple[int, ...]
    blocks: tuple[int, ...]
    stem: int | None = None


IGEBM_VARIANTS: dict[str, IGEBMSpec] = {
    "resnet32": IGEBMSpec(128, (1, 2, 2), (2, 2, 2)),
    "resnet32large": IGEBMSpec(128, (1, 2, 4), (3, 3, 3)),
    "resnet32wider": IGEBMSpec(256, (1, 2, 4), (3, 3, 3), stem=128),
    # Our choice for 64x64 (see the module docstring); not an original network.
    "resnet64": IGEBMSpec(128, (1, 2, 4, 4), (3, 3, 3, 1), stem=128),
    "resnet128": IGEBMSpec(64, (1, 2, 4, 8, 8), (1, 1, 1, 1, 2), stem=64),
}


def default_variant(resolution: int, conditional: bool) -> str:
    """The variant IGEBM used at a resolution: 28/32 -> ResNet32Large (unconditional CIFAR-10) or
    ResNet32 (conditional CIFAR-10); up to 64 -> ``resnet64``; larger -> ResNet128."""
    if resolution <= 32:
        return "resnet32" if conditional else "resnet32large"
    if resolution <= 64:
        return "resnet64"
    return "resnet128"


class CappedSpectralNorm(nn.Module):
    """Parametrization ``W -> W / max(sigma(W), 1)``: a spectral-norm *cap*, not a normalisation.

    IGEBM uses it on the near-zero-initialised last convolution of every residual branch, so the
    branch can start as a no-op instead of being rescaled to norm 1. sigma is estimated like torch's
    spectral norm (persistent u, v vectors; one power iteration per forward, only in training mode,
    so samplers in eval mode never advance it)."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, eps: float = 1e-12):
        super().__init__()
        self.n_power_iterations, self.eps = n_power_iterations, eps
        mat = weight.detach().flatten(1)
        u = F.normalize(mat.new_empty(mat.shape[0]).normal_(), dim=0, eps=eps)
        v = F.normalize(mat.new_empty(mat.shape[1]).normal_(), dim=0, eps=eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        # Warm the estimate up front (as torch's spectral norm does) so the first sigma is sensible.
        self._power_method(mat, 15)

    @torch.no_grad()
    def _power_method(self, mat: torch.Tensor, iterations: int) -> None:
        for _ in range(iterations):
            self._v.copy_(F.normalize(mat.t() @ self._u, dim=0, eps=self.eps))
            self._u.copy_(F.normalize(mat @ self._v, dim=0, eps=self.eps))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # In fp32 (the buffers' dtype) even under autocast, and even where DeepSpeed made the weight
        # itself half precision (it casts parameters, not buffers): sigma of a near-zero matrix in
        # bf16 would be noise. An fp32 weight takes exactly the same path as before.
        half = weight.dtype != self._u.dtype
        out_dtype = weight.dtype
        with torch.autocast(weight.device.type, enabled=False):
            weight = weight.to(self._u.dtype)
            mat = weight.flatten(1)
            if self.training:
                self._power_method(mat.detach(), self.n_power_iterations)
            # Clones: the buffers are updated in place on the next training forward, after autograd
            # may have saved them for this one.
            u, v = self._u.clone(), self._v.clone()
            sigma = torch.dot(u, mat @ v)
            out = weight / sigma.clamp(min=1.0)
            return out.to(out_dtype) if half else out


class _LabelTable(nn.Module):
    """Per-channel values selected by a label: one row (unconditional) or one row per class.

    ``offset`` adds the original's shared, class-independent term (used for the conditional gain).
    """

    def __init__(self, num_classes: int, channels: int, init: float, offset: bool = False):
        super().__init__()
        self.table = nn.Parameter(torch.full((max(num_classes, 1), channels), float(init)))
        self.offset = nn.Parameter(torch.zeros(channels)) if offset and num_classes > 0 else None

    def forward(self, label: torch.Tensor | None) -> torch.Tensor:
        """(N, K) label weights -> (N, C, 1, 1); None -> the single row, (1, C, 1, 1)."""
        if label is None:
            out = self.table[:1]
        else:
            out = label.to(self.table.dtype) @ self.table
            if self.offset is not None:
                out = out + self.offset
        return out[:, :, None, None]


class IGEBMBlock(nn.Module):
    """One IGEBM residual block (see the module docstring for the exact computation)."""

    def __init__(self, cin: int, cout: int, num_classes: int, activation: str, leaky_slope: float,
                 downsample: bool, dropout: float, spectral_norm: bool):
        super().__init__()
        self.conv1 = Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = Conv2d(cout, cout, 3, padding=1, bias=False)
        self.skip = Conv2d(cin, cout, 3, padding=1, bias=False) if cin != cout else None
        self.bias1 = _LabelTable(num_classes, cin, 0.0)
        self.bias2 = _LabelTable(num_classes, cout, 0.0)
        self.gain2 = _LabelTable(num_classes, cout, 1.0, offset=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.act1 = make_activation(activation, leaky_slope)
        self.act2 = make_activation(activation, leaky_slope)
        self.downsample = downsample
        with torch.no_grad():
            if spectral_norm:
                # Original: N(0, 1e-10) init under a capped spectral norm, so the branch starts off.
                self.conv2.weight.normal_(0.0, 1e-10)
                parametrize.register_parametrization(self.conv2, "weight", CappedSpectralNorm(self.conv2.weight))
            else:
                self.conv2.weight.zero_()

    def forward(self, h: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        r = self.act1(self.dropout(self.conv1(h + self.bias1(label))))
        r = self.conv2(r + self.bias2(label)) * self.gain2(label)
        out = r + (h if self.skip is None else self.skip(h))
        if self.downsample:
            out = F.avg_pool2d(out, 2, ceil_mode=True)
        return self.act2(out)


class IGEBMResNet(nn.Module):
    """IGEBM ResNet energy: ``forward(x, y=None) -> (N,)`` energies, lower = more likely.

    Unconditional (``num_classes`` = 0): E(x); passing labels is an error.
    Conditional (``num_classes`` = K > 0): E(x, y) with y class indices ``(N,)`` or label weights
    ``(N, K)`` (one-hot or soft, as the original's label vectors); with y None the marginal
    E(x) = -logsumexp_y(-E(x, y)), i.e. p(x) = sum_y p(x, y) -- K passes of the residual blocks.
    ``logits(x)`` = -E(x, y) for every y, a classifier p(y | x) consistent with both energies.
    """

    def __init__(self, in_channels: int, stem_width: int, stage_widths: Sequence[int],
                 blocks_per_stage: Sequence[int], num_classes: int = 0, activation: str = "leaky_relu",
                 leaky_slope: float = 0.2, spectral_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        if len(stage_widths) != len(blocks_per_stage) or min(blocks_per_stage, default=0) < 1:
            raise ValueError(f"need >= 1 block per stage, got widths {stage_widths} and blocks {blocks_per_stage}")
        self.num_classes = int(num_classes)
        self.stem = Conv2d(in_channels, stem_width, 3, padding=1, bias=False)
        self.stem_act = make_activation(activation, leaky_slope)
        blocks: list[IGEBMBlock] = []
        cin = stem_width
        for width, n in zip(stage_widths, blocks_per_stage):
            for b in range(n):
                blocks.append(IGEBMBlock(cin, width, self.num_classes, activation, leaky_slope,
                                         downsample=b == 0, dropout=dropout, spectral_norm=spectral_norm))
                cin = width
        self.blocks = nn.ModuleList(blocks)
        # The original: ReLU before the spatial sum, swish in swish models.
        self.out_act = Swish() if activation == "swish" else nn.ReLU()
        self.head = nn.Linear(cin, 1)
        if spectral_norm:
            # conv2 of each block already carries CappedSpectralNorm; apply_spectral_norm skips it.
            apply_spectral_norm(self, exclude=(self.head,))

    def _label_weights(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() == 2:
            if y.shape[1] != self.num_classes:
                raise ValueError(f"label weights have {y.shape[1]} columns, model has {self.num_classes} classes")
            return y
        return F.one_hot(y.long(), self.num_classes)

    def _energy_from_stem(self, h: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, label)
        return self.head(self.out_act(h).sum(dim=(2, 3))).squeeze(-1)

    def class_energies(self, x: torch.Tensor) -> torch.Tensor:
        """E(x, y) for every class, shape (N, K). The stem is label-free, so it runs once."""
        if self.num_classes == 0:
            raise RuntimeError("class_energies needs a conditional model (num_classes > 0)")
        # cached(): every class pass must see the same spectrally normalised weights, and the
        # power iteration must advance once per call, not once per class.
        with parametrize.cached():
            h = self.stem_act(self.stem(x))
            eye = torch.eye(self.num_classes, device=x.device, dtype=x.dtype)
            return torch.stack([self._energy_from_stem(h, eye[k].expand(x.shape[0], -1))
                                for k in range(self.num_classes)], dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """-E(x, y) for every y, (N, K): log p(y | x) up to a per-sample constant."""
        return -self.class_energies(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("labels given to an unconditional IGEBM energy")
            return self._energy_from_stem(self.stem_act(self.stem(x)), None)
        if y is None:
            return -torch.logsumexp(self.logits(x), dim=1)
        return self._energy_from_stem(self.stem_act(self.stem(x)), self._label_weights(y))


def igebm_resnet(variant: str, in_channels: int = 3, width: int = 0, depth: int = 0, num_classes: int = 0,
                 activation: str = "leaky_relu", leaky_slope: float = 0.2, spectral_norm: bool = True,
                 dropout: float = 0.0) -> IGEBMResNet:
    """Build an IGEBM variant. ``width`` = base filters F (0: the variant's), ``depth`` = blocks per
    stage (0: the variant's own counts); a fixed-width stem scales in proportion to F."""
    if variant not in IGEBM_VARIANTS:
        raise ValueError(f"unknown IGEBM variant '{variant}'; choose from {sorted(IGEBM_VARIANTS)}")
    spec = IGEBM_VARIANTS[variant]
    base = width if width > 0 else spec.width
    stem = base if spec.stem is None else max(1, int(round(spec.stem * base / spec.width)))
    blocks = spec.blocks if depth <= 0 else (depth,) * len(spec.blocks)
    return IGEBMResNet(in_channels, stem, [m * base for m in spec.stage_multipliers], blocks,
                       num_classes=num_classes, activation=activation, leaky_slope=leaky_slope,
                       spectral_norm=spectral_norm, dropout=dropout)


def build_igebm(cfg, data_shape: tuple[int, ...]) -> IGEBMResNet:
    """IGEBM energy for ``cfg`` (a ``ModelConfig``) and images of ``data_shape`` = (C, H, W).

    ``cfg.variant`` '' picks by resolution (:func:`default_variant`). Labels are used only when
    ``cfg.conditional``; an unconditional IGEBM has no classifier head whatever ``num_classes`` is.
    """
    if len(data_shape) != 3:
        raise ValueError(f"IGEBM needs (C, H, W) images, got data shape {tuple(data_shape)}")
    channels, height, width = data_shape
    variant = cfg.variant or default_variant(max(height, width), cfg.conditional)
    return igebm_resnet(variant, in_channels=channels, width=cfg.width, depth=cfg.depth,
                        num_classes=cfg.num_classes if cfg.conditional else 0, activation=cfg.activation,
                        leaky_slope=cfg.leaky_slope, spectral_norm=cfg.spectral_norm, dropout=cfg.dropout)
