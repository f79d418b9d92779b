"""Product-of-experts sampling: the sum of two 2-D Gaussian energies, sampled with the real
Langevin sampler through ebmscale.eval.generate, lands on the product's analytic mean and
covariance."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ebmscale.config import ConfigError, load_config
from ebmscale.eval.generate import Expert, build_experts, generate, models_sampling, sum_energy
from ebmscale.sampling import LangevinSettings


class GaussianEnergy(nn.Module):
    """E(x) = 0.5 (x - m)^T P (x - m); with a label y the mean moves by y along x (a 'condition')."""

    def __init__(self, mean, precision):
        super().__init__()
        self.mean = nn.Parameter(torch.tensor(mean, dtype=torch.float32))
        self.precision = nn.Parameter(torch.tensor(precision, dtype=torch.float32))

    def forward(self, x, y=None):
        m = self.mean if y is None else self.mean + torch.stack([y.float(), torch.zeros_like(y, dtype=torch.float32)], 1)
        d = x - m
        return 0.5 * ((d @ self.precision) * d).sum(1)


def _product(means, precisions):
    p = sum(precisions)
    cov = np.linalg.inv(p)
    return cov @ sum(pi @ mi for pi, mi in zip(precisions, means)), cov


def _sample(experts, n=4000, steps=400):
    settings = LangevinSettings(steps=steps, step_size=0.1, kind="langevin", clamp=None)
    gen = torch.Generator().manual_seed(0)
    with models_sampling([e.model for e in experts]):
        x = torch.cat(list(generate(sum_energy(experts), n, (2,), settings, gen, init_bounds=(-3.0, 3.0),
                                    batch_size=2000)))
    return x.double().numpy()


def test_product_of_two_gaussian_models_matches_analytic_moments():
    m1, p1 = np.array([1.0, 0.0]), np.array([[2.0, 0.5], [0.5, 1.0]])
    m2, p2 = np.array([-1.0, 1.0]), np.array([[1.0, -0.3], [-0.3, 1.5]])
    experts = [Expert(GaussianEnergy(m1, p1)), Expert(GaussianEnergy(m2, p2))]
    x = _sample(experts)
    mean, cov = _product([m1, m2], [p1, p2])
    assert np.abs(x.mean(0) - mean).max() < 0.03
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.025, rtol=0.06)
    # Not one expert alone: its mean is far from the product's.
    assert np.abs(x.mean(0) - m1).max() > 0.3


def test_product_of_two_conditions_of_one_model():
    """--class 1 --class -1 style: E(x, y1) + E(x, y2) of one conditional model."""
    m, p = np.array([0.0, 0.5]), np.array([[1.0, 0.0], [0.0, 2.0]])
    model = GaussianEnergy(m, p)
    x = _sample([Expert(model, 2), Expert(model, 0)])
    mean, cov = _product([m + [2, 0], m], [p, p])
    assert np.abs(x.mean(0) - mean).max() < 0.03
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.02, rtol=0.06)
    assert all(q.requires_grad for q in model.parameters())  # sampling mode restored


def test_build_experts_checks_classes():
    cfg = load_config(None, ["model.num_classes=10"])
    model = nn.Identity()
    assert [e.label for e in build_experts([(cfg, model)], [3, 5])] == [3, 5]
    assert build_experts([(cfg, model), (cfg, model)], [])[1].label is None
    with pytest.raises(ConfigError, match="out of range"):
        build_experts([(cfg, model)], [10])
    with pytest.raises(ConfigError, match="num_classes=0"):
        build_experts([(load_config(None, []), model)], [1])
