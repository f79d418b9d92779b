"""The 2-D toy densities (exact sampling and log-density) and the exact 2-D evaluation."""
from __future__ import annotations

import math

import pytest
import torch

from ebmscale.data.toy import TOY_NAMES, ToyDensity, get_toy, make_splits
from ebmscale.eval.toy import _kde_log_prob, evaluate_toy, grid_log_z, kde_nll, model_nll, true_nll

GRID_N = 300  # 8/300 per cell: 7+ cells per noise std, and 75 cells per checkerboard square


def _grid(bounds, n):
    lo, hi = bounds
    h = (hi - lo) / n
    c = lo + (torch.arange(n, dtype=torch.float64) + 0.5) * h
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1), h


_CACHE: dict = {}


def _density_grid(name: str):
    """(density, log p on the midpoint grid as (n, n) with row = y, cell side), cached per name."""
    if name not in _CACHE:
        d = get_toy(name)
        pts, h = _grid(d.bounds, GRID_N)
        _CACHE[name] = (d, d.log_prob(pts).reshape(GRID_N, GRID_N), h)
    return _CACHE[name]


def test_registry():
    from ebmscale.config import TOY_DATASETS

    assert TOY_NAMES == ("8gaussians", "rings", "checkerboard", "moons")
    assert set(TOY_NAMES) == set(TOY_DATASETS)  # every configurable toy set exists
    for name in TOY_NAMES:
        d = get_toy(name)
        assert isinstance(d, ToyDensity) and d.name == name
        lo, hi = d.bounds
        assert lo < hi
    with pytest.raises(ValueError, match="spiral.*8gaussians.*moons"):
        get_toy("spiral")


