import math

import pytest
import torch
from torch import nn

from ebmscale.models.common import apply_spectral_norm
from ebmscale.sampling import LangevinSettings, langevin, sampling_mode, uniform_noise


def gaussian_energy(mean, cov):
    prec = torch.linalg.inv(cov)

    def energy(x):
        d = x - mean
        return 0.5 * ((d @ prec) * d).sum(-1)

    return energy


def test_proper_langevin_reproduces_gaussian_moments():
    """ULA with small eps on E = (x-m)^T P (x-m)/2 samples N(m, C) up to O(eps^2) bias."""
    mean = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]])
    n_chains, eps = 8000, 0.08
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n_chains, 2, generator=g) * 3
    s = LangevinSettings(steps=3000, step_size=eps, kind="langevin")
    x = langevin(gaussian_energy(mean, cov), x0, s, g)
    emp_mean = x.mean(0)
    emp_cov = torch.cov(x.T)
    # Monte-Carlo standard errors: mean sqrt(C_ii/n); covariance entries ~ sqrt((C_ii C_jj + C_ij^2)/n).
    se_mean = torch.sqrt(torch.diag(cov) / n_chains)
    assert torch.all((emp_mean - mean).abs() < 4 * se_mean), (emp_mean, mean)
    se_cov = torch.sqrt((torch.diag(cov)[:, None] * torch.diag(cov)[None] + cov ** 2) / n_chains)
    # ULA's own bias for this eps is about eps^2/4 * lambda_max relative (< 1%), well inside 4 SE + 1%.
    assert torch.all((emp_cov - cov).abs() < 4 * se_cov + 0.01 * cov.abs()), (emp_cov, cov)


def test_sgld_update_rule_clip_and_clamp():
    """One SGLD step: x - a * clip(grad) + sigma * noise, clamped to the range."""
    energy = lambda x: (3.0 * x).sum(-1)  # gradient 3 everywhere
    x0 = torch.zeros(5, 4)
    s = LangevinSettings(steps=1, step_size=0.1, noise_std=0.0, kind="sgld", grad_clip=1.0, clamp=(-0.05, 1.0))
    x = langevin(energy, x0, s)
    assert torch.allclose(x, torch.full_like(x, -0.05))  # -0.1*clip(3)=-0.1, clamped at -0.05
    s2 = LangevinSettings(steps=2, step_size=0.1, noise_std=0.5, kind="sgld")
    a = langevin(energy, x0, s2, torch.Generator().manual_seed(3))
    b = langevin(energy, x0, s2, torch.Generator().manual_seed(3))
    c = langevin(energy, x0, s2, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert s2.coefficients() == (0.1, 0.5)
    assert LangevinSettings(step_size=0.2, kind="langevin").coefficients() == pytest.approx((0.02, 0.2))


def test_sampling_leaves_parameters_and_spectral_norm_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 1))
    apply_spectral_norm(net, exclude=(net[2],))
    net.train()
    u_before = net[0].parametrizations.weight[0]._u.clone()
    params_before = [p.detach().clone() for p in net.parameters()]
    s = LangevinSettings(steps=10, step_size=0.1, noise_std=0.01)
    with sampling_mode(net) as m:
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        langevin(lambda x: m(x).squeeze(-1), torch.randn(8, 3), s, torch.Generator().manual_seed(0))
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(net[0].parametrizations.weight[0]._u, u_before)
    assert all(torch.equal(a, b) for a, b in zip(params_before, net.parameters()))
    # The training forward does advance the power iteration (sanity check of the test itself).
    net(torch.randn(4, 3))
    assert not torch.equal(net[0].parametrizations.weight[0]._u, u_before)


def test_uniform_noise_range():
    x = uniform_noise(1000, (3, 4, 4), (-1.0, 1.0), torch.Generator().manual_seed(0))
    assert x.shape == (1000, 3, 4, 4) and x.min() >= -1 and x.max() <= 1
    assert abs(float(x.mean())) < 0.02 and math.isclose(float(x.var()), 1 / 3, rel_tol=0.05)


# ---------------------------------------------------------------------------------- MALA

def _mala_setup():
    mean = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]])  # precision eigenvalues about 0.71 and 10
    evals, evecs = torch.linalg.eigh(torch.linalg.inv(cov))
    return mean, cov, evals, evecs


