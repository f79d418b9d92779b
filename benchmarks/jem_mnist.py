"""JEM on MNIST against a plain classifier with the same network and the same number of steps.

Trains configs/jem_mnist.yaml under a wall-clock budget, then the same network with only the
cross-entropy term (objective.px_weight=0: no sampling) for exactly as many steps, and reports
test accuracy and expected calibration error (20 bins) of both on the 10,000 MNIST test images,
plus a reliability diagram per model.

    .venv/bin/python benchmarks/jem_mnist.py [--minutes 28] [--out DIR] [key=value ...]

Prints a Markdown table and, as its last line, one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import print_report  # noqa: E402
from ebmscale.config import load_config  # noqa: E402
from ebmscale.data.builtin import load_builtin  # noqa: E402
from ebmscale.data.transforms import to_model_input  # noqa: E402
from ebmscale.eval.checkpoints import load_energy_model  # noqa: E402
from ebmscale.eval.classifier import accuracy, expected_calibration_error, reliability_diagram  # noqa: E402
from ebmscale.trainer import train  # noqa: E402


@torch.no_grad()
def test_probs(checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
    cfg, model, _ = load_energy_model(checkpoint)
    x, y = load_builtin(cfg.data.dataset, "test")
    xs = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    probs = [torch.softmax(model.logits(to_model_input(xs[i:i + 500], cfg.data.range)).float(), 1)
             for i in range(0, len(xs), 500)]
    return torch.cat(probs).numpy(), y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "jem_mnist.yaml"))
    ap.add_argument("--minutes", type=float, default=28.0,
                    help="JEM training budget (the target allows 30 minutes; the classifier is faster)")
    ap.add_argument("--out", default="")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="ebmscale-jem-")
    rows = []
    t0 = time.perf_counter()
    cfg = load_config(args.config, [*args.overrides, f"train.max_minutes={args.minutes}", "train.progress=false"])
    jem = train(cfg, run_dir=os.path.join(out, "jem"))
    t_jem = time.perf_counter() - t0
    cfg_clf = load_config(args.config, [*args.overrides, f"train.steps={jem.steps}", "objective.px_weight=0",
                                        "objective.pxy_weight=0", "train.progress=false"])
    t1 = time.perf_counter()
    clf = train(cfg_clf, run_dir=os.path.join(out, "classifier"))
    t_clf = time.perf_counter() - t1
    for name, res, secs in (("JEM", jem, t_jem), ("classifier", clf, t_clf)):
        probs, y = test_probs(res.checkpoint)
        png = os.path.join(res.run_dir, "reliability.png")
        reliability_diagram(probs, y, png, title=name)
        rows.append({"model": name, "steps": res.steps, "train_seconds": round(secs, 1),
                     "test_accuracy": accuracy(probs, y), "ece": expected_calibration_error(probs, y, 20),
                     "reliability_png": png})
    print_report(rows, [("model", lambda r: r["model"]), ("steps", lambda r: str(r["steps"])),
                        ("train s", lambda r: f"{r['train_seconds']:.0f}"),
                        ("test accuracy", lambda r: f"{100 * r['test_accuracy']:.2f}%"),
                        ("ECE (20 bins)", lambda r: f"{100 * r['ece']:.2f}%")])


if __name__ == "__main__":
    main()
