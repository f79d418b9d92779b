"""Noise-conditional energies E(x, sigma) = E(x) / sigma: denoising score matching and LSD that train
them, the annealed Langevin sampler that samples them, and their config rules.

Analytic model: data at a single point mu in d dimensions and the energy E(x) = a ||x - b||. At
b = mu its score at level sigma, -a u / sigma (u the unit vector from mu), matches the smoothed
data's, -(x - mu) / sigma^2, on the shell ||x - mu|| = sigma ||eps||; the best a over every level
at once is a* = E||eps|| = sqrt(2) Gamma((d + 1) / 2) / Gamma(d / 2), whatever the noise range.
"""
import math

import pytest
import torch
from torch import nn

from ebmscale.config import ConfigError, load_config
from ebmscale.objectives.lsd import critic_loss, model_loss, skip_critic
from ebmscale.objectives.score_matching import dsm_loss, log_uniform_sigmas
from ebmscale.sampling import LangevinSettings, langevin
from ebmscale.sampling.annealed import noise_levels
from ebmscale.trainer import Trainer

D = 32
A_STAR = math.sqrt(2) * math.exp(math.lgamma((D + 1) / 2) - math.lgamma(D / 2))


class RadialEnergy(nn.Module):
    """E(x) = a ||x - b||."""

    def __init__(self, a: float, b: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * (x - self.b).norm(dim=1)


def _mu() -> torch.Tensor:
    return torch.linspace(-0.5, 0.5, D)


def test_annealed_langevin_walks_down_the_noise_levels_and_denoises():
    """The exact noise-conditional energy of a point mass (a = sqrt(d), b = mu): at every level the
    chains sit on the shell of radius sigma sqrt(d) around mu, and the denoising step brings them
    to mu. A sampler that forgot the 1 / sigma_i (or the alpha_i scaling) misses the shells."""
    mu = _mu()
    model = RadialEnergy(math.sqrt(D), mu)
    st = LangevinSettings(kind="annealed", steps=40, step_size=0.2, levels=8, sigma_min=0.05,
                          sigma_max=2.0, clamp=(-1.0, 1.0))
    trajectory: list = []
    with torch.no_grad():
        x = langevin(model, torch.rand(256, D) * 2 - 1, st, torch.Generator().manual_seed(0), trajectory=trajectory)
    levels = noise_levels(st)
    assert len(levels) == 8 and levels[0] == pytest.approx(2.0) and levels[-1] == pytest.approx(0.05)
    assert len(trajectory) == 8 * 40
    for i, sigma in enumerate(levels):
        radius = float((trajectory[(i + 1) * 40 - 1] - mu).norm(dim=1).mean()) / math.sqrt(D)
        # 15%: unadjusted Langevin's step-size bias (about +8% at alpha_i / sigma_i^2 = 0.2).
        assert radius == pytest.approx(sigma, rel=0.15), (sigma, radius)
    assert float((x - mu).norm(dim=1).mean()) / math.sqrt(D) < 0.01
    assert float(x.abs().max()) <= 1.0  # the final samples are clamped to the data range


def test_noise_conditional_dsm_recovers_the_radial_energy():
    mu = _mu()
    model = RadialEnergy(1.0, torch.zeros(D))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        loss, _ = dsm_loss(model, mu.expand(256, D), [], g, sigma_range=(0.05, 2.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(model.a.detach()) == pytest.approx(A_STAR, rel=0.03)
    assert float((model.b.detach() - mu).abs().max()) < 0.05


class RadialCritic(nn.Module):
    """g(x) = c (x - mu) / ||x - mu||: holds the optimal critic of the radial model at b = mu,
    sigma (s_theta - s_D) / (2 lambda) = u (||eps|| - a) / (2 lambda), up to ||eps||'s spread."""

    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(0.0))
        self.mu = mu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x - self.mu
        return self.c * v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("trace", ["hutchinson", "denoising", "denoising-skip"])
def test_noise_conditional_lsd_calibrates_the_radial_energy_across_levels(trace):
    """The estimator's noise-conditional step on the analytic pair (centre known, b = mu): data
    smoothed at log-uniform sigma, the critic's Stein term weighted by sigma against the score
    -grad E / sigma (Hutchinson's trace, or none: the denoising identity with the noise's score
    -eps / sigma), the model's loss -grad E^T g. The scale a converges to a*, the one that fits
    every level at once, and the critic to zero; with the skip (g = (u - grad E) / (2 lambda)) the
    network u = c (x - mu) / ||x - mu|| learns E[eps | x~], so c goes to a* too. (The centre itself is
    learnt in the DSM test; a minimax over it with Adam wanders once the critic is ~0.)"""
    mu = _mu()
    model, critic = RadialEnergy(1.0, mu), RadialCritic(mu)
    model.b.requires_grad_(False)
    opt = torch.optim.Adam([model.a], lr=0.02)
    c_opt = torch.optim.Adam(critic.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    normal = lambda s: torch.randn(s, generator=g)  # noqa: E731
    a_seen, c_seen = [], []
    for _ in range(600):
        sig = log_uniform_sigmas(torch.rand(256, generator=g), (0.05, 2.0))
        eps = normal((256, D))
        x = mu + sig[:, None] * eps
        kernel_score = -eps / sig[:, None] if trace.startswith("denoising") else None
        z = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(z).sum(), z)
        g_fn = skip_critic(critic, grad, 0.5) if trace.endswith("skip") else critic
        for _ in range(2):
            c_loss, _ = critic_loss(g_fn, x, -grad / sig[:, None], 0.5, exact_trace=False, normal=normal,
                                    weight=sig, kernel_score=kernel_score)
            c_opt.zero_grad()
            c_loss.backward()
            c_opt.step()
        with torch.no_grad():
            f = g_fn(x)
        loss, _ = model_loss(model, f, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        a_seen.append(float(model.a.detach()))
        c_seen.append(float(critic.c.detach()))
    assert sum(a_seen[-100:]) / 100 == pytest.approx(A_STAR, rel=0.03)
    if trace.endswith("skip"):
        assert sum(c_seen[-100:]) / 100 == pytest.approx(A_STAR, rel=0.05)
    else:
        assert abs(sum(c_seen[-100:]) / 100) < 0.3
    assert c_seen[0] > 0.0  # at a = 1 < a* the critic first points outwards: the model is too narrow


def test_denoising_identity_estimates_the_critics_trace():
    """For noised data x~ = x + sigma eps, E[(eps / sigma)^T f(x~)] = E[tr df/dx~] (Stein's identity
    for the smoothed data with Vincent's): on a linear critic f = A x + c, whose trace is tr A
    exactly, the denoising Stein term and the exact one agree within Monte-Carlo error, per level."""
    g = torch.Generator().manual_seed(3)
    d, n = 8, 200_000
    lin = nn.Linear(d, d)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d, d, generator=g) + 2 * torch.eye(d))
    clean = torch.rand(n, d, generator=g) * 2 - 1
    score = torch.zeros(n, d)  # the model's part of the Stein term is the same in both estimators
    for sigma in (0.1, 1.0):
        eps = torch.randn(n, d, generator=g)
        x = clean + sigma * eps
        _, exact = critic_loss(lin, x, score, 1e-9, exact_trace=True)
        _, den = critic_loss(lin, x, score, 1e-9, exact_trace=False, kernel_score=-eps / sigma)
        spread = float(((eps / sigma) * lin(x)).sum(1).std()) / math.sqrt(n)
        assert float(exact["lsd_stein"]) == pytest.approx(float(lin.weight.trace()), rel=1e-5)
        assert abs(float(den["lsd_stein"]) - float(exact["lsd_stein"])) < 4 * spread


TINY = ["data.dataset=digits", "model.arch=cnn", "model.width=4", "model.depth=2", "data.batch_size=8",
        "data.noise_std=0", "objective.noise_conditional=true", "objective.sigma_min=0.05",
        "objective.sigma_max=2", "sampler.kind=annealed", "sampler.steps=2", "sampler.levels=3",
        "sampler.step_size=0.2", "sampler.grad_clip=0", "train.precision=fp32", "train.progress=false",
        "train.tensorboard=false"]


@pytest.mark.parametrize("extra", [["objective.kind=dsm"],
                                   ["objective.kind=lsd", "objective.lsd_critic=unet", "objective.lsd_critic_steps=1"],
                                   ["objective.kind=lsd", "objective.lsd_critic=unet", "objective.lsd_critic_steps=1",
                                    "objective.lsd_trace=denoising"],
                                   ["objective.kind=lsd", "objective.lsd_critic=unet", "objective.lsd_critic_steps=1",
                                    "objective.lsd_trace=denoising", "objective.lsd_critic_skip=true"]],
                         ids=["dsm", "lsd", "lsd-denoising", "lsd-skip"])
def test_trainer_trains_a_noise_conditional_image_energy_and_resumes_exactly(tmp_path, extra):
    import copy

    cfg = load_config(None, [*TINY, *extra])
    a = Trainer(cfg, str(tmp_path / "a"))
    for _ in range(2):
        stats = a.train_step()
    assert math.isfinite(stats["loss"]) and math.isfinite(stats.get("lsd", 0.0))
    # A critic without the skip starts at 0 and its first steps find a positive value; with it, the
    # value starts at Fisher - E||u - E[eps | x~]||^2 scaled, which can be below 0 while u is untrained.
    assert extra[0].endswith("dsm") or "objective.lsd_critic_skip=true" in extra or stats["lsd"] > 0
    state = copy.deepcopy(a.state_dict())
    b = Trainer(cfg, str(tmp_path / "b"))
    b.load_state_dict(state)
    assert a.train_step()["loss"] == b.train_step()["loss"]
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("extra", [["objective.kind=dsm"],
                                   ["objective.kind=lsd", "objective.lsd_critic=unet", "objective.lsd_critic_steps=1"],
                                   ["objective.kind=lsd", "objective.lsd_critic=unet", "objective.lsd_critic_steps=1",
                                    "objective.lsd_trace=denoising", "objective.lsd_critic_skip=true"]],
                         ids=["dsm", "lsd", "lsd-skip"])
def test_noise_conditional_image_energies_train_with_bf16_forced(tmp_path, extra):
    """The bf16 path (train.precision=auto on bf16 GPUs and AMX CPUs), forced whatever this CPU has:
    the precision canary passes and loss, LSD value and gradient norm stay finite."""
    cfg = load_config(None, [*TINY, *extra, "train.precision=bf16"])
    tr = Trainer(cfg, str(tmp_path / "run"))
    for _ in range(2):
        stats = tr.train_step()
        assert math.isfinite(stats["loss"]) and math.isfinite(stats.get("lsd", 0.0))
        assert stats["grad_norm"] is not None and math.isfinite(stats["grad_norm"])
    assert tr.precision_checked and tr.runtime.precision == "bf16"


def test_sample_command_runs_the_annealed_sampler_of_a_noise_conditional_run(tmp_path, capsys):
    import json

    import numpy as np

    from ebmscale.cli import main
    from ebmscale.trainer import train

    run = tmp_path / "run"
    train(load_config(None, [*TINY, "objective.kind=dsm", "train.steps=2"]), run_dir=str(run))
    assert main(["sample", "--checkpoint", str(run), "--n", "6", "--out", str(tmp_path / "s")]) == 0
    with np.load(tmp_path / "s" / "samples.npz") as f:
        x = next(iter(f.values()))
    assert len(x) == 6 and (tmp_path / "s" / "samples.png").stat().st_size > 100
    # The ladder from the command line: a one-level ladder at sigma_min = 2 without steps is just
    # the denoising step from uniform noise, x - 2 grad E(x), so changing it changes the samples.
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(run), "--n", "6", "--out", str(tmp_path / "t"), "--sampler", "levels=1",
                 "--sampler", "sampler.sigma_min=2", "--steps", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sampler_overrides"] == [
        "sampler.levels=1", "sampler.sigma_min=2"]
    with np.load(tmp_path / "t" / "samples.npz") as f:
        assert not np.array_equal(next(iter(f.values())), x)
    # A bad override is one line naming the key, exit 2, as in a config file.
    assert main(["sample", "--checkpoint", str(run), "--sampler", "levels=0", "--out", str(tmp_path / "u")]) == 2
    assert "sampler.levels" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize("override,key", [
    (["objective.kind=pcd", "objective.noise_conditional=true"], "objective.noise_conditional"),
    (["objective.kind=dsm", "objective.noise_conditional=true", "objective.sigma_min=1", "objective.sigma_max=1"],
     "objective.sigma_max"),
    (["objective.kind=lsd", "objective.noise_conditional=true", "data.noise_std=0.1"], "data.noise_std"),
    (["objective.kind=dsm", "sampler.kind=annealed"], "objective.noise_conditional=true"),
    (["objective.kind=dsm", "objective.noise_conditional=true", "sampler.kind=annealed", "sampler.step_size=0"],
     "sampler.step_size"),
    (["objective.kind=dsm", "objective.noise_conditional=true", "sampler.kind=annealed", "sampler.grad_clip=0.5"],
     "sampler.grad_clip"),
    (["objective.kind=dsm", "objective.noise_conditional=true", "sampler.kind=annealed", "sampler.levels=0"],
     "sampler.levels"),
    (["objective.kind=dsm", "objective.noise_conditional=true", "sampler.kind=annealed", "sampler.sigma_min=2"],
     "sampler.sigma_max"),
    (["objective.kind=dsm", "sampler.sigma_min=0.1"], "sampler.sigma_min"),
    (["objective.kind=lsd", "objective.lsd_trace=denoising", "data.noise_std=0.3"], "objective.lsd_trace=denoising"),
    (["objective.kind=lsd", "objective.noise_conditional=true", "objective.lsd_critic_skip=true"],
     "objective.lsd_trace=denoising"),
])
def test_noise_conditional_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["data.dataset=digits", "model.arch=cnn", "data.noise_std=0", *override])


