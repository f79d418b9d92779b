"""How well an image energy fits the smoothed data's score, and where it puts its low energies.

For score-based checkpoints (``objective.kind`` lsd, dsm, ssm, ...) on image data: ``--n`` training
images x, Gaussian noise n of std ``--sigma`` (seeded, so every checkpoint sees the same x and n),
the model's score s = -grad E(x + n) (-grad E / sigma for a noise-conditional energy, whose
energies are also given at level sigma) against the denoising target -n / sigma^2: cosine and mean
squared error (the error has an irreducible floor, so compare checkpoints, lower is better).
Then the mean energy of the images, the noisy images, uniform noise over the pixel range and the
blank image (every pixel at the range's low end) -- a score-based energy can put its minimum where
no training image is (docs/estimators.md#lsd-on-mnist-the-default-jobs-data-and-network).

    .venv/bin/python benchmarks/score_fit.py RUN_OR_CHECKPOINT [...] [--sigma 0.3] [--n 128] [--grid PNG]

Prints one Markdown row per checkpoint and, as its last line, the JSON list of the figures.
``--grid PNG`` also writes what each energy makes of the noisy images: for every checkpoint three
rows of 8, the images, the noisy images and their one-step denoising by Tweedie's formula
x + n + sigma^2 s (the posterior mean E[x | x + n] when s is the smoothed data's score), which
shows what an energy learned about the data even where its Langevin samples fall short.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ebmscale.data import build_train_stream  # noqa: E402
from ebmscale.data.transforms import data_bounds, save_image_grid, to_model_input, to_uint8  # noqa: E402
from ebmscale.eval.checkpoints import load_energy_model  # noqa: E402


def score_fit(path: str, sigma: float = 0.3, n: int = 128, seed: int = 0, rows: list | None = None) -> dict:
    """The figures above for one checkpoint (a run directory or a step directory); with ``rows`` (a
    list) it appends the grid's three rows (uint8) for this checkpoint."""
    cfg, model, state = load_energy_model(path)
    images = []
    for x, _ in build_train_stream(cfg):  # the run's own data, its first batches
        images.append(x)
        if sum(len(b) for b in images) >= n:
            break
    x = to_model_input(torch.cat(images)[:n], cfg.data.range)
    g = torch.Generator().manual_seed(seed)
    noise = sigma * torch.randn(x.shape, generator=g)
    z = (x + noise).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(z).sum(), z)
    # A noise-conditional energy is E(x) / sigma at level sigma (objective.noise_conditional).
    scale = sigma if cfg.objective.noise_conditional else 1.0
    s, target = -grad.flatten(1) / scale, (-noise / sigma ** 2).flatten(1)
    lo, hi = data_bounds(cfg.data.range)
    if rows is not None:
        denoised = (x + noise + sigma ** 2 * s.view(x.shape)).clamp(lo, hi)
        rows += [to_uint8(v[:8].detach(), cfg.data.range) for v in (x, (x + noise).clamp(lo, hi), denoised)]
    probes = {"data": x, "noisy": x + noise, "uniform": lo + (hi - lo) * torch.rand(x.shape, generator=g),
              "blank": torch.full_like(x, lo)}
    with torch.no_grad():
        energies = {k: float(model(v).mean()) / scale for k, v in probes.items()}
    return {"checkpoint": path, "step": state.get("step"), "objective": cfg.objective.kind, "sigma": sigma,
            "score_cosine": float(torch.nn.functional.cosine_similarity(s, target).mean()),
            "score_mse": float(((s - target) ** 2).sum(1).mean()), "target_norm": float(target.norm(dim=1).mean()),
            **{f"energy_{k}": v for k, v in energies.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--sigma", type=float, default=0.3)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--grid", default="", help="PNG: images, noisy images and their one-step denoising")
    args = p.parse_args(argv)
    grid: list | None = [] if args.grid else None
    rows = [score_fit(c, args.sigma, args.n, rows=grid) for c in args.checkpoints]
    if grid:
        save_image_grid(torch.cat(grid), args.grid, nrow=8)
    print("| checkpoint | objective | score cosine | score MSE | data | data + noise | uniform | blank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['objective']} | {r['score_cosine']:.3f} | {r['score_mse']:,.0f} | "
              + " | ".join(f"{r['energy_' + k]:+,.0f}" for k in ("data", "noisy", "uniform", "blank")) + " |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
