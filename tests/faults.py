"""Test-only fault injection: a NaN loss at a chosen step, and a hang at a known point so that a
test can ``kill -9`` the run there. Production code has no hook for either: :func:`install`
patches ``ebmscale.trainer.Trainer`` (a subclass) and ``ebmscale.checkpoint.write_marker``.

In-process tests use :func:`install` through pytest's ``monkeypatch``; subprocess tests run
``python -m tests.faults [--nan-at N] [--nan-repeats R] [--hang step:N|save:N] -- <ebmscale args>``,
which installs the faults and then calls the CLI's ``main``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable


def nan_trainer(base: type, at_step: int, repeats: int = 1) -> type:
    """A subclass of the trainer ``base`` whose rank-0 loss (of the step's first micro-batch) is
    NaN at step ``at_step`` (1-based) while fewer than ``repeats`` rollbacks have happened: a real
    NaN through backward and the divergence check."""

    class NanTrainer(base):
        def _loss(self, *args, **kwargs):
            loss, stats, x_neg = super()._loss(*args, **kwargs)
            if at_step == self.step + 1 and self.rank == 0 and self.micro == 0 and self.rollbacks < repeats:
                loss = loss * math.nan
                stats = {**stats, "loss": loss.detach()}
            return loss, stats, x_neg

    return NanTrainer


def _hang(where: str) -> None:
    from ebmscale import dist

    print(f"ebmscale: test hang ({where}) on rank {dist.rank()}", file=sys.stderr, flush=True)
    time.sleep(3600)


def hang_trainer(base: type, step: int) -> type:
    """A subclass whose every rank announces itself and sleeps once step ``step`` is complete
    (logged, checkpointed), before it starts the next one."""

    class HangTrainer(base):
        def train_step(self):
            if self.step == step:
                _hang(f"step:{step}")
            return super().train_step()

    return HangTrainer


def hang_before_marker(write_marker: Callable[[str, dict], None], step: int) -> Callable[[str, dict], None]:
    """``write_marker`` that sleeps (rank 0, in the save of step ``step``) just before the
    completion marker: every file of that step is on disk, the marker is not."""

    def patched(path: str, marker: dict) -> None:
        if int(marker["step"]) == step:
            _hang(f"save:{step}")
        write_marker(path, marker)

    return patched


def install(setattr_: Callable[[object, str, object], None], nan_at: int = 0, nan_repeats: int = 1,
            hang: str = "") -> None:
    """Install the faults with ``setattr_`` (``monkeypatch.setattr`` in a test, plain ``setattr``
    in a subprocess)."""
    from ebmscale import checkpoint, trainer

    cls = trainer.Trainer
    if nan_at:
        cls = nan_trainer(cls, nan_at, nan_repeats)
    if hang:
        where, _, n = hang.partition(":")
        if where == "step":
            cls = hang_trainer(cls, int(n))
        elif where == "save":
            setattr_(checkpoint, "write_marker", hang_before_marker(checkpoint.write_marker, int(n)))
        else:
            raise ValueError(f"--hang must be step:N or save:N, got {hang!r}")
    if cls is not trainer.Trainer:
        setattr_(trainer, "Trainer", cls)


def main(argv: list[str] | None = None) -> int:
    """``[--nan-at N] [--nan-repeats R] [--hang step:N|save:N] [--] <ebmscale args>`` (the fault
    options are told apart by name, so ``--`` may be left out, e.g. under ``accelerate launch``)."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m tests.faults")
    p.add_argument("--nan-at", type=int, default=0)
    p.add_argument("--nan-repeats", type=int, default=1)
    p.add_argument("--hang", default="")
    if "--" in argv:
        split = argv.index("--")
        args, rest = p.parse_args(argv[:split]), argv[split + 1:]
    else:
        args, rest = p.parse_known_args(argv)
    install(setattr, args.nan_at, args.nan_repeats, args.hang)
    from ebmscale import cli

    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
