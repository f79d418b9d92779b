"""Class-conditional sampling for FID/IS (ebmscale.eval.generate): labels spread evenly over N
with exact per-class counts, each chain evaluated at its own label only, starts from the class
partitions of a buffer or from noise, and samples that do not depend on how N is split (ranks,
batches). The 2-rank check with real processes is in tests/distributed/test_fid_ranks.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ebmscale import dist
from ebmscale.buffer.replay import ReplayBuffer
from ebmscale.config import ConfigError
from ebmscale.eval.fid import rank_share
from ebmscale.eval.generate import balanced_classes, buffer_class_images, conditional_generate
from ebmscale.sampling import LangevinSettings, langevin, uniform_noise

SHAPE = (1, 4, 4)
SETTINGS = LangevinSettings(steps=30, step_size=0.005, noise_std=0.02, clamp=(0.0, 1.0))


class TwoClassEnergy(nn.Module):
    """E(x, y) = ||x - mu_y||^2 / (2 s^2): class 0 sits at 0.2, class 1 at 0.8 (in [0, 1]).
    Counts the chains it evaluates, and refuses the marginal (no label)."""

    def __init__(self):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor([0.2, 0.8]), requires_grad=False)
        self.evaluated = 0

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert y is not None and y.shape == (x.shape[0],), "the marginal energy must not be evaluated"
        self.evaluated += x.shape[0]
        return ((x - self.mu[y].view(-1, 1, 1, 1)) ** 2).flatten(1).sum(1) / (2 * 0.1 ** 2)


def by_hand(model: nn.Module, c: int, i: int, seed: int, starts: np.ndarray | None = None) -> torch.Tensor:
    """Sample i drawn alone, with class c's energy: its own stream for start and noise."""
    g = dist.torch_generator(seed, i, 0, "eval")
    x0 = uniform_noise(1, SHAPE, (0.0, 1.0), g) if starts is None else torch.from_numpy(starts)
    return langevin(lambda x: model(x, torch.full((1,), c)), x0, SETTINGS,
                    noise_fn=lambda x: torch.randn((1, *x.shape[1:]), generator=g))[0]


def test_balanced_classes_give_exact_counts_and_mix_every_share():
    labels, ordinals = balanced_classes(1003, 10)
    assert np.bincount(labels).tolist() == [101, 101, 101] + [100] * 7
    for c in range(10):  # ordinals number each class's samples 0, 1, 2, ...
        assert ordinals[labels == c].tolist() == list(range(int((labels == c).sum())))
    for r in range(3):  # every rank's share holds every class
        first, count = rank_share(1003, r, 3)
        assert set(labels[first:first + count]) == set(range(10))


def test_each_chain_is_its_own_class_conditional_drawn_by_hand():
    model = TwoClassEnergy()
    labels, _ = balanced_classes(11, 2)
    x = torch.cat(list(conditional_generate(model, labels, 0, SHAPE, SETTINGS, seed=3, init_bounds=(0.0, 1.0),
                                            batch_size=4)))
    assert model.evaluated == 11 * SETTINGS.steps  # once per chain per step, at its own label
    for i, c in enumerate(labels):
        assert torch.allclose(x[i], by_hand(model, int(c), i, seed=3), atol=1e-6), i
    # The two conditionals differ, and each class's samples sit at its own mode.
    means = [float(x[torch.from_numpy(labels == c)].mean()) for c in (0, 1)]
    assert abs(means[0] - 0.2) < 0.05 and abs(means[1] - 0.8) < 0.05, means


def test_samples_do_not_depend_on_the_split_over_ranks_or_batches():
    model = TwoClassEnergy()
    labels, _ = balanced_classes(9, 2)
    whole = torch.cat(list(conditional_generate(model, labels, 0, SHAPE, SETTINGS, 1, init_bounds=(0.0, 1.0))))
    parts = []
    for r in range(2):
        first, count = rank_share(9, r, 2)
        parts += list(conditional_generate(model, labels[first:first + count], first, SHAPE, SETTINGS, 1,
                                           init_bounds=(0.0, 1.0), batch_size=2))
    assert torch.equal(torch.cat(parts), whole)


def test_buffer_starts_come_from_each_class_partition():
    buf = ReplayBuffer(12, SHAPE, (0.0, 1.0), reinit_prob=0.0, num_classes=2, seed=0)
    state = buf.state_dict()
    labels, ordinals = balanced_classes(8, 2)
    starts = buffer_class_images(state, labels, ordinals)
    slots = [np.flatnonzero(state["labels"] == c) for c in (0, 1)]
    for j, (c, o) in enumerate(zip(labels, ordinals)):
        assert np.array_equal(starts[j], state["data"][slots[c][o]]), j
    model = TwoClassEnergy()
    x = torch.cat(list(conditional_generate(model, labels, 0, SHAPE, SETTINGS, 5, starts=starts)))
    assert torch.allclose(x[5], by_hand(model, int(labels[5]), 5, 5, starts[5:6]), atol=1e-6)
    with pytest.raises(ConfigError, match="holds 6 chains of class 0; asked for 7"):
        buffer_class_images(state, *balanced_classes(14, 2))
    # The live buffer's read-only peek: one chain per label, from that label's part.
    got = buf.peek(0, np.random.default_rng(0), labels)
    data = buf.state_dict()["data"]
    for j, c in enumerate(labels):
        assert any(np.array_equal(got[j], data[s]) for s in slots[c])
