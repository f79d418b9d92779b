"""The estimators beyond PCD on analytic Gaussian models with closed forms, plus trainer smoke tests.

Gaussian energy E(x) = 1/2 (x - mu)^T P (x - mu): score s = -P (x - mu), Jacobian -P, so Hyvarinen's
objective on a sample is mean 1/2 ||P (x - mu)||^2 - tr P exactly.
"""
import copy
import math

import pytest
import torch
from torch import nn

from ebmscale.config import ConfigError, load_config
from ebmscale.models.samplers import CouplingFlow, NoisyGenerator
from ebmscale.objectives.adversarial import noisy_sampler_loss, noisy_score_estimate
from ebmscale.objectives.kl_tricks import kl_contraction_loss, mpf_loss
from ebmscale.objectives.ksd import ksd_u_statistic
from ebmscale.objectives.lsd import critic_loss, critic_trace
from ebmscale.objectives.nce import GaussianNoise, nce_loss
from ebmscale.objectives.score_matching import dsm_loss, exact_sm_loss, ssm_loss
from ebmscale.sampling import energy_and_grad
from ebmscale.trainer import Trainer


class GaussianEnergy(nn.Module):
    def __init__(self, mu: torch.Tensor, precision: torch.Tensor):
        super().__init__()
        self.mu = nn.Parameter(mu.clone().float())
        self.chol = nn.Parameter(torch.linalg.cholesky(precision.float()))  # P = L L^T

    @property
    def precision(self) -> torch.Tensor:
        return self.chol @ self.chol.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self.mu
        return 0.5 * ((d @ self.chol) ** 2).sum(1)

    def sm_closed_form(self, x: torch.Tensor) -> torch.Tensor:
        p = self.precision
        return 0.5 * (((x - self.mu) @ p) ** 2).sum(1).mean() - torch.trace(p)


def _model(d: int = 2, seed: int = 0) -> GaussianEnergy:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g)
    return GaussianEnergy(torch.randn(d, generator=g), a @ a.T + 0.5 * torch.eye(d))


