"""benchmarks/score_fit.py on a tiny digits run: the figures come back finite, for the run's own
data and noise, and the same seed gives the same figures (so checkpoints are compared on equal terms);
--grid writes the images, noisy images and denoised images."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from benchmarks.score_fit import main, score_fit
from ebmscale.config import load_config
from ebmscale.trainer import train


def test_score_fit_on_a_tiny_dsm_run(tmp_path, capsys):
    cfg = load_config(None, ["data.dataset=digits", "model.arch=cnn", "model.width=4", "model.depth=2",
                             "data.batch_size=16", "objective.kind=dsm", "objective.dsm_sigmas=[0.3]",
                             "train.steps=3", "train.precision=fp32", "train.progress=false",
                             "train.tensorboard=false", "train.sample_every=0"])
    run = str(tmp_path / "run")
    train(cfg, run_dir=run)
    r = score_fit(run, sigma=0.3, n=20)
    assert r["objective"] == "dsm" and r["step"] == 3
    for k in ("score_cosine", "score_mse", "energy_data", "energy_noisy", "energy_uniform", "energy_blank"):
        assert math.isfinite(r[k]), k
    assert -1.0 <= r["score_cosine"] <= 1.0
    # The target -n/sigma^2 has norm ~ sqrt(d)/sigma (d = 64 pixels of 8x8 digits).
    assert abs(r["target_norm"] - 8 / 0.3) < 3
    assert score_fit(run, sigma=0.3, n=20) == r
    grid = tmp_path / "denoise.png"
    assert main([run, "--n", "20", "--grid", str(grid)]) == 0
    assert "| dsm |" in capsys.readouterr().out
    # Three rows of 8 tiles (8x8 digits, 2 pixels apart): images, noisy images, denoised.
    img = np.asarray(Image.open(grid).convert("L"))
    assert img.shape == (3 * 10 + 2, 8 * 10 + 2)
    tiles = [img[2 + 10 * r:10 * r + 10, 2:10] for r in range(3)]
    assert not np.array_equal(tiles[0], tiles[1]) and not np.array_equal(tiles[1], tiles[2])
