"""FID statistics and the Frechet distance: closed-form Gaussian cases, agreement with
pytorch-fid on the same features, the Inception Score on hand-made logits, .npz round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from ebmscale.data.builtin import DataError
from ebmscale.eval.fid import (FeatureStats, InceptionScoreStats, frechet_distance, load_stats, rank_share,
                               save_stats)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)
    # Diagonal covariances: sum over dims of the 1-D case.
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-12)
    # Commuting covariances (same eigenvectors, rotated): sum (sqrt(l1) - sqrt(l2))^2.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    l1, l2 = np.array([1.0, 2.0, 3.0, 0.5]), np.array([4.0, 0.5, 3.0, 2.0])
    got = frechet_distance(np.zeros(4), q @ np.diag(l1) @ q.T, np.zeros(4), q @ np.diag(l2) @ q.T)
    assert got == pytest.approx(((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum(), rel=1e-10)
    # Identical Gaussians: 0; for a singular covariance (rank 3 in 5-D, as with N < 2048 images)
    # up to the square root's sensitivity at zero eigenvalues (~sqrt(machine eps) x trace).
    a = np.random.default_rng(1).normal(size=(5, 3))
    s = a.T @ a
    assert frechet_distance(np.zeros(3), s, np.zeros(3), s) == pytest.approx(0.0, abs=1e-9)
    b = np.random.default_rng(2).normal(size=(3, 5))
    s5 = b.T @ b
    assert abs(frechet_distance(np.ones(5), s5, np.ones(5), s5)) < 1e-6 * np.trace(s5)


def test_feature_stats_and_fid_match_pytorch_fid():
    rng = np.random.default_rng(0)
    # float32 features, as the network gives them; the statistics are accumulated in float64.
    f1 = (rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))).astype(np.float32).astype(np.float64)
    f2 = rng.normal(loc=0.3, size=(400, 32)) @ rng.normal(size=(32, 32))
    stats = FeatureStats(32)
    for chunk in np.array_split(f1, 7):
        stats.update(torch.from_numpy(chunk).float())
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, f1.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f1, rowvar=False), rtol=1e-9, atol=1e-10)
    ours = frechet_distance(mu, sigma, f2.mean(0), np.cov(f2, rowvar=False))
    ref = calculate_frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert ours == pytest.approx(ref, rel=1e-6)


def test_feature_stats_rejects_bad_shapes_and_too_few():
    s = FeatureStats(4)
    with pytest.raises(ValueError, match=r"\(m, 4\)"):
        s.update(torch.zeros(3, 5))
    s.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        s.mean_cov()


def test_inception_score_hand_computed():
    # Uniform predictions: p(y|x) = p(y), KL = 0, IS = 1.
    s = InceptionScoreStats(classes=5, splits=2)
    s.update(torch.zeros(10, 5), 0)
    assert s.score() == pytest.approx((1.0, 0.0))
    # Confident predictions spread evenly over 4 classes: KL = log 4 per split, IS = 4.
    s = InceptionScoreStats(classes=4, splits=2)
    logits = torch.full((8, 4), -1e4)
    logits[torch.arange(8), torch.arange(8) // 2] = 0.0  # indices 0..7 -> classes 0,0,1,1,2,2,3,3
    s.update(logits, 0)  # split = index % 2: each split holds one image of each class
    assert s.score()[0] == pytest.approx(4.0, rel=1e-9)
    assert s.count.tolist() == [4.0, 4.0]


def test_rank_share_tiles_exactly():
    for n in (0, 1, 7, 10, 101):
        parts = [rank_share(n, r, 3) for r in range(3)]
        assert sum(c for _, c in parts) == n
        assert [s for s, _ in parts] == [0, parts[0][1], parts[0][1] + parts[1][1]]


def test_stats_npz_round_trip_and_pytorch_fid_reads_it(tmp_path):
    path = str(tmp_path / "ref.npz")
    mu, sigma = np.arange(3.0), np.eye(3)
    save_stats(path, mu, sigma, 10, "some weights", "bilinear", "src")
    got = load_stats(path)
    assert got["n"] == 10 and got["weights"] == "some weights" and got["source"] == "src"
    np.testing.assert_array_equal(got["mu"], mu)
    with np.load(path) as f:  # what pytorch-fid's compute_statistics_of_path does with an .npz
        np.testing.assert_array_equal(f["sigma"][:], sigma)
    # A plain pytorch-fid file (mu and sigma only) loads too.
    np.savez(tmp_path / "plain.npz", mu=mu, sigma=sigma)
    assert "weights" not in load_stats(str(tmp_path / "plain.npz"))


def test_load_stats_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.npz' do not exist"):
        load_stats(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(DataError, match="bad.npz"):
        load_stats(str(tmp_path / "bad.npz"))


def test_training_fid_config_checks_name_the_key(tmp_path):
    from ebmscale.config import ConfigError, load_config

    ref = tmp_path / "ref.npz"
    save_stats(str(ref), np.zeros(2), np.eye(2), 2, "w", "r")
    ok = load_config(None, ["train.fid_every=10", f"train.fid_ref_stats={ref}", "train.fid_samples=50"])
    assert ok.train.fid_every == 10
    # Class-conditional models get training-time FID too (sampled per class: docs/evaluation.md).
    load_config(None, ["train.fid_every=10", f"train.fid_ref_stats={ref}", "model.conditional=true",
                       "model.num_classes=10"])
    cases = [(["train.fid_every=10"], "train.fid_ref_stats"),
             (["train.fid_every=10", "train.fid_ref_stats=/no/ref.npz"], "/no/ref.npz"),
             (["train.fid_every=10", f"train.fid_ref_stats={ref}", "train.fid_samples=20000"], "train.fid_samples"),
             (["train.fid_every=10", f"train.fid_ref_stats={ref}", "data.dataset=moons", "model.arch=mlp"],
              "train.fid_every"),
             (["train.fid_init=sometimes"], "train.fid_init")]
    for overrides, needle in cases:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            load_config(None, overrides)
