"""MLP energy for 2-D (or any low-dimensional vector) data."""
from __future__ import annotations

import torch
from torch import nn

from ebmscale.models.common import apply_spectral_norm, energy_from_head, make_activation


class MLPEnergy(nn.Module):
    """E(x) = MLP(x): ``depth`` hidden layers of ``width`` units. With ``num_classes`` > 0 the head
    gives logits f(x) as in JEM: E(x, y) = -f(x)[y] and E(x) = -logsumexp_y f(x)[y]."""

    def __init__(self, in_dim: int = 2, width: int = 128, depth: int = 3, activation: str = "swish",
                 leaky_slope: float = 0.2, spectral_norm: bool = False, num_classes: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), make_activation(activation, leaky_slope)]
            d = width
        self.body = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.head = nn.Linear(d, max(num_classes, 1))
        if spectral_norm:
            apply_spectral_norm(self, exclude=(self.head,))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.logits(x)
        return energy_from_head(out, self.num_classes, y)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
