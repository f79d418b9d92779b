"""Half precision on 2 real ranks, forced (so it runs the same on every CPU; emulated bf16 is slower
but correct): fp16 DDP training with both loss scalers, and DeepSpeed ZeRO-1 / ZeRO-2 in bf16 with
spectral norm -- which crashed at the first forward before the fix (DeepSpeed casts parameters but
not the spectral-norm vectors) -- including a checkpoint save and a resume that reproduces the
uninterrupted run's losses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.distributed.dp_scenarios import REPO, _free_port, launch


def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_fp16_ddp_two_ranks_learn_with_loss_and_input_gradient_scaling(tmp_path):
    ranks = launch("fp16", str(tmp_path), "cpu_gloo.yaml")
    learn = ranks[0]["fp16"]
    assert learn["steps"] == ranks[1]["fp16"]["steps"] == 150
    assert learn["auc"] > 0.8, learn  # data scored below uniform points over the box
    assert learn["chain_nll_median"] < learn["uniform_nll_median"] - 3.0, learn
    rows = _rows(os.path.join(str(tmp_path), "fp16"))
    assert [r["step"] for r in rows] == list(range(1, 151))
    skipped = [r["skipped_step"] for r in rows]
    scales = [r["grad_scale"] for r in rows]
    # The decision is global (gradients are all-reduced before the overflow check): every step is
    # skipped on both ranks or on neither, so the logged mean is exactly 0 or 1.
    assert set(skipped) <= {0.0, 1.0}
    # GradScaler starts at 2^16; each overflow skips the update and halves the scale (a back-off);
    # no growth within 2,000 clean steps. So back-offs == skipped steps, and a few happen at the start.
    backoffs = sum(b < a for a, b in zip([65536.0] + scales, scales))
    assert sum(skipped) == backoffs >= 1, (skipped, scales)
    assert all(b <= a for a, b in zip([65536.0] + scales, scales))
    assert all(r["sampler_grad_scale"] > 0 for r in rows)
    assert all(r["grad_norm"] is None or r["grad_norm"] < 1e3 for r in rows if r["skipped_step"] == 0)


def _accelerate_train(config: str, run_dir: str, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """The issue's command: ``accelerate launch --config_file launch/accelerate/<config> --num_processes 2
    -m ebmscale.cli train --config configs/toy_8gaussians.yaml ...`` (DeepSpeed on gloo)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DS_"))}
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.path.join(REPO, ".cache", "torch_extensions"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "launch", "accelerate", config), "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(_free_port()), "-m", "ebmscale.cli", "train",
           "--config", os.path.join(REPO, "configs", "toy_8gaussians.yaml"), "--run-dir", run_dir,
           "train.threads=1", "train.precision=bf16", "model.spectral_norm=true", "train.progress=false",
           "train.tensorboard=false", "data.toy_train_size=2000", "train.sample_every=0", *overrides]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


@pytest.mark.slow
def test_deepspeed_zero1_bf16_with_spectral_norm_trains(tmp_path):
    run = str(tmp_path / "zero1")
    proc = _accelerate_train("deepspeed_zero1.yaml", run, "train.steps=6", "train.log_every=2")
    assert "deepspeed ZeRO-1 x2 on cpu (gloo), precision bf16" in proc.stdout + proc.stderr
    rows = _rows(run)
    assert [r["step"] for r in rows] == [2, 4, 6] and all(abs(r["loss"]) < 1e3 for r in rows)


@pytest.mark.slow
def test_deepspeed_zero2_bf16_checkpoint_resume_repeats_the_uninterrupted_run(tmp_path):
    """ZeRO-2 bf16 on 2 ranks: 6 steps with a checkpoint at step 3, and a second run resumed from that
    checkpoint (its ZeRO shards, module weights, buffer, data position and RNG) for steps 4-6. The
    resumed steps' losses and energies equal the uninterrupted run's bit for bit: DeepSpeed's
    checkpoint holds the bf16 module and the fp32 master weights and optimizer state exactly."""
    full = str(tmp_path / "full")
    # The in-process buffer: with the global Ray buffer two ranks' write-backs land in either order,
    # which is not bitwise repeatable (docs/checkpoints.md).
    resume_args = ("train.steps=6", "train.checkpoint_every=3", "train.log_every=1", "buffer.backend=local")
    _accelerate_train("deepspeed_zero2.yaml", full, *resume_args)
    ck = os.path.join(full, "checkpoints", "step-3")
    assert sorted(os.listdir(ck)) == ["COMPLETE", "deepspeed", "rank-00000.pt", "rank-00001.pt", "shared.pt"]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(full, "checkpoints", "step-3"), os.path.join(resumed, "checkpoints", "step-3"))
    _accelerate_train("deepspeed_zero2.yaml", resumed, *resume_args, "--resume", "auto")
    want = {r["step"]: r for r in _rows(full)}
    got = _rows(resumed)
    assert [r["step"] for r in got] == [4, 5, 6]
    for r in got:
        for k in ("loss", "e_pos", "e_neg", "grad_norm"):
            assert r[k] == want[r["step"]][k], (r["step"], k, r[k], want[r["step"]][k])
