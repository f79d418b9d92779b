"""Command line: ``ebmscale train | sample | eval | info | data | export | report | config-docs``.

Thin entry points: each subcommand parses its arguments, resolves a config and hands it to the
library. argparse lives here only (``cli/eval.py``: eval and sample; ``cli/data.py``: data);
``key=value`` config overrides may stand anywhere on the line. Expected failures (bad config, path, data or checkpoint; divergence) print one line
``ebmscale: error: ...`` and exit non-zero, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ebmscale.cli.data import add_shards_arguments
from ebmscale.cli.eval import add_eval_parsers, add_sample_parser, eval_function, function_kwargs
from ebmscale.config import ConfigError, dump_yaml, load_config

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (default: the built-in MNIST job)")
    # Parsed by hand (see parse_args): an argparse positional list must be one group, and the
    # overrides may stand anywhere, e.g. between --run-dir and --resume.
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. sampler.steps=40 "
                                                                      "(anywhere on the line)")
    p.set_defaults(accepts_overrides=True)


def _is_override(arg: str) -> bool:
    return not arg.startswith("-") and "=" in arg


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with the ``key=value`` overrides taken from wherever they stand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "accepts_overrides", False):
        stray = [a for a in extra if not _is_override(a)]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        # argparse fills the positional list with the first group only (possibly empty, at the
        # start), so the first group precedes the rest: the line's order (later wins) is kept.
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


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

    p = sub.add_parser("report", help="write a run directory's report: one self-contained HTML page (config, "
                                      "curves, FID, buffer health, samples over time, eval results, checkpoints)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (train.run_dir)")
    p.add_argument("--out", help="output HTML file (default: RUN_DIR/report.html)")

    p = sub.add_parser("info", help="print the model's parameter count and the resolved settings")
    _add_config_args(p)

    p = sub.add_parser("config-docs", help="print the configuration reference (docs/config.md) generated from "
                                           "the config dataclasses")
    p.add_argument("--out", help="write it to this file instead (make docs: --out docs/config.md)")

    pe = sub.add_parser("eval", help="evaluation suites")
    esub = pe.add_subparsers(dest="eval_command", required=True)
    add_eval_parsers(esub)
    add_sample_parser(sub)

    pd = sub.add_parser("data", help="data preparation")
    dsub = pd.add_subparsers(dest="data_command", required=True)

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


def cmd_report(args: argparse.Namespace) -> int:
    from ebmscale.report import write_report

    _print_json_last({"report": write_report(args.run_dir, args.out)})
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


def cmd_config_docs(args: argparse.Namespace) -> int:
    from ebmscale.config_docs import render_config_docs

    text = render_config_docs()
    if args.out:
        import os

        from ebmscale.utils import atomic_write_bytes

        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--out: folder '{folder}' does not exist")
        atomic_write_bytes(args.out, text.encode("utf-8"))
    else:
        sys.stdout.write(text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    fn = eval_function(args.eval_command)
    if args.eval_command == "toy-nll":
        _print_json_last(fn(**function_kwargs(args)))
        return 0
    return _distributed_command(fn, args)


def _distributed_command(fn, args: argparse.Namespace) -> int:
    """Run an evaluation/sampling command in the launcher's process group (if any); rank 0
    prints the figures as the last line."""
    from ebmscale import dist

    started = dist.init_from_env()
    try:
        result = fn(**function_kwargs(args))
        if dist.is_main():
            _print_json_last(result)
    finally:
        if started:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    return _distributed_command(eval_function("sample"), args)


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "shards":
        from ebmscale.cli.data import shards_command

        _print_json_last(shards_command(args))
        return 0
    raise ConfigError(f"unknown data command '{args.data_command}'")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    from ebmscale.checkpoint import CheckpointError
    from ebmscale.data.builtin import DataError

    parser = build_parser()
    args = parse_args(parser, argv)
    handlers = {"train": cmd_train, "info": cmd_info, "eval": cmd_eval, "data": cmd_data, "sample": cmd_sample,
                "export": cmd_export, "report": cmd_report, "config-docs": cmd_config_docs}
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
