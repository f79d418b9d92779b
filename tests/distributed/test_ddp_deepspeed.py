"""DeepSpeed ZeRO-2 through accelerate: 2 gloo processes started by ``accelerate launch`` with
launch/accelerate/deepspeed_zero2.yaml (so the ZeRO template is launch/deepspeed/zero2.json and
``train.distributed=auto`` picks DeepSpeed from the launcher).

ZeRO-2 shards optimizer state and gradients but must train exactly what one process with the
global batch trains, keep the ranks' module weights identical, and leave the sampler free of
collectives (ZeRO-1/2 never partition the weights the sampler reads). The first run on a fresh
checkout JIT-compiles DeepSpeed's shared-memory op (about 30-120 s) into .cache/torch_extensions.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.dp_scenarios import launch, reference

TOL = 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return launch("deepspeed", str(tmp_path_factory.mktemp("zero2")), "deepspeed_zero2.yaml")


def test_zero2_engine_from_the_accelerate_config(ranks):
    for r in ranks:
        assert r["wrapper"] == "DeepSpeedEngine" and r["parallel"].startswith("deepspeed ZeRO-2 x2 on cpu")
        assert r["param_dtype"] == "torch.float32"


def test_zero2_ranks_identical_no_sampler_collectives_and_equal_to_one_process(ranks, tmp_path_factory):
    r0, r1 = ranks
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert all(torch.equal(a, b) for a, b in zip(r0["sn_u"], r1["sn_u"]))
    assert r0["sampler_collectives"] == r1["sampler_collectives"] == 0
    ref = reference(str(tmp_path_factory.mktemp("ref")))
    for name, p in ref["params"].items():
        assert float((r0["params"][name] - p).abs().max()) < TOL, name
    for got, want in zip(r0["logged"], ref["logged"]):
        for k in ("loss", "e_pos", "e_neg", "grad_norm"):
            assert abs(got[k] - want[k]) < TOL * max(1.0, abs(want[k])), (k, got[k], want[k])


_DIVERGE = """
import sys, torch
from ebmscale.config import load_config
from ebmscale.trainer import DivergenceError, Trainer
cfg = load_config(None, ["data.dataset=8gaussians", "model.arch=mlp", "model.width=8", "model.depth=2",
                         "data.batch_size=16", "buffer.capacity=32", "data.toy_train_size=500", "sampler.steps=2",
                         "train.threads=1", "train.progress=false", "train.tensorboard=false", "train.device=cpu",
                         "buffer.backend=local", "train.precision=fp32", "train.distributed=deepspeed",
                         "train.max_abs_energy=1e-9"])
tr = Trainer(cfg, sys.argv[1])
assert tr.parallel.is_deepspeed and type(tr.wrapped).__name__ == "DeepSpeedEngine"
before = {k: v.clone() for k, v in tr.model.state_dict().items()}
try:
    tr.train_step()
except DivergenceError as exc:
    print("diverged:", exc)
print("unchanged:", all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items()))
"""


def test_divergence_is_caught_before_the_deepspeed_update(tmp_path):
    """One process under DeepSpeed ZeRO-2 (a process of its own: accelerate's state is process-wide):
    an energy over train.max_abs_energy stops the step between backward and the engine's step,
    so the weights are those before the step."""
    import os
    import subprocess
    import sys

    from tests.distributed.dp_scenarios import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DS_"))}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.path.join(REPO, ".cache", "torch_extensions"))
    r = subprocess.run([sys.executable, "-c", _DIVERGE, str(tmp_path)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "diverged: training diverged at step 0: e_pos=" in r.stdout and "unchanged: True" in r.stdout, r.stdout


@pytest.fixture(scope="module")
def accumulating(tmp_path_factory) -> list[dict]:
    return launch("deepspeed_accumulate", str(tmp_path_factory.mktemp("zero2_accum")), "deepspeed_zero2.yaml")


def test_zero2_gradient_accumulation_matches_one_process_with_the_global_batch(accumulating, tmp_path_factory):
    # 2 ranks x gradient_accumulation_steps 2 x B/2 = 1 process x 2B.
    from tests.distributed.test_ddp import assert_matches_reference

    ref = reference(str(tmp_path_factory.mktemp("ref")))
    r0, r1 = accumulating
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    for r in accumulating:
        assert_matches_reference(r, ref)
