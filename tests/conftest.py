import os
import sys

import pytest
import torch

# Tests use tiny tensors on 2 (often shared) cores: one thread is as fast and never oversubscribes.
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cli_env(tmp_path):
    """Environment for CLI subprocesses: the repo on the path, caches under tmp."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(args, env, cwd, timeout=600):
    import subprocess

    return subprocess.run([sys.executable, "-m", "ebmscale.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