def _data(n: int, d: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.8 * torch.randn(n, d, generator=g) + 0.3


@pytest.mark.parametrize("d", [2, 3])
def test_exact_sm_loss_equals_gaussian_closed_form_and_its_gradient(d):
    model, x = _model(d), _data(500, d)
    loss, stats = exact_sm_loss(model, x)
    closed = model.sm_closed_form(x)
    assert float(loss.detach()) == pytest.approx(float(closed.detach()), rel=1e-5, abs=1e-5)
    g1 = torch.autograd.grad(loss, list(model.parameters()))
    g2 = torch.autograd.grad(closed, list(model.parameters()))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert set(stats) >= {"loss", "e_pos"}


@pytest.mark.parametrize("vr", [True, False])
def test_sliced_sm_agrees_with_exact_sm_in_expectation(vr):
    model, x = _model(), _data(20000)
    exact = float(model.sm_closed_form(x).detach())
    loss, _ = ssm_loss(model, x, n_projections=4, variance_reduced=vr, generator=torch.Generator().manual_seed(2))
    assert float(loss.detach()) == pytest.approx(exact, abs=0.08)
    # And the parameter gradients agree in expectation too (they are what training uses).
    g_ssm = torch.autograd.grad(loss, [model.mu])[0]
    g_sm = torch.autograd.grad(model.sm_closed_form(x), [model.mu])[0]
    assert torch.allclose(g_ssm, g_sm, rtol=0.03, atol=0.1)


def test_variance_reduced_ssm_has_lower_variance():
    model, x = _model(), _data(256)
    est = {vr: torch.tensor([float(ssm_loss(model, x, 1, vr, torch.Generator().manual_seed(s))[0].detach()) for s in range(30)])
           for vr in (True, False)}
    assert est[True].std() < est[False].std()


@pytest.mark.parametrize("sigmas", [[0.3], [0.2, 0.4]])
def test_dsm_agrees_with_exact_sm_up_to_the_noise_bias(sigmas):
    """sigma^2-weighted DSM = sigma^2 (J + sigma^2 tr(P^2) / 2) + d / 2 in expectation, per level."""
    model, x = _model(), _data(200000)
    d, p = 2, model.precision.detach()
    exact = float(model.sm_closed_form(x).detach())
    loss, _ = dsm_loss(model, x, sigmas, torch.Generator().manual_seed(3))
    expect = sum(s ** 2 * (exact + 0.5 * s ** 2 * float(torch.trace(p @ p))) for s in sigmas) / len(sigmas) + d / 2
    assert float(loss) == pytest.approx(expect, abs=0.02)
    # The bias term is resolved: without it the figure would be off by far more than the tolerance.
    no_bias = sum(s ** 2 * exact for s in sigmas) / len(sigmas) + d / 2
    assert abs(float(loss) - no_bias) > 0.05


def test_nce_learns_the_true_log_z_of_a_gaussian():
    torch.manual_seed(0)
    m, s = torch.tensor([1.0, -0.5]), 0.5
    model = _model()  # wrong mean and precision to start with
    log_z = nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam([*model.parameters(), log_z], lr=0.05)
    g = torch.Generator().manual_seed(4)
    noise = GaussianNoise.fit(m + s * torch.randn(4000, 2, generator=g), scale=1.5)
    for _ in range(300):
        x = m + s * torch.randn(512, 2, generator=g)
        y = noise.sample(2048, g)
        e = model(torch.cat([x, y]))
        loss, stats = nce_loss(e[:512], e[512:], noise.log_prob(x), noise.log_prob(y), log_z, 4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    true_log_z = math.log(2 * math.pi * s ** 2)  # of E = |x - m|^2 / (2 s^2)
    model_log_z = float(math.log(2 * math.pi) - 0.5 * torch.logdet(model.precision.detach()))
    assert float(log_z) == pytest.approx(true_log_z, abs=0.06)
    assert float(log_z) == pytest.approx(model_log_z, abs=0.06)
    assert torch.allclose(model.mu.detach(), m, atol=0.06)


def test_ksd_is_near_zero_for_model_samples_and_grows_with_a_mean_shift():
    model = GaussianEnergy(torch.zeros(2), torch.eye(2))
    g = torch.Generator().manual_seed(5)
    values = []
    for shift in (0.0, 0.5, 1.0):
        x = torch.randn(1000, 2, generator=g) + shift
        score = -(x - model.mu.detach()) @ model.precision.detach()
        values.append(float(ksd_u_statistic(x, score, 1.0)))
    assert abs(values[0]) < 0.01
    assert values[1] > 0.05 and values[2] > 2.5 * values[1]


def test_ksd_u_statistic_matches_autograd_kernel_derivatives():
    g = torch.Generator().manual_seed(6)
    x, s, h = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64), 0.7

    def k(a, b):
        return torch.exp(-((a - b) ** 2).sum() / (2 * h * h))

    total = 0.0
    for i in range(5):
        for j in range(5):
            if i == j:
                continue
            a, b = x[i].clone().requires_grad_(True), x[j].clone().requires_grad_(True)
            kv = k(a, b)
            ga, gb = torch.autograd.grad(kv, (a, b), create_graph=True)
            trace = sum(torch.autograd.grad(ga[c], b, retain_graph=True)[0][c] for c in range(2))
            total += float(s[i] @ s[j] * kv + s[i] @ gb + ga @ s[j] + trace)
    ref = total / 20
    got = float(ksd_u_statistic(x.float(), s.float(), h))
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_noisy_sampler_score_and_entropy_gradient_match_a_linear_gaussian():
    """g(z) = A z + b gives q = N(b, A A^T + sigma^2 I): exact score and dH/dA = Sigma^-1 A."""
    gen = NoisyGenerator(2, latent_dim=2, depth=0, sigma=0.5)
    with torch.no_grad():
        gen.g[0].weight.copy_(torch.tensor([[1.0, 0.3], [0.0, 0.6]]))
        gen.g[0].bias.copy_(torch.tensor([0.5, -1.0]))
    a, b = gen.g[0].weight.detach(), gen.g[0].bias.detach()
    cov = a @ a.T + 0.25 * torch.eye(2)
    draw = gen.sample(3000, torch.Generator().manual_seed(7))
    score = noisy_score_estimate(gen, draw["x"], draw["mean"])
    exact = -(draw["x"].detach() - b) @ torch.linalg.inv(cov)
    assert (score - exact).norm(dim=1).mean() < 0.15 * exact.norm(dim=1).mean()
    loss, _ = noisy_sampler_loss(gen, draw, torch.zeros(3000), entropy_weight=1.0)
    (grad_a,) = torch.autograd.grad(loss, [gen.g[0].weight])
    assert torch.allclose(-grad_a, torch.linalg.inv(cov) @ a, atol=0.08)  # -d(-H)/dA = dH/dA


def test_flow_log_density_is_exact_and_normalised():
    torch.manual_seed(0)
    flow = CouplingFlow(2, layers=4, width=16, depth=1)
    with torch.no_grad():  # leave the identity start so the check is not trivial
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    draw = flow.sample(64, torch.Generator().manual_seed(8))
    assert torch.allclose(flow.log_prob(draw["x"].detach()), draw["log_q"].detach(), atol=1e-4)
    n, lo, hi = 400, -12.0, 12.0
    c = torch.linspace(lo, hi, n + 1)[:-1] + (hi - lo) / (2 * n)
    grid = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = float(torch.exp(flow.log_prob(grid)).sum() * ((hi - lo) / n) ** 2)
    assert mass == pytest.approx(1.0, abs=0.01)


def _fit_gaussian(loss_fn, steps: int = 300, seed: int = 2):
    """Adam from N(0, I) on ``loss_fn(model, normal)``; returns (fitted model, data, sample mean,
    sample precision). Data: 1,500 draws of a correlated 2-D Gaussian."""
    mu, cov = torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.5], [0.5, 0.8]])
    x = torch.randn(1500, 2, generator=torch.Generator().manual_seed(1)) @ torch.linalg.cholesky(cov).T + mu
    model = GaussianEnergy(torch.zeros(2), torch.eye(2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    for it in range(steps):
        if it == 2 * steps // 3:
            for group in opt.param_groups:
                group["lr"] = 0.01
        loss, _ = loss_fn(model, x, lambda shape: torch.randn(shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x.mean(0), torch.linalg.inv(torch.cov(x.T))


def _assert_recovers(model, mean, precision, rel):
    assert torch.allclose(model.mu.detach(), mean, atol=0.05), (model.mu, mean)
    err = (model.precision.detach() - precision).norm() / precision.norm()
    assert err < rel, (model.precision, precision)


def test_mpf_recovers_a_gaussian_energy():
    """Minimum probability flow (MALA connectivity, eps = 0.5) from N(0, I) to the data's
    Gaussian: mean and precision match the sample's (the MLE) to Monte-Carlo accuracy."""
    model, mean, precision = _fit_gaussian(lambda m, x, normal: mpf_loss(m, lambda z: energy_and_grad(m, z), x, 0.5,
                                                                         normal))
    _assert_recovers(model, mean, precision, rel=0.05)


def test_mpf_gradient_vanishes_in_expectation_at_the_true_model():
    """Consistency at finite eps: with data drawn from the model itself, the expected gradient of
    the flow is zero (weighted pairs are exchangeable), while a shifted model gets a clear one."""
    model = GaussianEnergy(torch.tensor([0.5, 0.0]), torch.tensor([[2.0, 0.3], [0.3, 1.0]]))
    cov = torch.linalg.inv(model.precision.detach())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g) @ torch.linalg.cholesky(cov).T + model.mu.detach()

    def grad_at(m):
        loss, _ = mpf_loss(m, lambda z: energy_and_grad(m, z), x, 0.8, lambda s: torch.randn(s, generator=g))
        return torch.autograd.grad(loss, m.mu)[0]

    # Monte-Carlo noise of the mean gradient at n = 20,000 is about 0.01; the shift gives about 0.25.
    shifted = GaussianEnergy(torch.tensor([0.8, 0.0]), model.precision.detach())
    assert grad_at(shifted)[0] > 0.2
    assert grad_at(model).abs().max() < 0.03


def test_kl_contraction_recovers_a_gaussian_energy():
    """Minimum KL contraction (Gaussian smoothing sigma = 0.5, M = 32 inner draws) from N(0, I):
    mean and precision match the sample's up to the O(1/M) log-mean-exp bias."""
    model, mean, precision = _fit_gaussian(lambda m, x, normal: kl_contraction_loss(m, x, 0.5, 32, normal))
    _assert_recovers(model, mean, precision, rel=0.1)


def _fit_linear_critic(model: GaussianEnergy, x: torch.Tensor, l2: float, steps: int = 400) -> tuple[nn.Linear, float]:
    """Train a linear critic f(x) = A x + b with the LSD critic loss on ``x``; return it and the
    penalised discrepancy it reaches (over the whole sample)."""
    critic = nn.Linear(2, 2)
    nn.init.zeros_(critic.weight)
    nn.init.zeros_(critic.bias)
    opt = torch.optim.Adam(critic.parameters(), lr=0.05)
    score = -energy_and_grad(model, x)[1]
    for it in range(steps):
        if it == steps // 2:
            for group in opt.param_groups:
                group["lr"] = 0.01
        loss, stats = critic_loss(critic, x, score, l2, exact_trace=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return critic, float(stats["lsd"])


def test_lsd_critic_optimum_is_the_closed_form_stein_direction():
    """Data N(mu_D, Sigma_D), model N(mu, P^-1): the critic's maximiser of S - lambda E||f||^2 is
    f* = (s_model - s_data) / (2 lambda), linear: A* = (P_D - P) / (2 lambda), b* = (P mu - P_D mu_D) / (2 lambda),
    and the maximum is the Fisher divergence / (4 lambda). Tested with the sample's own Gaussian as
    the data score (Stein's identity holds exactly for the sample's moments)."""
    lam = 0.5
    model = GaussianEnergy(torch.tensor([0.5, 0.0]), torch.tensor([[2.0, 0.3], [0.3, 1.0]]))
    mu_d, cov_d = torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.5], [0.5, 0.8]])
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0)) @ torch.linalg.cholesky(cov_d).T + mu_d
    m, p_d = x.mean(0), torch.linalg.inv(torch.cov(x.T, correction=0))
    p, mu = model.precision.detach(), model.mu.detach()
    critic, value = _fit_linear_critic(model, x, lam, steps=300)
    a_star, b_star = (p_d - p) / (2 * lam), (p @ mu - p_d @ m) / (2 * lam)
    assert torch.allclose(critic.weight.detach(), a_star, atol=0.02), (critic.weight, a_star)
    assert torch.allclose(critic.bias.detach(), b_star, atol=0.02), (critic.bias, b_star)
    assert value == pytest.approx(_sample_fisher(model, x) / (4 * lam), rel=0.02)


