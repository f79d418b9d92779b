"""The documented launch commands, run for real on 2 CPU ranks: the SLURM script (one node, with
``srun``/``scontrol`` stand-ins that run the per-node command as SLURM would) and plain torchrun.
Each trains the CLI for a few steps on a 2-D toy set."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from tests.distributed.dp_scenarios import REPO, _free_port

TOY = ["model.width=16", "model.depth=2", "data.batch_size=16", "buffer.capacity=64", "data.toy_train_size=1000",
       "sampler.steps=3", "train.steps=10", "train.log_every=5", "train.checkpoint_every=0", "train.sample_every=0",
       "train.threads=1", "train.progress=false", "train.tensorboard=false", "buffer.backend=local"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SLURM_"))}
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _check_run(proc: subprocess.CompletedProcess, run_dir) -> None:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "data parallel: ddp x2 on cpu (gloo)" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 10
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        assert [json.loads(line)["step"] for line in fh] == [5, 10]


def _script(path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_on_one_node(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    _script(shims / "scontrol", 'echo localhost\n')
    # srun: drop its options, run the per-node command once (this "node" is SLURM_NODEID=0).
    _script(shims / "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    pyenv = tmp_path / "pyenv"
    (pyenv / "bin").mkdir(parents=True)
    (pyenv / "bin" / "activate").write_text(f'export PATH="{os.path.dirname(sys.executable)}:$PATH"\n')
    env = _env()
    env.update(PATH=f"{shims}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
               SLURM_NODEID="0", SLURM_SUBMIT_DIR=REPO, SLURM_JOB_NAME="test", SLURM_CPUS_PER_TASK="2",
               GPUS_PER_NODE="2", ACCEL_CONFIG="launch/accelerate/cpu_gloo.yaml", RUN_DIR=str(tmp_path / "run"),
               PYTHON_ENV=str(pyenv), MAIN_PORT=str(_free_port()))
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm", "train.sbatch"), "configs/toy_8gaussians.yaml",
                           *TOY], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    _check_run(proc, tmp_path / "run")


def test_torchrun(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "ebmscale.cli", "train",
                           "--config", "configs/toy_8gaussians.yaml", "--run-dir", str(tmp_path / "run"), *TOY],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    _check_run(proc, tmp_path / "run")
