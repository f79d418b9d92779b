"""Energy heads on top of a feature backbone (JEM-style classifiers and plain scalar energies)."""
from __future__ import annotations

import torch
from torch import nn

from ebmscale.models.common import energy_from_head


class ClassifierEnergy(nn.Module):
    """Energy from a feature extractor ``backbone: (N, ...) -> (N, feat_dim)`` and one linear head.

    With ``num_classes`` = K > 0 the head gives classifier logits f(x) (JEM, Grathwohl et al. 2020):
    ``logits(x)`` = f(x), E(x) = -logsumexp_y f(x)[y] and E(x, y) = -f(x)[y], so
    p(y | x) = softmax(f(x)) is the ordinary classifier and both energies share it.

    With ``num_classes`` = 0 the head has one output s(x) and E(x) = -s(x): the head's output is read
    as an unnormalised log-density, the same orientation as the logits above (JEM's unconditional
    ``F`` model maximised s on data, i.e. s = -E). There is no classifier then: ``logits`` raises,
    and so does passing labels.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int = 0):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.head = nn.Linear(feat_dim, max(self.num_classes, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features, (N, feat_dim)."""
        return self.backbone(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier logits, (N, num_classes)."""
        if self.num_classes == 0:
            raise RuntimeError("an unconditional ClassifierEnergy (num_classes=0) has no classifier logits")
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Energies (N,): E(x), or E(x, y) for class indices ``y`` of shape (N,)."""
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("labels given to an unconditional energy (num_classes=0)")
            return -self.head(self.features(x)).squeeze(-1)
        return energy_from_head(self.logits(x), self.num_classes, None if y is None else y.long())
