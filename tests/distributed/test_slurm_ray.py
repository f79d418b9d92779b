"""launch/slurm/train.sbatch brings its own Ray cluster on two nodes, run on one host with
stand-in ``srun``/``scontrol`` that run the per-node commands locally (each "node" with a /tmp of
its own for Ray and ports of its own): head on the first node, a worker on the second, the token
in a 0600 file, every node joined before training, ``buffer.ray_address`` passed, two
``accelerate launch`` machines train on the shared buffer, and Ray is stopped at the end."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from ebmscale.checkpoint import StepCheckpoint, find_resume
from tests.distributed.dp_scenarios import REPO, _free_port
from tests.distributed.test_ddp_launchers import _env, _script

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

NODES = ["localhost", "127.0.0.1"]  # two names for this host, both resolvable: the two "nodes"
TOY = ["model.width=16", "model.depth=2", "data.batch_size=16", "buffer.capacity=64", "data.toy_train_size=1000",
       "sampler.steps=3", "train.steps=6", "train.log_every=3", "train.checkpoint_every=3", "train.sample_every=0",
       "train.threads=1", "train.progress=false", "train.tensorboard=false", "train.precision=fp32",
       "buffer.backend=ray"]

SRUN = r'''
# Stand-in for srun on one host: options are dropped except -w NODE; without -w the command runs
# once per node, in parallel (SLURM_NODEID = the node's index). Each node has its own RAY_TMPDIR
# (its /tmp) and its own Ray ports (NODE<i>_RAY_ARGS).
node=""
while [[ "$1" == -* ]]; do
  case "$1" in
    -w) node="$2"; shift 2 ;;
    --nodelist=*) node="${1#*=}"; shift ;;
    *) shift ;;
  esac
done
names=(NODE_NAMES)
run_on() {
  local i=$1; shift
  local extra="NODE${i}_RAY_ARGS"
  mkdir -p "$FAKE_ROOT/node$i"
  SLURM_NODEID=$i RAY_TMPDIR="$FAKE_ROOT/node$i" RAY_START_ARGS="${!extra}" "$@"
}
if [[ -n "$node" ]]; then
  for i in "${!names[@]}"; do
    if [[ "${names[$i]}" == "$node" ]]; then run_on "$i" "$@"; exit $?; fi
  done
  echo "srun stand-in: unknown node $node" >&2; exit 1
fi
pids=()
for i in "${!names[@]}"; do run_on "$i" "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
'''


def _ours(root: str) -> list[int]:
    """Live processes whose command line names ``root`` (this test's Ray nodes)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if root.encode() in fh.read():
                        out.append(int(entry))
            except OSError:
                pass
    return out


def test_sbatch_starts_and_stops_its_own_ray_on_two_nodes(tmp_path):
    root = tempfile.mkdtemp(prefix="ebs", dir="/tmp")  # short: Ray puts unix sockets under it
    shims = tmp_path / "bin"
    shims.mkdir()
    _script(shims / "scontrol", "".join(f"echo {n}\n" for n in NODES))
    _script(shims / "srun", SRUN.replace("NODE_NAMES", " ".join(NODES)))
    pyenv = tmp_path / "pyenv"
    (pyenv / "bin").mkdir(parents=True)
    (pyenv / "bin" / "activate").write_text(f'export PATH="{os.path.dirname(sys.executable)}:$PATH"\n')
    token = os.path.join(root, "cluster.token")
    env = {k: v for k, v in _env().items() if not k.startswith("RAY_")}
    env.update(PATH=f"{shims}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="fake[0-1]", SLURM_NNODES="2",
               SLURM_SUBMIT_DIR=REPO, SLURM_JOB_NAME="test", SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="2",
               GPUS_PER_NODE="1", ACCEL_CONFIG="launch/accelerate/cpu_gloo.yaml", RUN_DIR=str(tmp_path / "run"),
               PYTHON_ENV=str(pyenv), MAIN_PORT=str(_free_port()), FAKE_ROOT=root, HOME=str(tmp_path / "home"),
               RAY_PORT=str(_free_port()), RAY_AUTH_TOKEN_PATH=token, RAY_STATE=os.path.join(root, "state"),
               RAY_BIN=os.path.join(os.path.dirname(sys.executable), "ray"),
               NODE0_RAY_ARGS=f"--dashboard-agent-listen-port {_free_port()} --ray-client-server-port {_free_port()}",
               NODE1_RAY_ARGS=f"--dashboard-agent-listen-port {_free_port()}")
    try:
        proc = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm", "train.sbatch"),
                               "configs/toy_8gaussians.yaml", *TOY], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=600, start_new_session=True)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-6000:]
        assert "ebmscale: ray cluster of 2 nodes at " in proc.stdout
        assert "data parallel: ddp x2 on cpu (gloo)" in proc.stdout
        assert json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])["steps"] == 6
        ck = StepCheckpoint(find_resume(str(tmp_path / "run")))
        assert ck.step == 6 and ck.world == 2
        assert sum(n.endswith(".json") for n in ck.files if n.startswith("buffer/")) == 2  # one file set per shard
        assert "ebmscale: ray cluster stopped" in proc.stdout
        assert not os.path.exists(token) and not _ours(root)  # Ray stopped on both nodes, token removed
        assert not (tmp_path / "home").exists() or not any(
            "ray" in n.lower() for _, d, f in os.walk(tmp_path / "home") for n in d + f)
    finally:
        for pid in _ours(root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
