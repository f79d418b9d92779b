"""Command line: ``ebmscale train | sample | eval | info | data | export``.

Thin entry points: each subcommand parses its arguments, resolves a config and hands it to the
library. Expected failures (bad config, path, data or checkpoint; divergence) print one line
``ebmscale: error: ...`` and exit non-zero, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

from ebmscale.config import ConfigError, dump_yaml, load_config

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("--config", required=config_required, help="YAML recipe (default: the built-in MNIST job)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. sampler.steps=40")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ebmscale", description="Train and evaluate energy-based models at scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an EBM (default: MNIST, PCD, in one process)")
    _add_config_args(p)
    p.add_argument("--run-dir", help="run directory (overrides train.run_dir)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", help="'auto' = the run directory's newest complete checkpoint that loads (none: "
                                    "start afresh), or a checkpoint step directory / run directory")

    p = sub.add_parser("export", help="write a checkpoint's EMA weights (live ones without EMA) as one "
                                      ".safetensors file plus its config")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory: its newest complete checkpoint")
    src.add_argument("--checkpoint", help="checkpoint step directory (<run_dir>/checkpoints/step-N)")
    p.add_argument("--out", required=True, help="output FILE.safetensors (the config goes beside it as FILE.yaml)")

    p = sub.add_parser("info", help="print the model's parameter count and the resolved settings")
    _add_config_args(p)

    pe = sub.add_parser("eval", help="evaluation suites")
    esub = pe.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("toy-nll", help="exact test NLL of a 2-D model by quadrature, vs true NLL and a KDE")
    p.add_argument("--checkpoint", required=True, help="checkpoint step directory, run directory or export (.safetensors)")
    p.add_argument("--grid", type=int, default=512, help="quadrature grid points per axis")
    p.add_argument("--out", help="directory for figures and the JSON result (default: the checkpoint's run dir)")
    from ebmscale.eval.commands import add_eval_parsers, add_sample_parser

    add_eval_parsers(esub)
    add_sample_parser(sub)

    pd = sub.add_parser("data", help="data preparation")
    dsub = pd.add_subparsers(dest="data_command", required=True)
    from ebmscale.data.shards import add_shards_arguments

    p = dsub.add_parser("shards", help="write webdataset shards + manifest from a folder, CIFAR archive, "
                                       ".npz or a built-in set")
    add_shards_arguments(p)
    return parser


def _print_json_last(result: dict) -> None:
    print(json.dumps(result, sort_keys=False), flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        cfg.train.run_dir = args.run_dir
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from ebmscale.trainer import train

    result = train(cfg, resume=args.resume)
    from ebmscale import dist

    if dist.is_main():
        summary = {"steps": result.steps, "run_dir": result.run_dir, "checkpoint": result.checkpoint}
        summary.update({k: round(v, 6) for k, v in result.last_metrics.items() if isinstance(v, float)})
        _print_json_last(summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ebmscale.checkpoint import export_weights

    _print_json_last(export_weights(args.run or args.checkpoint, args.out))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from ebmscale.data import data_shape
    from ebmscale.models import build_model, count_parameters
    from ebmscale.performance import resolve_runtime

    shape = data_shape(cfg)
    model = build_model(cfg.model, shape)
    runtime = resolve_runtime(cfg, image_data=len(shape) == 3)
    print(dump_yaml(cfg), end="")  # what is asked (train.precision may say auto) ...
    # ... and what it resolves to on this machine (the run directory's runtime.yaml).
    _print_json_last({"arch": cfg.model.arch, "variant": cfg.model.variant, "input_shape": list(shape),
                      "parameters": count_parameters(model), "device": str(runtime.device),
                      "asked": {k: getattr(cfg.train, k) for k in ("device", "distributed", "precision",
                                                                   "channels_last", "compile", "reuse_cpu_memory")},
                      "resolved": runtime.to_dict()})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command == "toy-nll":
        from ebmscale.eval.checkpoints import toy_nll_from_checkpoint

        result = toy_nll_from_checkpoint(args.checkpoint, grid=args.grid, out_dir=args.out)
        _print_json_last(result)
        return 0
    from ebmscale.eval.commands import EVAL_COMMANDS

    if args.eval_command in EVAL_COMMANDS:
        return _distributed_command(EVAL_COMMANDS[args.eval_command], args)
    raise ConfigError(f"unknown eval command '{args.eval_command}'")


def _distributed_command(fn, args: argparse.Namespace) -> int:
    """Run an evaluation/sampling command in the launcher's process group (if any); rank 0
    prints the figures as the last line."""
    from ebmscale import dist

    started = dist.init_from_env()
    try:
        result = fn(args)
        if dist.is_main():
            _print_json_last(result)
    finally:
        if started:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from ebmscale.eval.commands import cmd_sample as run

    return _distributed_command(run, args)


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "shards":
        from ebmscale.data.shards import shards_command

        _print_json_last(shards_command(args))
        return 0
    raise ConfigError(f"unknown data command '{args.data_command}'")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    from ebmscale.checkpoint import CheckpointError
    from ebmscale.data.builtin import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": cmd_train, "info": cmd_info, "eval": cmd_eval, "data": cmd_data, "sample": cmd_sample,
                "export": cmd_export}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as exc:
        print(f"ebmscale: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("ebmscale: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from ebmscale.trainer import DivergenceError

        if isinstance(exc, DivergenceError):
            print(f"ebmscale: error: {exc}", file=sys.stderr, flush=True)
            return EXIT_DIVERGED
        raise


if __name__ == "__main__":
    sys.exit(main())
