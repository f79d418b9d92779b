"""Quality benchmark for maximum-likelihood PCD in 2-D: exact test NLL against the truth.

For each density, trains the recipe in configs/toy_<name>.yaml under a wall-clock budget, then
computes the model's exact test NLL (log Z by quadrature), the generating density's own NLL on the
same test points, and a Gaussian KDE (bandwidth chosen on a validation split) as a reference.

    .venv/bin/python benchmarks/toy_quality.py [--datasets 8gaussians rings] [--minutes 3] [--out DIR]

Prints one Markdown table and, as its last line, one JSON object with all figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import print_report  # noqa: E402
from ebmscale.config import load_config  # noqa: E402
from ebmscale.eval.checkpoints import toy_nll_from_checkpoint  # noqa: E402
from ebmscale.trainer import train  # noqa: E402


def run_one(name: str, minutes: float, out_root: str, overrides: list[str], recipe: str | None = None,
            tag: str | None = None, kde: dict | None = None) -> dict:
    """Train ``recipe`` (default configs/toy_<name>.yaml) on density ``name`` for ``minutes`` of
    wall clock, then evaluate the checkpoint exactly; ``tag`` names the run directory, ``kde`` is
    a precomputed KDE baseline for this density (see ``toy_nll_from_checkpoint``)."""
    recipe = recipe or os.path.join(ROOT, "configs", f"toy_{name}.yaml")
    cfg = load_config(recipe, [f"data.dataset={name}", f"train.max_minutes={minutes}", "train.progress=false",
                               *overrides])
    run_dir = os.path.join(out_root, tag or name)
    t0 = time.perf_counter()
    result = train(cfg, run_dir=run_dir)
    wall = time.perf_counter() - t0
    ev = toy_nll_from_checkpoint(result.checkpoint, grid=512, kde=kde)
    return {"dataset": name, "steps": result.steps, "train_seconds": round(wall, 1), "nll": ev["nll"],
            "true_nll": ev["true_nll"], "gap": ev["gap"], "kde_nll": ev["kde_nll"],
            "kde_bandwidth": ev["kde_bandwidth"], "kde_train_size": ev["kde_train_size"], "run_dir": run_dir}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["8gaussians", "rings"])
    ap.add_argument("--minutes", type=float, default=3.0, help="training wall-clock budget per dataset")
    ap.add_argument("--out", default="", help="where runs go (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*", help="config overrides applied to every recipe")
    args = ap.parse_args()
    out_root = args.out or tempfile.mkdtemp(prefix="ebmscale-toy-")
    rows = [run_one(name, args.minutes, out_root, args.overrides) for name in args.datasets]
    print_report(rows, [("dataset", lambda r: r["dataset"]), ("steps", lambda r: str(r["steps"])),
                        ("train s", lambda r: f"{r['train_seconds']:.0f}"), ("EBM test NLL", lambda r: f"{r['nll']:.4f}"),
                        ("true NLL", lambda r: f"{r['true_nll']:.4f}"), ("gap", lambda r: f"{r['gap']:+.4f}"),
                        ("KDE NLL (n train)", lambda r: f"{r['kde_nll']:.4f} ({r['kde_train_size']})")])


if __name__ == "__main__":
    main()
