"""A small convolutional ResNet energy for 8x8 / 28x28 / 32x32 images (CPU-sized default)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ebmscale.models.common import Conv2d, apply_spectral_norm, energy_from_head, make_activation


class _Block(nn.Module):
    """Pre-activation residual block without normalisation (normalisation layers make the
    energy of one image depend on the rest of the batch, which breaks Langevin sampling)."""

    def __init__(self, cin: int, cout: int, activation: str, leaky_slope: float, downsample: bool):
        super().__init__()
        self.act1 = make_activation(activation, leaky_slope)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.act2 = make_activation(activation, leaky_slope)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.skip = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.act2(self.conv1(self.act1(x))))
        out = h + self.skip(x)
        return F.avg_pool2d(out, 2, ceil_mode=True) if self.downsample else out


class SmallResNetEnergy(nn.Module):
    """Three stages of ``blocks_per_stage`` residual blocks (width, 2*width, 2*width channels),
    average-pool downsampling between stages, global sum pooling and a linear head.

    Unconditional (``num_classes`` = 0): E(x) is the head's single output. With classes the head
    gives logits f(x) (JEM): E(x) = -logsumexp_y f(x)[y], E(x, y) = -f(x)[y], and ``logits(x)``
    serves as a classifier.
    """

    def __init__(self, in_channels: int = 1, resolution: int = 28, width: int = 32, blocks_per_stage: int = 1,
                 activation: str = "swish", leaky_slope: float = 0.2, spectral_norm: bool = False,
                 num_classes: int = 0, conditional: bool = False):
        super().__init__()
        width = max(width, 1)
        chans = [width, 2 * width, 2 * width]
        self.stem = Conv2d(in_channels, width, 3, padding=1)
        blocks: list[nn.Module] = []
        cin = width
        for s, c in enumerate(chans):
            for b in range(blocks_per_stage):
                last_of_stage = b == blocks_per_stage - 1
                blocks.append(_Block(cin, c, activation, leaky_slope, downsample=last_of_stage and s < len(chans) - 1))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.act = make_activation(activation, leaky_slope)
        self.num_classes = num_classes
        self.head = nn.Linear(cin, max(num_classes, 1))
        if spectral_norm:
            apply_spectral_norm(self, exclude=(self.head,))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.blocks(self.stem(x)))
        return h.mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.logits(x)
        return energy_from_head(out, self.num_classes, y)
