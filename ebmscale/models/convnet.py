"""A plain strided CNN energy: the cheapest convolutional EBM that still learns MNIST digits.

Stride-2 3x3 convolutions halve the resolution at every layer, so nearly all compute sits in the
first layer and a Langevin step costs about a tenth of a small ResNet's -- which is what makes
the default MNIST job fit in minutes on two CPU cores.
"""
from __future__ import annotations

import torch
from torch import nn

from ebmscale.models.common import Conv2d, apply_spectral_norm, energy_from_head, make_activation


class ConvNetEnergy(nn.Module):
    """``depth`` stride-2 conv layers (channels width, 2*width, 4*width, 4*width, ...), then a
    linear layer and the head. Unconditional: E(x) = head output; with classes the head gives
    logits f(x) and E(x) = -logsumexp_y f(x)[y], E(x, y) = -f(x)[y] (JEM)."""

    def __init__(self, in_channels: int = 1, resolution: int = 28, width: int = 16, depth: int = 4,
                 activation: str = "swish", leaky_slope: float = 0.2, spectral_norm: bool = False,
                 num_classes: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        cin, side = in_channels, resolution
        for i in range(depth):
            cout = width * min(2 ** i, 4)
            layers += [Conv2d(cin, cout, 3, stride=2, padding=1), make_activation(activation, leaky_slope)]
            cin, side = cout, (side + 1) // 2
        self.body = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, 4 * width),
                                make_activation(activation, leaky_slope))
        self.num_classes = num_classes
        self.head = nn.Linear(4 * width, max(num_classes, 1))
        if spectral_norm:
            apply_spectral_norm(self, exclude=(self.head,))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.logits(x)
        return energy_from_head(out, self.num_classes, y)