def _sample_fisher(model: GaussianEnergy, x: torch.Tensor) -> float:
    """E_x ||s_model - s_D||^2 with s_D the score of the sample's own Gaussian (its moments)."""
    m, p_d = x.mean(0), torch.linalg.inv(torch.cov(x.T, correction=0))
    s_diff = -(x - model.mu.detach()) @ model.precision.detach() + (x - m) @ p_d
    return float((s_diff ** 2).sum(1).mean())


def test_lsd_is_near_zero_on_model_samples_and_grows_with_a_mean_shift():
    model = GaussianEnergy(torch.zeros(2), torch.tensor([[2.0, 0.3], [0.3, 1.0]]))
    cov = torch.linalg.inv(model.precision.detach())
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(3)) @ torch.linalg.cholesky(cov).T
    samples = [z + torch.tensor([shift, 0.0]) for shift in (0.0, 0.5, 1.0)]
    values = [_fit_linear_critic(model, x, 0.5, steps=300)[1] for x in samples]
    assert abs(values[0]) < 0.02
    # A shift delta has Fisher divergence ||P delta||^2 in expectation (LSD = that / (4 lambda)); on
    # the finite sample the closed form uses the sample's own Gaussian.
    for x, v in zip(samples[1:], values[1:]):
        assert v == pytest.approx(_sample_fisher(model, x) / 2, rel=0.05), v
    assert values[0] < 0.05 * values[1] and values[1] < values[2]


