"""A per-pixel vector field for critics (learned Stein discrepancy): image in, image-shaped out.

A critic f must be able to point anywhere in data space. The energy factory's networks end in a
global feature vector, so a d-way linear head on them gives f values in a fixed subspace of rank
``4 * width`` (64 of MNIST's 784 dimensions at the default width): the model's score is then only
tested in those directions. This small U-Net keeps a value per pixel: two stride-2 stages down,
back up with nearest-neighbour upsampling and skip connections, so each output pixel sees a
neighbourhood of about 20 pixels at 28x28 and the field has full rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ebmscale.models.common import Conv2d, make_activation


class UNetField(nn.Module):
    """x (N, C, H, W) -> f(x) of the same shape. ``width`` channels at full resolution, 2x and 4x
    at the half and quarter resolutions. On the way up each stage convolves at the coarser
    resolution, then upsamples (nearest) and adds the skip: the full-resolution work is two thin
    convolutions, so the field costs about 4 M multiply-adds per 28x28 image at width 16 (the
    critic runs several double-backward updates per model step). The last convolution starts at
    zero, so f starts at 0 (the critic's L2 optimum before it has seen any score)."""

    def __init__(self, in_channels: int = 1, width: int = 16, activation: str = "swish", leaky_slope: float = 0.2):
        super().__init__()
        w = width
        self.act = make_activation(activation, leaky_slope)
        self.inp = Conv2d(in_channels, w, 3, padding=1)
        self.down1 = Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.down2 = Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)
        self.up2 = Conv2d(4 * w, 2 * w, 3, padding=1)
        self.up1 = Conv2d(2 * w, w, 3, padding=1)
        self.out = Conv2d(w, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The field at ``x`` (named like the factory heads' output, which critics read)."""
        a = self.act
        h1 = a(self.inp(x))
        h2 = a(self.down1(h1))
        h3 = a(self.down2(h2))
        u2 = a(F.interpolate(self.up2(h3), size=h2.shape[-2:], mode="nearest") + h2)
        u1 = a(F.interpolate(self.up1(u2), size=h1.shape[-2:], mode="nearest") + h1)
        return self.out(u1)

    forward = logits
