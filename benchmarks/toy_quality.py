"""Quality benchmark for maximum-likelihood PCD in 2-D: exact test NLL against the truth.

For each density, trains the recipe in configs/toy_<name>.yaml under a wall-clock budget, then
computes the model's exact test NLL (log Z by quadrature), the generating density's own NLL on the
same test points, and a Gaussian KDE (bandwidth chosen on a validation split) as a reference.

    .venv/bin/python benchmarks/toy_quality.py [--datasets 8gaussians rings] [--minutes 3] [--out DIR]
    .venv/bin/python benchmarks/toy_quality.py --full --seeds 0 1 2 3 4 --precisions fp32 bf16

``--full`` trains the recipe's own ``train.steps`` (no wall-clock cut), so a figure does not depend on
how busy the machine was. With several seeds or precisions it also prints, per dataset and
precision, the mean exact-NLL gap and its spread (sample standard deviation, min, max): one run's
gap is partly luck (the 8gaussians recipe measured +0.045 on one CPU and +0.110 on another).

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
    budget = [f"train.max_minutes={minutes}"] if minutes > 0 else []  # 0 = the recipe's full train.steps
    cfg = load_config(recipe, [f"data.dataset={name}", *budget, "train.progress=false", *overrides])
    run_dir = os.path.join(out_root, tag or name)
    t0 = time.perf_counter()
    result = train(cfg, run_dir=run_dir)
    wall = time.perf_counter() - t0
    ev = toy_nll_from_checkpoint(result.checkpoint, grid=512, kde=kde)
    return {"dataset": name, "steps": result.steps, "train_seconds": round(wall, 1), "nll": ev["nll"],
            "true_nll": ev["true_nll"], "gap": ev["gap"], "kde_nll": ev["kde_nll"],
            "kde_bandwidth": ev["kde_bandwidth"], "kde_train_size": ev["kde_train_size"], "run_dir": run_dir}


def print_spread(rows: list[dict]) -> None:
    """Per (dataset, precision): mean exact-NLL gap over the seeds and its spread, as a Markdown table."""
    import statistics

    print("| dataset | precision | runs | mean gap | std | min | max |")
    print("|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["dataset"], r["precision"]) for r in rows):
        gaps = [r["gap"] for r in rows if (r["dataset"], r["precision"]) == key]
        std = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
        print(f"| {key[0]} | {key[1]} | {len(gaps)} | {statistics.mean(gaps):+.4f} | {std:.4f} | "
              f"{min(gaps):+.4f} | {max(gaps):+.4f} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["8gaussians", "rings"])
    ap.add_argument("--minutes", type=float, default=3.0, help="training wall-clock budget per dataset")
    ap.add_argument("--full", action="store_true", help="train the recipe's full train.steps (no time budget)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="train.seed values (default: the recipe's)")
    ap.add_argument("--precisions", nargs="+", default=None, choices=("fp32", "bf16", "fp16", "auto"),
                    help="train.precision values (default: the recipe's)")
    ap.add_argument("--out", default="", help="where runs go (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*", help="config overrides applied to every recipe")
    args = ap.parse_args()
    out_root = args.out or tempfile.mkdtemp(prefix="ebmscale-toy-")
    minutes = 0.0 if args.full else args.minutes
    rows = []
    for name in args.datasets:
        for precision in args.precisions or [None]:
            for seed in args.seeds or [None]:
                extra = ([f"train.precision={precision}"] if precision else []) + (
                    [f"train.seed={seed}"] if seed is not None else [])
                tag = "-".join([name] + ([precision] if precision else []) + ([f"s{seed}"] if seed is not None else []))
                row = run_one(name, minutes, out_root, [*args.overrides, *extra], tag=tag)
                rows.append({**row, "precision": precision or "recipe", "seed": seed})
    if args.seeds or args.precisions:
        print_spread(rows)
    print_report(rows, [("dataset", lambda r: r["dataset"]), ("precision", lambda r: r["precision"]),
                        ("seed", lambda r: str(r["seed"])), ("steps", lambda r: str(r["steps"])),
                        ("train s", lambda r: f"{r['train_seconds']:.0f}"), ("EBM test NLL", lambda r: f"{r['nll']:.4f}"),
                        ("true NLL", lambda r: f"{r['true_nll']:.4f}"), ("gap", lambda r: f"{r['gap']:+.4f}"),
                        ("KDE NLL (n train)", lambda r: f"{r['kde_nll']:.4f} ({r['kde_train_size']})")])


if __name__ == "__main__":
    main()
