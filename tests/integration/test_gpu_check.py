"""benchmarks/gpu_check.py, the one-command GPU check: one clear line where there is no GPU, and every
part's code path run at toy sizes on the CPU (all but CUDA itself)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_without_a_gpu_it_exits_at_once_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "x.json")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "x.json").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device"), proc.stderr


@pytest.mark.slow
def test_every_part_runs_at_toy_size_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           # DeepSpeed's JIT-built shared-memory op, cached like the distributed tests' (first build ~1 min)
           "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".cache", "torch_extensions")}
    env = {k: v for k, v in env.items() if not k.startswith(("ACCELERATE_", "DS_"))}
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report["parts"]) == {"sampler", "train", "deepspeed", "fid", "resume"} and not report["skipped"]
    for name, part in report["parts"].items():
        assert not (isinstance(part["result"], dict) and "error" in part["result"]), (name, part)
    rows = report["parts"]["sampler"]["result"]
    assert {(r["dtype"], r["mode"]) for r in rows} == {("fp32", "eager"), ("bf16", "eager"), ("fp16", "eager")}
    assert all("error" not in r and r["tflops"] > 0 and r["image_steps_per_s"] > 0 for r in rows), rows
    assert report["parts"]["train"]["result"]["runtime"]["precision"] == "bf16"
    assert report["parts"]["deepspeed"]["result"]["parallel"].startswith("deepspeed ZeRO-2 x1")
    assert report["parts"]["fid"]["result"]["images"] == 8
    assert report["parts"]["resume"]["result"]["bitwise"] is True