@pytest.mark.parametrize("name", TOY_NAMES)
def test_sampling_reproducible_and_in_bounds(name):
    d = get_toy(name)
    a = d.sample(5000, torch.Generator().manual_seed(3))
    b = d.sample(5000, torch.Generator().manual_seed(3))
    c = d.sample(5000, torch.Generator().manual_seed(4))
    assert a.dtype == torch.float32 and a.shape == (5000, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Only the given generator is used: the global RNG state is untouched.
    state = torch.get_rng_state()
    d.sample(10, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())
    lo, hi = d.bounds
    assert bool(((a >= lo) & (a <= hi)).all())
    lp = d.log_prob(a)
    assert lp.dtype == torch.float64 and lp.shape == (5000,)
    assert bool(torch.isfinite(lp).all())  # float32-rounded draws stay in the support


@pytest.mark.parametrize("name", TOY_NAMES)
def test_density_integrates_to_one(name):
    d, lp, h = _density_grid(name)
    mass = float(torch.exp(lp).sum()) * h * h
    # The box holds all but < 1e-6 of the mass, and midpoint quadrature of these smooth (or, for
    # the checkerboard, grid-aligned piecewise-constant) densities is accurate far beyond that.
    assert abs(mass - 1.0) < 1e-4, mass


@pytest.mark.parametrize("name", TOY_NAMES)
def test_samples_match_log_prob_entropy(name):
    """mean log p over exact samples = int p log p (the negative entropy) by quadrature.

    E_q[log p] <= E_p[log p] with equality only when q = p, so a sampler/density mismatch
    (wrong scale, centre, weights) shows up here."""
    d, lp, h = _density_grid(name)
    p = torch.exp(lp)
    neg_entropy = float(torch.where(p > 0, p * lp, torch.zeros_like(p)).sum()) * h * h
    x = d.sample(40000, torch.Generator().manual_seed(11))
    s = d.log_prob(x)
    se = float(s.std()) / math.sqrt(len(s))
    assert abs(float(s.mean()) - neg_entropy) < 4 * se + 2e-3, (float(s.mean()), neg_entropy, se)


@pytest.mark.parametrize("name", TOY_NAMES)
def test_histogram_matches_density(name):
    """Sample frequencies in an 6x6 partition of the box match the quadrature mass of each cell."""
    d, lp, h = _density_grid(name)
    bins = 6  # 300 / 6 = 50 grid cells per bin side, so the bins align with the quadrature grid
    p = torch.exp(lp) * h * h
    mass = p.reshape(bins, GRID_N // bins, bins, GRID_N // bins).sum((1, 3))  # [y bin, x bin]
    n = 60000
    x = d.sample(n, torch.Generator().manual_seed(5)).to(torch.float64)
    lo, hi = d.bounds
    idx = ((x - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1).long()
    counts = torch.zeros(bins, bins, dtype=torch.float64)
    counts.index_put_((idx[:, 1], idx[:, 0]), torch.ones(n, dtype=torch.float64), accumulate=True)
    freq = counts / n
    tol = 5 * torch.sqrt(mass * (1 - mass) / n) + 2e-4
    assert bool(((freq - mass).abs() <= tol).all()), (freq - mass).abs().max()
    assert float(mass.max()) > 0.05  # the partition actually resolves the density


def test_checkerboard_support_and_value():
    d = get_toy("checkerboard")
    x = torch.tensor([[-3.0, -3.0], [-1.0, -3.0], [1.0, 1.0], [3.0, -1.0], [-4.5, 0.0], [2.0, 0.0]])
    lp = d.log_prob(x)
    assert lp[0] == pytest.approx(-math.log(32.0)) and lp[2] == pytest.approx(-math.log(32.0))
    assert lp[3] == pytest.approx(-math.log(32.0))
    assert lp[1] == -math.inf and lp[4] == -math.inf
    assert lp[5] == pytest.approx(-math.log(32.0))  # a shared edge belongs to the black square
    assert true_nll(d, x[:1]) == pytest.approx(math.log(32.0))
    assert true_nll(d, x) == math.inf


def test_rings_radial_law_is_normalised():
    d = get_toy("rings")
    r = torch.linspace(0.0, 6.0, 60001, dtype=torch.float64)
    pr = torch.exp(d.log_prob_radius(r))
    assert float(torch.trapezoid(pr, r)) == pytest.approx(1.0, abs=1e-9)


def test_moons_quadrature_against_fine_reference():
    d = get_toy("moons")
    x = torch.cat([d.sample(300, torch.Generator().manual_seed(0)).double(),
                   torch.rand(300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 8 - 4])
    # Reference: 20,000-point midpoint rule over t directly in sklearn's parametrisation.
    t = (torch.arange(20000, dtype=torch.float64) + 0.5) * (math.pi / 20000)
    arcs = [torch.stack([torch.cos(t), torch.sin(t)], 1), torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)]
    shift = torch.tensor([0.5, 0.25], dtype=torch.float64)
    comps = []
    for arc in arcs:
        mu = 2.0 * (arc - shift)
        d2 = ((x[:, None] - mu[None]) ** 2).sum(-1)
        comps.append(torch.logsumexp(-d2 / (2 * 0.04), 1) - math.log(20000))
    ref = torch.logsumexp(torch.stack(comps, 1), 1) - math.log(2) - math.log(2 * math.pi * 0.04)
    near = ref > -20  # the midpoint reference itself is only good where the arc interior dominates
    assert float((d.log_prob(x) - ref)[near].abs().max()) < 1e-4


def test_make_splits():
    s = make_splits("8gaussians", train=1000, val=200, test=300, seed=7)
    assert {k: tuple(v.shape) for k, v in s.items()} == {"train": (1000, 2), "val": (200, 2), "test": (300, 2)}
    assert all(v.dtype == torch.float32 for v in s.values())
    again = make_splits("8gaussians", train=1000, val=200, test=300, seed=7)
    assert all(torch.equal(s[k], again[k]) for k in s)
    # Independent streams: val/test do not depend on the training-set size, splits differ.
    bigger = make_splits("8gaussians", train=5000, val=200, test=300, seed=7)
    assert torch.equal(bigger["test"], s["test"]) and torch.equal(bigger["val"], s["val"])
    assert torch.equal(bigger["train"][:1000], s["train"])
    assert not torch.equal(s["val"], s["test"][:200]) and not torch.equal(s["train"][:200], s["val"])
    other = make_splits("8gaussians", train=1000, val=200, test=300, seed=8)
    assert not torch.equal(other["test"], s["test"])
    with pytest.raises(ValueError, match="unknown toy density"):
        make_splits("nope", 10, 10, 10, 0)


M, S = torch.tensor([0.3, -0.2]), 0.5


def _gauss_energy(x):
    return ((x - M) ** 2).sum(1) / (2 * S * S)


def test_grid_log_z_gaussian_is_exact():
    log_z = grid_log_z(_gauss_energy, (-5.0, 5.0), n=512)
    assert log_z == pytest.approx(math.log(2 * math.pi * S * S), abs=1e-4)
    # An energy offset shifts log Z exactly; a batch size that does not divide the grid is fine.
    shifted = grid_log_z(lambda x: _gauss_energy(x) + 40.0, (-5.0, 5.0), n=512, batch=1000)
    assert shifted == pytest.approx(log_z - 40.0, abs=1e-4)


def test_model_nll_gaussian_matches_analytic():
    x = M + S * torch.randn(3000, 2, generator=torch.Generator().manual_seed(0))
    nll, log_z = model_nll(_gauss_energy, x, (-5.0, 5.0), n=512)
    analytic = float((((x.double() - M.double()) ** 2).sum(1) / (2 * S * S)).mean()) + math.log(2 * math.pi * S * S)
    assert nll == pytest.approx(analytic, abs=1e-4)
    assert log_z == pytest.approx(math.log(2 * math.pi * S * S), abs=1e-4)


def test_module_energy_is_evaluated_in_eval_mode_and_restored():
    class Quad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = torch.nn.Parameter(M.clone())
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(((x - self.m) ** 2).sum(1, keepdim=True))[:, 0] / (2 * S * S)

    net = Quad().train()
    log_z = grid_log_z(net, (-5.0, 5.0), n=256)  # with dropout active this would be way off
    assert log_z == pytest.approx(math.log(2 * math.pi * S * S), abs=1e-3)
    assert net.training and net.drop.training
    net.drop.eval()  # a submodule deliberately in eval mode stays so
    grid_log_z(net, (-5.0, 5.0), n=64)
    assert net.training and not net.drop.training


def test_kde_log_prob_is_exact():
    g = torch.Generator().manual_seed(2)
    train, x = torch.randn(3000, 2, generator=g) * 2, torch.randn(100, 2, generator=g) * 2
    hs = torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64)
    d2 = ((x.double()[:, None] - train.double()[None]) ** 2).sum(-1)
    ref = torch.stack([torch.logsumexp(-d2 / (2 * h * h), 1) - math.log(3000) - torch.log(2 * math.pi * h * h)
                       for h in hs], 1)
    assert float((_kde_log_prob(x, train, hs) - ref).abs().max()) < 1e-9
    assert float((_kde_log_prob(x, train, hs, exp_dtype=torch.float32) - ref).abs().max()) < 1e-5
    # One training point: the KDE is a single Gaussian, so the NLL is analytic.
    out = kde_nll(torch.zeros(1, 2), x, x, bandwidths=[0.5])
    analytic = float((x.double() ** 2).sum(1).mean()) / (2 * 0.25) + math.log(2 * math.pi * 0.25)
    assert out["kde_nll"] == pytest.approx(analytic, abs=1e-9)


def test_kde_bandwidth_and_nll_on_8gaussians():
    s = make_splits("8gaussians", train=20000, val=2000, test=2000, seed=0)
    out = kde_nll(s["train"], s["val"], s["test"])
    assert out["kde_train_size"] == 20000 and out["kde_val_size"] == 2000
    # Component std is 0.354; a rule-of-thumb bandwidth for 2,500 points per component is ~0.1.
    assert 0.04 < out["kde_bandwidth"] < 0.25, out
    t = true_nll(get_toy("8gaussians"), s["test"])
    assert abs(out["kde_nll"] - t) < 0.1, (out, t)
    assert out["kde_nll"] > t - 0.02  # a KDE cannot beat the truth beyond sampling noise


def test_evaluate_toy_keys_and_pictures(tmp_path):
    d = get_toy("8gaussians")
    s = make_splits("8gaussians", train=3000, val=500, test=1000, seed=1)
    energy = lambda x: -d.log_prob(x).float()  # the true density as an energy: gap ~ 0
    r = evaluate_toy(energy, d, s, out_dir=str(tmp_path / "ev"), n_grid=256)
    for k in ("nll", "true_nll", "kde_nll", "gap", "log_z", "kde_bandwidth", "kde_train_size", "n_test", "grid"):
        assert k in r, k
    assert r["n_test"] == 1000 and r["grid"] == 256 and r["kde_train_size"] == 3000
    assert r["gap"] == pytest.approx(r["nll"] - r["true_nll"])
    assert abs(r["gap"]) < 1e-4 and abs(r["log_z"]) < 1e-4
    assert r["kde_nll"] > r["true_nll"]
    for f in ("density.png", "true_density.png"):
        data = (tmp_path / "ev" / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # A precomputed KDE result is reused, and a poor model gets a positive gap.
    wide = lambda x: (x ** 2).sum(1) / (2 * 3.0 ** 2)
    r2 = evaluate_toy(wide, d, s, kde={"kde_nll": 1.5, "kde_bandwidth": 0.1, "kde_train_size": 3000}, n_grid=128)
    assert r2["kde_nll"] == 1.5 and r2["gap"] > 0.5
