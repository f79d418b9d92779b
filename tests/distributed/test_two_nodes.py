"""Two "machines" on one host: two network namespaces joined by a veth pair, each with an address
of its own, one Ray node and one ``accelerate launch`` machine each (``--num_machines 2``, one
process per machine, rendezvous at the first namespace's address).

Checked: the Ray worker in the second namespace joins the head in the first with the cluster's
token; a client without it is refused across the veth; both ranks share one buffer whose two
shards sit on the two Ray nodes; a write-back by the rank of the second machine is drawn by the
rank of the first; with ``buffer.mixing=affine`` each rank's draws are served node-locally except
for the mixing fraction (share measured and printed); training ends on both.

Needs root and iproute2 (``ip netns``); skipped with the reason where namespaces cannot be made.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.distributed.dp_scenarios import REPO
from tests.distributed.test_slurm_ray import _ours

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Namespaces A and B, with addresses 10.231.N.1 and .2 on a veth pair; yields (ns, ip) pairs."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed")
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.231.{os.getpid() % 250}"
    hosts = [(f"eba{tag}", f"{subnet}.1", f"vea{tag}"), (f"ebb{tag}", f"{subnet}.2", f"veb{tag}")]
    made = []
    try:
        for ns, _, _ in hosts:
            r = _ip("netns", "add", ns)
            if r.returncode:
                pytest.skip(f"cannot create network namespaces here: {r.stderr.strip()}")
            made.append(ns)
        steps = [("link", "add", hosts[0][2], "type", "veth", "peer", "name", hosts[1][2])]
        for ns, addr, dev in hosts:
            steps += [("link", "set", dev, "netns", ns), ("-n", ns, "addr", "add", f"{addr}/24", "dev", dev),
                      ("-n", ns, "link", "set", dev, "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            r = _ip(*step)
            if r.returncode:
                pytest.skip(f"cannot wire the namespaces (ip {' '.join(step)}): {r.stderr.strip()}")
        yield hosts
    finally:
        for ns in made:
            _ip("netns", "del", ns)  # takes its end of the veth pair along


def _popen(ns: str, cmd: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=env, cwd=REPO, start_new_session=True, **kw)


def _stop(proc: subprocess.Popen) -> None:
    """End a process group this test started: SIGTERM, and SIGKILL for whatever of the group is
    left after 20 s (a Ray node's processes outlive the script that started them)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            continue
        break
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass


def test_two_machines_share_one_buffer_across_namespaces(two_hosts, tmp_path):
    (ns_a, ip_a, dev_a), (ns_b, ip_b, dev_b) = two_hosts
    root = tempfile.mkdtemp(prefix="ebn", dir="/tmp")  # short: Ray puts unix sockets under it
    token = os.path.join(root, "cluster.token")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ACCELERATE_"))}
    base.update(PYTHONPATH=REPO + os.pathsep + base.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1", HOME=str(tmp_path / "home"), RAY_AUTH_TOKEN_PATH=token,
                RAY_BIN=os.path.join(os.path.dirname(sys.executable), "ray"))
    env = {ns: dict(base, RAY_TMPDIR=os.path.join(root, ns), RAY_NODE_IP=ip, GLOO_SOCKET_IFNAME=dev)
           for ns, ip, dev in two_hosts}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_popen(ns_a, ["bash", "launch/ray/head.sh", "--block"], env[ns_a], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL))
        wait = [sys.executable, "-c", f"from ebmscale.buffer.ray_host import wait_for_nodes as w; w('{ip_a}:6379', 1)"]
        assert subprocess.run(["ip", "netns", "exec", ns_a, *wait], env=env[ns_a], cwd=REPO, timeout=300).returncode == 0
        procs.append(_popen(ns_b, ["bash", "launch/ray/worker.sh", f"{ip_a}:6379", "--block"], env[ns_b],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait[-1] = wait[-1].replace(", 1)", ", 2)")
        assert subprocess.run(["ip", "netns", "exec", ns_b, *wait], env=env[ns_b], cwd=REPO, timeout=300).returncode == 0
        # A client in the other namespace without the token is refused by the head.
        probe = subprocess.run(["ip", "netns", "exec", ns_b, sys.executable, "-c",
                                f"import ray; ray.init(address='{ip_a}:6379'); print('joined')"],
                               env={k: v for k, v in env[ns_b].items() if not k.startswith("RAY_AUTH")}, cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
        assert probe.returncode != 0 and "joined" not in probe.stdout, probe.stdout + probe.stderr[-2000:]
        launches = []
        for machine, (ns, _, _) in enumerate(two_hosts):
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   os.path.join(REPO, "launch", "accelerate", "cpu_gloo.yaml"), "--num_machines", "2",
                   "--num_processes", "2", "--machine_rank", str(machine), "--main_process_ip", ip_a,
                   "--main_process_port", "29500", os.path.join(REPO, "tests", "distributed", "ray_scenarios.py"),
                   str(tmp_path), f"buffer.ray_address={ip_a}:6379", "train.precision=fp32", "buffer.mixing=affine"]
            launches.append(_popen(ns, cmd, env[ns], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        procs += launches
        logs = [p.communicate(timeout=480)[0] for p in launches]
        assert [p.returncode for p in launches] == [0, 0], "\n".join(log[-4000:] for log in logs)
        r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
        assert (r0["world"], r0["steps"], r1["steps"]) == (2, 6, 6)
        assert r0["cross"]["seen"] and r0["cross"]["num_shards"] == 2
        assert r0["cross"]["shard_nodes"] == 2  # one shard on each machine's Ray node
        # Node-local draws: 1 - mix_fraction (0.75) from this node's shard, plus half of the mixed
        # quarter (the shards are equal): 0.875 expected, binomial sd 0.005 over 4,000 starts.
        for r in (r0, r1):
            assert abs(r["cross"]["local_share"] - 0.875) < 0.03, r["cross"]
        print("node-local share of draws:", r0["cross"]["local_share"], r1["cross"]["local_share"])
        for p in procs[:2]:  # both Ray nodes stop, nothing of them is left
            _stop(p)
        assert not _ours(root)
    finally:
        for p in reversed(procs):
            _stop(p)
        for pid in _ours(root):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
