"""Test-only fault injection: a NaN loss at a chosen step, and a hang at a known point so that a
test can ``kill -9`` the run there (or, with a go-file, a pause: the test does something to the
world around the run -- kills a Ray node -- then creates the file and the run goes on).
Production code has no hook for either: :func:`install` patches ``ebmscale.trainer.Trainer`` (a
subclass) and ``ebmscale.checkpoint.write_marker``.

In-process tests use :func:`install` through pytest's ``monkeypatch``; subprocess tests run
``python -m tests.faults [--nan-at N] [--nan-repeats R] [--hang step:N|save:N [--go FILE]] --
<ebmscale args>``, which installs the faults and then calls the CLI's ``main``.
"""
from __future__ import annotations

import argparse
import math
import os
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


def _hang(where: str, go: str = "") -> None:
    """Announce the hang on stderr, then sleep: for an hour, or until the file ``go`` exists."""
    from ebmscale import dist

    print(f"ebmscale: test hang ({where}) on rank {dist.rank()}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline and not (go and os.path.exists(go)):
        time.sleep(0.1)


def hang_trainer(base: type, step: int, go: str = "") -> type:
    """A subclass whose every rank announces itself and sleeps once step ``step`` is complete
    (logged, checkpointed), before it starts the next one (until ``go`` exists, if given)."""

    class HangTrainer(base):
        def train_step(self):
            if self.step == step:
                _hang(f"step:{step}", go)
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
            hang: str = "", go: str = "") -> None:
    """Install the faults with ``setattr_`` (``monkeypatch.setattr`` in a test, plain ``setattr``
    in a subprocess). ``go``: the file that ends a ``step:N`` hang."""
    from ebmscale import checkpoint, trainer

    cls = trainer.Trainer
    if nan_at:
        cls = nan_trainer(cls, nan_at, nan_repeats)
    if hang:
        where, _, n = hang.partition(":")
        if where == "step":
            cls = hang_trainer(cls, int(n), go)
        elif where == "save":
            setattr_(checkpoint, "write_marker", hang_before_marker(checkpoint.write_marker, int(n)))
        else:
            raise ValueError(f"--hang must be step:N or save:N, got {hang!r}")
    if cls is not trainer.Trainer:
        setattr_(trainer, "Trainer", cls)


def main(argv: list[str] | None = None) -> int:
    """``[--nan-at N] [--nan-repeats R] [--hang step:N|save:N [--go FILE]] [--] <ebmscale args>`` (the fault
    options are told apart by name, so ``--`` may be left out, e.g. under ``accelerate launch``)."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m tests.faults")
    p.add_argument("--nan-at", type=int, default=0)
    p.add_argument("--nan-repeats", type=int, default=1)
    p.add_argument("--hang", default="")
    p.add_argument("--go", default="", help="a step:N hang ends when this file exists (a pause)")
    if "--" in argv:
        split = argv.index("--")
        args, rest = p.parse_args(argv[:split]), argv[split + 1:]
    else:
        args, rest = p.parse_known_args(argv)
    if args.go and not args.hang.startswith("step:"):
        p.error("--go needs --hang step:N")
    install(setattr, args.nan_at, args.nan_repeats, args.hang, args.go)
    from ebmscale import cli

    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