def test_lsd_hutchinson_trace_is_unbiased():
    """Each point repeated 4,000 times: the mean of its Rademacher probes converges to the exact trace."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 6))
    x = torch.randn(4, 6).repeat_interleave(4000, 0).requires_grad_(True)
    f = net(x)
    exact = critic_trace(f, x, exact=True).detach().view(4, 4000)[:, 0]
    g = torch.Generator().manual_seed(1)
    est = critic_trace(f, x, exact=False, normal=lambda s: torch.randn(s, generator=g)).detach().view(4, 4000).mean(1)
    assert torch.allclose(est, exact, atol=0.05 * float(exact.abs().max()) + 0.02), (est, exact)


# ---------------------------------------------------------------------------------- trainer

SMALL = ["data.dataset=8gaussians", "model.arch=mlp", "model.width=16", "model.depth=2", "data.batch_size=32",
         "sampler.kind=langevin", "sampler.steps=2", "sampler.step_size=0.1", "sampler.grad_clip=0",
         "train.progress=false", "train.tensorboard=false", "data.toy_train_size=256"]
KINDS = [("cd", ["objective.cd_steps=2"]), ("sm", []), ("dsm", ["objective.dsm_sigmas=[0.1, 0.3]"]),
         ("ssm", ["objective.ssm_projections=2"]), ("nce", ["objective.nce_noise_ratio=2"]),
         ("nce", ["objective.nce_noise=uniform"]), ("adversarial", ["objective.refine_steps=1"]),
         ("adversarial", ["objective.sampler=flow", "objective.flow_layers=2"]), ("ksd", []),
         ("mpf", ["objective.mpf_step=0.2"]), ("kl_contraction", ["objective.kl_contraction_samples=4"]),
         ("lsd", ["objective.lsd_critic_steps=2"])]
EXTRA_STATE = ("nce", "adversarial", "lsd")


@pytest.mark.parametrize("kind,extra", KINDS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(KINDS)])
def test_trainer_runs_each_kind_and_resumes_exactly(tmp_path, kind, extra):
    cfg = load_config(None, [*SMALL, f"objective.kind={kind}", *extra])
    a = Trainer(cfg, str(tmp_path / "a"))
    p0 = [p.detach().clone() for p in a.model.parameters()]
    out = [a.train_step() for _ in range(2)]
    assert all(math.isfinite(o["loss"]) for o in out)
    assert any(not torch.equal(p, q) for p, q in zip(p0, a.model.parameters()))
    assert a.buffer.capacity == 1  # no persistent chains for these estimators
    state = copy.deepcopy(a.state_dict())  # a keeps training: no aliasing of its live tensors
    assert (state["objective"] != {}) == (kind in EXTRA_STATE)
    b = Trainer(cfg, str(tmp_path / "b"))
    b.load_state_dict(state)
    ra, rb = a.train_step(), b.train_step()
    assert ra["loss"] == rb["loss"]
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    if kind in EXTRA_STATE:
        for p, q in zip(a.estimator.state_dict().values(), b.estimator.state_dict().values()):
            if isinstance(p, torch.Tensor):
                assert torch.equal(p, q)
    if kind == "lsd":
        for p, q in zip(a.estimator.critic.parameters(), b.estimator.critic.parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("override,key", [
    (["objective.kind=sm", "data.dataset=digits", "model.arch=cnn"], "objective.kind=sm"),
    (["objective.kind=dsm", "objective.dsm_sigmas=[]"], "objective.dsm_sigmas"),
    (["objective.kind=nce", "train.precision=fp16"], "train.precision"),
    (["objective.kind=ssm", "train.distributed=deepspeed"], "train.distributed"),
    (["objective.kind=adversarial", "objective.sampler=gan"], "objective.sampler"),
    (["objective.kind=mpf", "objective.mpf_step=0"], "objective.mpf_step"),
    (["objective.kind=kl_contraction", "objective.kl_contraction_samples=0"], "objective.kl_contraction_samples"),
    (["objective.kind=kl_contraction", "objective.kl_contraction_sigma=-1"], "objective.kl_contraction_sigma"),
    (["objective.kind=lsd", "data.dataset=digits", "model.arch=igebm"], "model.arch"),
    (["objective.kind=lsd", "objective.lsd_trace=sliced"], "objective.lsd_trace"),
])
def test_estimator_config_errors_name_the_key(override, key):
    base = ["data.dataset=8gaussians", "model.arch=mlp"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [*base, *override])


def test_benchmark_recipes_differ_from_pcd_only_in_the_estimator():
    """benchmarks/estimators.py compares estimators on equal terms: same network, data and optimiser
    (batch size and learning rate are each recipe's own)."""
    import os

    from benchmarks.estimators import ESTIMATORS

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    ref = load_config(os.path.join(root, ESTIMATORS["pcd"]))
    kinds = set()
    for name, recipe in ESTIMATORS.items():
        cfg = load_config(os.path.join(root, recipe))
        assert cfg.model == ref.model, name
        assert (cfg.data.dataset, cfg.data.toy_train_size) == (ref.data.dataset, ref.data.toy_train_size), name
        assert (cfg.optim.name, cfg.optim.betas, cfg.optim.ema) == (ref.optim.name, ref.optim.betas, ref.optim.ema), name
        assert cfg.train.threads == 1, name
        kinds.add(cfg.objective.kind)
    assert kinds == {"pcd", "cd", "sm", "dsm", "ssm", "nce", "adversarial", "ksd", "mpf", "kl_contraction", "lsd"}


def test_lsd_on_images_uses_hutchinson_and_the_factory_critic(tmp_path):
    """Images: the critic is the model factory's CNN with a d-way head, the trace Hutchinson's."""
    cfg = load_config(None, ["data.dataset=digits", "model.arch=cnn", "model.width=4", "model.depth=2",
                             "data.batch_size=8", "objective.kind=lsd", "objective.lsd_critic_steps=1",
                             "train.precision=fp32", "train.progress=false", "train.tensorboard=false"])
    tr = Trainer(cfg, str(tmp_path / "run"))
    assert not tr.estimator.exact_trace and tr.estimator.critic.head.out_features == 64
    stats = tr.train_step()
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["lsd"])


