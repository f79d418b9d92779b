"""JEM's Wide-ResNet feature extractor (wgrathwohl/JEM ``wideresnet.py``), reimplemented.

Layout (Zagoruyko & Komodakis 2016, WRN-d-k with d = 6n + 4): a 3x3 stem to 16 channels, three
stages of n pre-activation basic blocks with 16k, 32k, 64k channels (stride 1, 2, 2), then
norm -> activation -> global pooling to a (N, 64k) feature vector. A block is
``conv2(act(norm2(dropout(conv1(act(norm1(x))))))) + shortcut(x)``, the stride on ``conv2`` and a
1x1 convolution as shortcut when the shape changes -- applied to the raw input x, as JEM does.

JEM's setting is ``norm="none"``, leaky-ReLU 0.2, dropout 0: without normalisation, a sample's
energy does not depend on the rest of its batch, which Langevin sampling needs. Differences from
JEM's file, on purpose:

* Convolutions carry a bias only without normalisation (JEM always had one; in front of a
  batch-norm it is redundant). With ``norm="batch"`` this is the standard WRN, whose WRN-28-10
  with a 10-way head has the well-known 36,479,194 parameters.
* Global *average* pooling instead of JEM's fixed ``avg_pool2d(8)``: identical at 32x32, and it
  makes 28x28 (MNIST) and 64x64 work.
* BatchNorm keeps torch's default momentum (JEM passed 0.9, a TensorFlow-style value that in torch
  weighs the current batch at 90%). Only none | batch are offered.
* The class/energy heads live in :mod:`ebmscale.models.heads`, not beside unused extra heads.
"""
from __future__ import annotations

import torch
from torch import nn

from ebmscale.models.common import Conv2d, apply_spectral_norm, make_activation
from ebmscale.models.heads import ClassifierEnergy

NORMS = ("none", "batch")


def _norm(channels: int, norm: str) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.Identity()


class WideBlock(nn.Module):
    """Pre-activation wide basic block (stride on the second convolution, as in JEM)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, activation: str, leaky_slope: float,
                 dropout: float):
        super().__init__()
        bias = norm == "none"
        self.norm1 = _norm(cin, norm)
        self.act1 = make_activation(activation, leaky_slope)
        self.conv1 = Conv2d(cin, cout, 3, padding=1, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm2 = _norm(cout, norm)
        self.act2 = make_activation(activation, leaky_slope)
        self.conv2 = Conv2d(cout, cout, 3, stride=stride, padding=1, bias=bias)
        self.shortcut = (Conv2d(cin, cout, 1, stride=stride, bias=bias) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.conv1(self.act1(self.norm1(x))))
        h = self.conv2(self.act2(self.norm2(h)))
        return h + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` features: ``forward(x) -> (N, out_dim)``, ``out_dim`` = 64k."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, in_channels: int = 3, norm: str = "none",
                 activation: str = "leaky_relu", leaky_slope: float = 0.2, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"Wide-ResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"Wide-ResNet widen factor must be >= 1, got {widen_factor}")
        if norm not in NORMS:
            raise ValueError(f"Wide-ResNet norm must be one of {NORMS}, got '{norm}'")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = Conv2d(in_channels, 16, 3, padding=1, bias=norm == "none")
        stages: list[nn.Module] = []
        cin = 16
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for b in range(n):
                blocks.append(WideBlock(cin, width, stride if b == 0 else 1, norm, activation, leaky_slope, dropout))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = _norm(cin, norm)
        self.act = make_activation(activation, leaky_slope)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.stages(self.stem(x))))
        return h.mean(dim=(2, 3))


def build_wrn(cfg, data_shape: tuple[int, ...]) -> ClassifierEnergy:
    """JEM energy for ``cfg`` (a ``ModelConfig``): WRN-``cfg.depth``-``cfg.width`` without
    normalisation (JEM's setting) under a :class:`ClassifierEnergy` head with ``cfg.num_classes``
    outputs (0: a scalar energy). Spectral norm, if asked for, spares the head."""
    if len(data_shape) != 3:
        raise ValueError(f"wrn needs (C, H, W) images, got data shape {tuple(data_shape)}")
    if cfg.depth < 10 or (cfg.depth - 4) % 6 != 0:
        raise ValueError(f"model.depth for arch wrn is the total depth 6n+4 (JEM: 28), got {cfg.depth}")
    if cfg.width < 1:
        raise ValueError(f"model.width for arch wrn is the widen factor (JEM: 10), got {cfg.width}")
    backbone = WideResNet(cfg.depth, cfg.width, in_channels=data_shape[0], norm=getattr(cfg, "norm", "none"),
                          activation=cfg.activation, leaky_slope=cfg.leaky_slope, dropout=cfg.dropout)
    model = ClassifierEnergy(backbone, backbone.out_dim, cfg.num_classes)
    if cfg.spectral_norm:
        apply_spectral_norm(model, exclude=(model.head,))
    return model
