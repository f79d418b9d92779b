"""FID of the default MNIST job's samples against the MNIST test set, and JEM-MNIST's OOD AUROC
against Fashion-MNIST (plus uniform noise, constant and flipped images), with the evaluation
commands themselves (`ebmscale eval ref-stats | fid | classifier | ood`).

    .venv/bin/python benchmarks/eval_mnist.py [--pcd-checkpoint C] [--jem-checkpoint C]
        [--n 1000] [--ref-n 10000] [--ood-n 10000] [--fid-modes buffer:20,noise:200] [--out DIR]

Without checkpoints it trains them first: the default job (`ebmscale train`, 2,000 steps) and
configs/jem_mnist.yaml for ``--jem-minutes``. FID rows: the model's samples for each
``init:steps`` mode, and real MNIST training images (the floor of FID at this N: FID is biased
upwards at small N, so only compare figures at the same N). Every FID states the Inception
weights that produced it. Prints a Markdown table and, as its last line, one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import print_report  # noqa: E402
from ebmscale.cli import main as cli  # noqa: E402
from ebmscale.eval.fid import frechet_distance, load_stats  # noqa: E402


def run(*args) -> dict:
    """One ebmscale command in this process; its last stdout line (the figures) as a dict."""
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        code = cli([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"ebmscale {' '.join(map(str, args))} failed with status {code}")
    out = json.loads(buf.getvalue().strip().splitlines()[-1])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"# ebmscale {' '.join(map(str, args))}: {out['seconds']} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pcd-checkpoint", help="default-job checkpoint (default: train one)")
    ap.add_argument("--jem-checkpoint", help="JEM-MNIST checkpoint (default: train one)")
    ap.add_argument("--jem-minutes", type=float, default=25.0)
    ap.add_argument("--n", type=int, default=1000, help="samples per FID")
    ap.add_argument("--ref-n", type=int, default=10000, help="MNIST test images in the reference statistics")
    ap.add_argument("--ref", help="reuse reference statistics of the MNIST test set written by `eval ref-stats`")
    ap.add_argument("--ood-n", type=int, default=10000, help="in-distribution and OOD images per OOD set")
    ap.add_argument("--fid-modes", default="buffer:20,noise:200", help="comma-separated init:steps")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="ebmscale-eval-")
    ref_stats = load_stats(args.ref) if args.ref else None  # fail now, not after the JEM evaluations
    common = ["train.progress=false", "train.tensorboard=false", "train.threads=1"]
    pcd = args.pcd_checkpoint
    if not pcd:
        pcd = run("train", "--run-dir", os.path.join(out, "pcd"), *common)["checkpoint"]
    jem = args.jem_checkpoint
    if not jem:
        jem = run("train", "--run-dir", os.path.join(out, "jem"), "--config", os.path.join(ROOT, "configs", "jem_mnist.yaml"),
                  *common, f"train.max_minutes={args.jem_minutes}")["checkpoint"]

    # JEM first: its evaluations need no Inception (a --ref being written meanwhile can finish).
    rows = []
    clf = run("eval", "classifier", "--checkpoint", jem, "--out", os.path.join(out, "jem_eval"))
    ood = run("eval", "ood", "--checkpoint", jem, "--n", args.ood_n, "--out", os.path.join(out, "jem_eval"))
    for name, scores in ood["auroc"].items():
        rows.append({"what": f"JEM OOD vs {name}", **{f"auroc_{k}": v for k, v in scores.items()},
                     "n": ood["n_in"], "seconds": ood["seconds"]})
    rows.append({"what": "JEM classifier", "accuracy": clf["accuracy"], "ece": clf["ece"], "n": clf["n"],
                 "seconds": clf["seconds"]})
    floor = os.path.join(out, "mnist_train_n.npz")
    f = run("eval", "ref-stats", "--data", "mnist", "--split", "train", "--n", args.n, "--out", floor)
    if args.ref:
        ref = args.ref
        r = {"n": int(ref_stats["n"]), "weights": ref_stats["weights"]}
    else:
        ref = os.path.join(out, "mnist_test_ref.npz")
        r = run("eval", "ref-stats", "--data", "mnist", "--split", "test", "--n", args.ref_n, "--out", ref)
        ref_stats = load_stats(ref)
    a, b = load_stats(floor), ref_stats
    rows.append({"what": f"MNIST train images (N={args.n}): FID floor", "fid": frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"]),
                 "n": f["n"], "ref_n": r["n"], "seconds": f["seconds"], "weights": f["weights"]})
    for mode in args.fid_modes.split(","):
        init, steps = mode.split(":")
        res = run("eval", "fid", "--checkpoint", pcd, "--ref", ref, "--n", args.n, "--steps", steps, "--init", init,
                  "--out", os.path.join(out, f"fid_{init}_{steps}"))
        rows.append({"what": f"default job, {init} starts, K={steps}", "fid": res["fid"], "n": res["n"],
                     "ref_n": r["n"], "seconds": res["seconds"], "weights": res["weights"]})
    for row in rows:
        row.update(pcd_checkpoint=pcd, jem_checkpoint=jem)

    def fmt(key: str, scale: float = 1.0, digits: int = 3):
        return lambda row: f"{scale * row[key]:.{digits}f}" if key in row else ""

    print_report(rows, [("what", lambda row: row["what"]), ("N", lambda row: str(row["n"])),
                        ("FID", fmt("fid", digits=2)), ("AUROC log p(x)", fmt("auroc_log_px")),
                        ("AUROC max p(y|x)", fmt("auroc_max_softmax")),
                        ("AUROC -‖∇ log p‖", fmt("auroc_neg_grad_norm")),
                        ("accuracy", fmt("accuracy", 100, 2)), ("ECE %", fmt("ece", 100, 2)),
                        ("s", lambda row: f"{row['seconds']:.0f}")])


if __name__ == "__main__":
    main()