def test_unet_critic_finds_the_stein_direction_of_an_image_gaussian():
    """Images 1x8x8 from N(0, I), model N(mu, I) with mu a pattern: the optimal critic is the
    constant field f* = (s_model - s_data) / (2 lambda) = mu / (2 lambda), of full rank (a d-way head
    on 4*width features could not reach a general mu at width < d/4), and the penalised maximum is
    the Fisher divergence ||mu||^2 / (4 lambda). The U-Net field gets both from Hutchinson traces."""
    from ebmscale.models.critic import UNetField

    torch.manual_seed(0)
    lam, shape = 0.5, (1, 8, 8)
    mu = torch.randn(shape) * 0.5
    x = torch.randn(2048, *shape)
    score = -(x - mu)  # the model's score, held fixed
    critic = UNetField(1, width=8)
    assert float(critic(x).detach().abs().max()) == 0.0  # starts at f = 0
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    values = []
    for it in range(200):
        batch = torch.randint(0, len(x), (128,), generator=g)
        loss, stats = critic_loss(lambda z: critic(z), x[batch], score[batch], lam, exact_trace=False,
                                  normal=lambda s: torch.randn(s, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(float(stats["lsd"]))
    with torch.no_grad():
        f = critic(x[:512]).mean(0)
    target = mu / (2 * lam)
    cos = float((f * target).sum() / (f.norm() * target.norm()))
    assert cos > 0.95 and float(f.norm() / target.norm()) == pytest.approx(1.0, abs=0.15), (cos, f.norm(), target.norm())
    fisher = float((mu ** 2).sum())
    assert sum(values[-100:]) / 100 == pytest.approx(fisher / (4 * lam), rel=0.15)


def test_lsd_unet_critic_trains_an_image_energy(tmp_path):
    """objective.lsd_critic=unet: the critic is a per-pixel field of the data's shape (any model.arch,
    IGEBM's included), its state saved with the run; several noise scales per batch work with it."""
    from ebmscale.models.critic import UNetField

    cfg = load_config(None, ["data.dataset=digits", "model.arch=igebm", "model.width=4", "data.batch_size=8",
                             "objective.kind=lsd", "objective.lsd_critic=unet", "objective.lsd_critic_steps=1",
                             "data.noise_std=0.1", "data.noise_std_max=1.0", "train.precision=fp32",
                             "train.progress=false", "train.tensorboard=false"])
    tr = Trainer(cfg, str(tmp_path / "run"))
    assert isinstance(tr.estimator.critic, UNetField) and tr.estimator.critic.out.out_channels == 1
    for _ in range(2):
        stats = tr.train_step()
    assert math.isfinite(stats["loss"]) and stats["lsd"] > 0
    assert any(k.startswith("out.") for k in tr.estimator.state_dict()["critic"])


def test_lsd_critic_choice_is_checked():
    with pytest.raises(ConfigError, match="objective.lsd_critic=unet"):
        load_config(None, ["objective.kind=lsd", "objective.lsd_critic=unet", "data.dataset=8gaussians",
                           "model.arch=mlp"])
    with pytest.raises(ConfigError, match="model.arch=igebm cannot take one"):
        load_config(None, ["objective.kind=lsd", "model.arch=igebm"])


def test_lsd_critic_activation_is_its_own(tmp_path):
    """objective.lsd_critic_activation sets the critic's nonlinearity only; '' keeps the model's."""
    from ebmscale.models.common import Swish

    base = ["data.dataset=8gaussians", "model.arch=mlp", "objective.kind=lsd", "train.precision=fp32", "train.progress=false",
            "train.tensorboard=false"]
    for i, (extra, critic_act) in enumerate((([], Swish), (["objective.lsd_critic_activation=leaky_relu"], nn.LeakyReLU))):
        tr = Trainer(load_config(None, base + extra), str(tmp_path / f"run{i}"))
        acts = lambda m: {type(x) for x in m.modules() if isinstance(x, (Swish, nn.LeakyReLU))}  # noqa: E731
        assert acts(tr.estimator.critic) == {critic_act} and acts(tr.model) == {Swish}


# ---------------------------------------------------------------------------------- improved CD

class Gaussian1D(nn.Module):
    def __init__(self, mu: float, log_s: float):
        super().__init__()
        self.mu, self.log_s = nn.Parameter(torch.tensor(mu)), nn.Parameter(torch.tensor(log_s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x[:, 0] - self.mu) / self.log_s.exp()) ** 2


def test_improved_cd_kl_gradient_matches_a_finite_difference():
    """L(theta) = mean E_frozen(x~(theta)) with x~ = x' - a dE_theta/dx(x') + sigma z: the
    surrogate's autograd gradient equals the central difference of L in each parameter, with the
    evaluating energy held at the unperturbed theta."""
    from ebmscale.objectives.improved_cd import differentiable_step, kl_surrogate

    g = torch.Generator().manual_seed(0)
    x_prev = torch.randn(64, 1, generator=g, dtype=torch.float64) * 1.5 + 0.3
    noise = torch.randn(64, 1, generator=g, dtype=torch.float64)
    model = Gaussian1D(0.2, -0.1).double()
    frozen = Gaussian1D(0.2, -0.1).double().requires_grad_(False)
    a, sigma = 0.05, math.sqrt(0.1)

    def value(m):
        x_t = differentiable_step(m, x_prev, a, sigma, noise)
        return float(frozen(x_t.detach()).mean())

    x_t = differentiable_step(model, x_prev, a, sigma, noise)
    _, grad_frozen = energy_and_grad(frozen, x_t.detach())
    grads = torch.autograd.grad(kl_surrogate(x_t, grad_frozen.double()), [model.mu, model.log_s])
    h = 1e-5
    for i, name in enumerate(("mu", "log_s")):
        plus, minus = Gaussian1D(0.2, -0.1).double(), Gaussian1D(0.2, -0.1).double()
        with torch.no_grad():
            getattr(plus, name).add_(h)
            getattr(minus, name).sub_(h)
        fd = (value(plus) - value(minus)) / (2 * h)
        assert float(grads[i]) == pytest.approx(fd, rel=1e-5, abs=1e-9), (name, float(grads[i]), fd)
    assert abs(float(grads[0])) > 1e-3 and abs(float(grads[1])) > 1e-3


def test_improved_cd_entropy_is_larger_for_spread_chains():
    from ebmscale.objectives.improved_cd import nn_entropy

    g = torch.Generator().manual_seed(0)
    past = torch.randn(200, 2, generator=g)
    narrow, wide = 0.1 * torch.randn(100, 2, generator=g), torch.randn(100, 2, generator=g)
    assert float(nn_entropy(wide, past)) > float(nn_entropy(narrow, past))


@pytest.mark.parametrize("extra", [(), ("objective.entropy_weight=0",)])
def test_pcd_with_kl_and_entropy_terms_trains_and_resumes_exactly(tmp_path, extra):
    base = [*SMALL, "objective.kind=pcd", "objective.kl_weight=1", "objective.entropy_batch=16",
            "buffer.capacity=64", "buffer.backend=local", "train.precision=fp32", *extra]
    cfg = load_config(None, base)
    a = Trainer(cfg, str(tmp_path / "a"))
    before = a.buffer.data.copy()
    out = a.train_step()
    assert math.isfinite(out["loss"]) and math.isfinite(out["kl_energy"])
    assert ("entropy" in out) == (not extra)
    assert not (a.buffer.data == before).all()  # the chains (after the differentiable last step) are written back
    state = copy.deepcopy(a.state_dict())
    b = Trainer(cfg, str(tmp_path / "b"))
    b.load_state_dict(state)
    ra, rb = a.train_step(), b.train_step()
    assert ra["loss"] == rb["loss"] and ra["kl_energy"] == rb["kl_energy"]
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    # The KL term changes the update: the same step without it moves the parameters differently.
    c = Trainer(load_config(None, [*base, "objective.kl_weight=0"]), str(tmp_path / "c"))
    c.load_state_dict(state)
    c.train_step()
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))


@pytest.mark.parametrize("override,key", [
    (["objective.kind=cd", "objective.kl_weight=1"], "objective.kl_weight"),
    (["objective.kl_weight=1", "sampler.kind=mala", "sampler.noise_std=0"], "objective.kl_weight"),
    (["objective.kl_weight=1", "sampler.init=noise"], "sampler.init"),
])
def test_improved_cd_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["data.dataset=8gaussians", "model.arch=mlp", *override])
