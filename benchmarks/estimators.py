"""Every EBM estimator on equal terms: same MLP energy, same data path, same wall-clock budget.

Each estimator's recipe is configs/toy_8gaussians_<estimator>.yaml (PCD's is configs/toy_8gaussians.yaml);
all use the MLP of the 2-D recipes (width 128, depth 3, swish), batch 512, Adam with EMA 0.99. For
the other densities only ``data.dataset`` changes. After training, the checkpoint's exact test NLL
(log Z by quadrature on a 512^2 grid) is compared with the true density's NLL on the same test
points.

    .venv/bin/python benchmarks/estimators.py [--estimators cd sm ...] [--datasets 8gaussians rings checkerboard]
        [--minutes 1] [--out DIR] [--no-readme] [overrides ...]

Prints the Markdown table and, as its last line, one JSON object list; unless ``--no-readme``, it
also writes the table into docs/benchmarks.md between the ``<!-- estimators:begin -->`` and
``<!-- estimators:end -->`` markers (only when every estimator and density was run, so a partial
run never replaces the full table).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import print_report  # noqa: E402
from benchmarks.toy_quality import run_one  # noqa: E402
from ebmscale.config import load_config  # noqa: E402
from ebmscale.data import toy_splits  # noqa: E402
from ebmscale.eval.toy import kde_nll  # noqa: E402
from ebmscale.trainer import DivergenceError  # noqa: E402

# Estimator name -> recipe file; the table's rows in this order.
ESTIMATORS = {
    "pcd": "toy_8gaussians.yaml",
    "cd": "toy_8gaussians_cd.yaml",
    "sm": "toy_8gaussians_sm.yaml",
    "dsm": "toy_8gaussians_dsm.yaml",
    "dsm_multi": "toy_8gaussians_dsm_multi.yaml",
    "ssm": "toy_8gaussians_ssm.yaml",
    "nce": "toy_8gaussians_nce.yaml",
    "adversarial_noisy": "toy_8gaussians_adversarial_noisy.yaml",
    "adversarial_flow": "toy_8gaussians_adversarial_flow.yaml",
    "ksd": "toy_8gaussians_ksd.yaml",
    "pcd_mala": "toy_8gaussians_mala.yaml",
    "pcd_improved": "toy_8gaussians_improved_cd.yaml",
    "mpf": "toy_8gaussians_mpf.yaml",
    "kl_contraction": "toy_8gaussians_kl_contraction.yaml",
    "lsd": "toy_8gaussians_lsd.yaml",
}
DATASETS = ("8gaussians", "rings", "checkerboard")
BEGIN, END = "<!-- estimators:begin -->", "<!-- estimators:end -->"



def _cell(fmt: str, key: str):
    # A diverged run has no figures: its row says where it stopped instead.
    return lambda r: format(r[key], fmt) if key in r else ("diverged" if key == "gap" else "—")


COLUMNS = [("estimator", lambda r: r["estimator"]), ("dataset", lambda r: r["dataset"]),
           ("steps", lambda r: str(r["steps"]) if "steps" in r else r["diverged"].split(":")[0].replace("training ", "")),
           ("train s", _cell(".0f", "train_seconds")), ("test NLL", _cell(".3f", "nll")),
           ("true NLL", _cell(".3f", "true_nll")), ("gap (nats)", _cell("+.3f", "gap")), ("KDE NLL", _cell(".3f", "kde_nll"))]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r) for _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_readme(rows: list[dict], minutes: float, command: str, total_s: float, jobs: int) -> None:
    """Replace the block between the markers in docs/benchmarks.md with the table and how it was made."""
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    with open(path) as fh:
        text = fh.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"docs/benchmarks.md has no {BEGIN} ... {END} block to write the table into")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    block = (f"{BEGIN}\n{markdown(rows)}\n\nWritten by `{command}` ({minutes:g} min of training per run, "
             f"one torch thread each, {jobs} run(s) at a time, {total_s / 60:.0f} min in all; {platform.machine()} "
             f"CPU, {time.strftime('%Y-%m-%d')}).\n{END}")
    with open(path, "w") as fh:
        fh.write(head + block + tail)


def kde_baseline(dataset: str) -> dict:
    """The KDE reference of one density (data only: computed once, shared by every estimator)."""
    cfg = load_config(os.path.join(ROOT, "configs", ESTIMATORS["pcd"]), [f"data.dataset={dataset}"])
    s = toy_splits(cfg)
    return kde_nll(s["train"], s["val"], s["test"])


def _finished(run_dir: str) -> dict | None:
    """Figures of a run that already finished in ``run_dir`` (``--reuse``): its evaluation and
    train() wall time (config.yaml written at the start, checkpoint.pt at the end)."""
    ev_path = os.path.join(run_dir, "eval_toy_nll.json")
    if not os.path.isfile(ev_path):
        return None
    with open(ev_path) as fh:
        ev = json.load(fh)
    wall = os.path.getmtime(os.path.join(run_dir, "checkpoint.pt")) - os.path.getmtime(os.path.join(run_dir, "config.yaml"))
    return {"dataset": ev["dataset"], "steps": ev["step"], "train_seconds": round(wall, 1), "nll": ev["nll"],
            "true_nll": ev["true_nll"], "gap": ev["gap"], "kde_nll": ev["kde_nll"], "run_dir": run_dir}


def _task(args: tuple) -> dict:
    est, dataset, minutes, out_root, overrides, kde, reuse = args
    recipe = os.path.join(ROOT, "configs", ESTIMATORS[est])
    tag = f"{est}-{dataset}"
    r = _finished(os.path.join(out_root, tag)) if reuse else None
    if r is None:
        try:
            r = run_one(dataset, minutes, out_root, overrides, recipe=recipe, tag=tag, kde=kde)
        except DivergenceError as exc:  # a result too: the table says so instead of losing the other runs
            print(f"{est} {dataset}: {exc}", file=sys.stderr, flush=True)
            return {"estimator": est, "dataset": dataset, "diverged": str(exc)}
    print(f"{est} {dataset}: gap {r['gap']:+.3f} nats after {r['steps']} steps", file=sys.stderr, flush=True)
    return {"estimator": est, **r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--minutes", type=float, default=1.0, help="training wall-clock budget per run")
    ap.add_argument("--out", default="", help="where runs go (default: a temporary directory)")
    ap.add_argument("--no-readme", action="store_true", help="only print; leave docs/benchmarks.md alone")
    ap.add_argument("--reuse", action="store_true", help="keep the figures of runs already finished under --out "
                                                          "(resume an interrupted benchmark)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (one thread each); 1 = one after "
                                                          "the other, the fairest when cores are scarce")
    ap.add_argument("overrides", nargs="*", help="config overrides applied to every recipe")
    args = ap.parse_args()
    out_root = args.out or tempfile.mkdtemp(prefix="ebmscale-estimators-")
    t0 = time.perf_counter()
    kdes = {d: kde_baseline(d) for d in args.datasets}
    tasks = [(e, d, args.minutes, out_root, args.overrides, kdes[d], args.reuse)
             for e in args.estimators for d in args.datasets]
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(_task, tasks))
    else:
        rows = [_task(t) for t in tasks]
    total = time.perf_counter() - t0
    print_report(rows, COLUMNS)
    full = set(args.estimators) == set(ESTIMATORS) and set(args.datasets) == set(DATASETS) and not args.overrides
    if full and not args.no_readme:
        write_readme(rows, args.minutes, f"python benchmarks/estimators.py --minutes {args.minutes:g} --jobs {args.jobs}",
                     total, args.jobs)


if __name__ == "__main__":
    main()