def test_the_ladder_is_the_objectives_range_unless_the_sampler_sets_its_ends():
    base = ["data.dataset=digits", "model.arch=cnn", "data.noise_std=0", "objective.kind=dsm",
            "objective.noise_conditional=true", "objective.sigma_min=0.02", "objective.sigma_max=3",
            "sampler.kind=annealed", "sampler.grad_clip=0", "sampler.step_size=0.2"]
    for extra, ends in (([], (0.02, 3.0)), (["sampler.sigma_min=0.1"], (0.1, 3.0)),
                        (["sampler.sigma_max=5", "sampler.sigma_min=0.05"], (0.05, 5.0))):
        cfg = load_config(None, [*base, *extra])
        st = LangevinSettings.from_config(cfg, (-1.0, 1.0))
        assert (st.sigma_min, st.sigma_max) == ends
        levels = noise_levels(st)
        assert levels[0] == pytest.approx(ends[1]) and levels[-1] == pytest.approx(ends[0]) and len(levels) == 10


def test_annealed_sampler_under_bf16_autocast_tracks_fp32():
    """The bf16 path (what train.precision=auto picks on bf16 hardware), forced: energies under
    autocast, chains and updates in fp32; the samples stay finite and close to the fp32 ones."""
    from ebmscale.models.convnet import ConvNetEnergy
    from ebmscale.sampling import sampling_mode

    torch.manual_seed(0)
    model = ConvNetEnergy(in_channels=1, resolution=8, width=4, depth=2)
    st = LangevinSettings(kind="annealed", steps=5, step_size=0.2, levels=4, sigma_min=0.05, sigma_max=1.0,
                          clamp=(-1.0, 1.0))
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    out = {}
    with sampling_mode(model) as m:
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            out[name] = langevin(m, x0, st, torch.Generator().manual_seed(3), autocast_dtype=dtype)
    assert out["bf16"].dtype == torch.float32 and bool(torch.isfinite(out["bf16"]).all())
    diff = float((out["bf16"] - out["fp32"]).abs().mean())
    assert 0 < diff < 1e-3, diff  # the same chains and noise: bf16 rounding of the gradients only