def test_mala_is_unbiased_where_unadjusted_langevin_is_not():
    """At eps = 0.4 unadjusted Langevin's stationary variance along the stiff direction (precision
    lambda = 10) is 1 / (lambda (1 - eps^2 lambda / 4)) = 1.67x the true one; MALA (same proposal +
    accept/reject) reproduces the Gaussian's mean and covariance within Monte-Carlo error."""
    mean, cov, evals, evecs = _mala_setup()
    n, eps, steps = 4000, 0.4, 600
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)) * 2
    energy = gaussian_energy(mean, cov)
    stats: dict = {}
    xm = langevin(energy, x0, LangevinSettings(steps=steps, step_size=eps, kind="mala"),
                  torch.Generator().manual_seed(1), stats=stats)
    xu = langevin(energy, x0, LangevinSettings(steps=steps, step_size=eps, kind="langevin"),
                  torch.Generator().manual_seed(1))
    se_mean = torch.sqrt(torch.diag(cov) / n)
    se_cov = torch.sqrt((torch.diag(cov)[:, None] * torch.diag(cov)[None] + cov ** 2) / n)
    assert torch.all((xm.mean(0) - mean).abs() < 4 * se_mean), xm.mean(0)
    assert torch.all((torch.cov(xm.T) - cov).abs() < 4 * se_cov), torch.cov(xm.T)
    # Variance along the stiff eigenvector: true 1/lambda; ULA's biased value; SE = var * sqrt(2/n).
    v = evecs[:, 1]
    lam = float(evals[1])
    true_var, ula_var = 1 / lam, 1 / (lam * (1 - eps ** 2 * lam / 4))
    var_m, var_u = float((xm @ v).var()), float((xu @ v).var())
    assert abs(var_m - true_var) < 4 * true_var * math.sqrt(2 / n), (var_m, true_var)
    assert abs(var_u - ula_var) < 4 * ula_var * math.sqrt(2 / n), (var_u, ula_var)
    assert var_u - true_var > 20 * true_var * math.sqrt(2 / n), "ULA must be measurably biased here"
    rate = stats["mala_accepted"] / stats["mala_proposed"]
    assert stats["mala_proposed"] == n * steps and 0.3 < rate < 0.99, rate


def test_mala_step_rejects_out_of_range_and_is_deterministic_per_generator():
    """A proposal leaving the clamp range is rejected (chain stays put), never projected; a huge
    step is rejected almost always; the same generator gives the same chains."""
    energy = lambda x: 0.5 * (x ** 2).sum(-1)
    x0 = torch.full((64, 3), 0.9)
    s = LangevinSettings(steps=5, step_size=0.5, kind="mala", clamp=(-1.0, 1.0))
    stats: dict = {}
    x = langevin(energy, x0, s, torch.Generator().manual_seed(0), stats=stats)
    assert x.min() >= -1 and x.max() <= 1
    assert 0 < stats["mala_accepted"] < stats["mala_proposed"]
    big: dict = {}
    y = langevin(energy, x0, LangevinSettings(steps=3, step_size=50.0, kind="mala"), torch.Generator().manual_seed(0),
                 stats=big)
    assert big["mala_accepted"] <= 2 and (y == 0.9).all(1).sum() >= 62
    a = langevin(energy, x0, s, torch.Generator().manual_seed(5))
    b = langevin(energy, x0, s, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_mala_under_bf16_autocast_keeps_fp32_chains_and_its_acceptance():
    """Energies under bf16 autocast, chains and the MH ratio in fp32: chains stay fp32 and the
    sampler still matches the Gaussian's stiff-direction variance to about bf16's resolution."""
    mean, cov, evals, evecs = _mala_setup()
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.linalg.cholesky(torch.linalg.inv(cov)).T)

    def energy(x):
        return 0.5 * (lin(x - mean) ** 2).sum(-1)

    stats: dict = {}
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)) + mean
    x = langevin(energy, x0, LangevinSettings(steps=300, step_size=0.3, kind="mala"), torch.Generator().manual_seed(2),
                 autocast_dtype=torch.bfloat16, stats=stats)
    assert x.dtype == torch.float32
    v, lam = evecs[:, 1], float(evals[1])
    assert abs(float((x @ v).var()) * lam - 1) < 0.2
    assert 0.3 < stats["mala_accepted"] / stats["mala_proposed"] < 1.0
