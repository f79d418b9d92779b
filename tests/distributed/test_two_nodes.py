"""Two training "machines" and a buffer-only Ray node on one host. Each machine is a network
namespace with an address of its own on one Ethernet segment (a Linux bridge in the first, a veth
pair from it to each of the others) and a PID namespace of its own (Ray's driver attaches to the
raylet it sees in /proc: with one PID namespace every rank would take the head's). A: the Ray head
and ``accelerate launch`` machine 0; B: a Ray worker and machine 1; C: a Ray worker that carries
no training rank, only a shard of the buffer. Training is the real CLI, run the way the README
tells cluster users (``accelerate launch --config_file launch/accelerate/multi_node.yaml
--num_machines 2 --machine_rank 0|1 --main_process_ip A ... -m ebmscale.cli train ... --resume auto
buffer.ray_address=auto``), one rank per machine, gloo over the bridge, ``buffer.shards=3``.

Checked, in one run of the cluster:

1. the Ray workers join the head with the cluster's token; a client without it is refused;
2. the three shards sit on the three Ray nodes and each rank on its own machine's node; chains
   written back by machine 1's rank are drawn by machine 0's; with ``buffer.mixing=affine`` each
   rank's draws are served by its own node's shard except for the mixing fraction (share
   measured and printed);
3. machine C dies after the step-4 checkpoint (SIGKILL to its init, which takes its Ray node and
   the shard's worker process along); both machines train on to the last step, the lost shard is
   re-created once on A or B (the checkpoints after the loss hold every chain) and
   ``buffer_restarts`` counts it once;
4. a continuation is killed with SIGKILL at step 18 (both launchers: their ranks stop by
   themselves through the parent watch; then machines A and B, with their Ray nodes); the
   machines and the cluster are started again and ``--resume auto`` on both continues from the
   newest complete checkpoint on disk (step 16) with the buffer's number of chains unchanged, to
   the last step.

Steps 1-2 run inside the CLI through ``tests/distributed/ray_scenarios.py --cli`` (a trainer
subclass that makes the cross-rank write and counts node-local draws at step 2), the pause and
the hang through ``tests.faults``. Needs root, iproute2 (``ip netns``) and util-linux
(``unshare``, ``nsenter``); skipped with the reason where namespaces cannot be made.
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

import numpy as np
import pytest

from ebmscale.buffer.client import split_capacity
from ebmscale.checkpoint import StepCheckpoint, find_resume, list_checkpoints, step_dir
from tests.distributed.dp_scenarios import REPO
from tests.distributed.test_checkpoint_kill import _descendants, _kill_tree
from tests.distributed.test_run_guard import _alive

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

TOY = ["--config", "configs/toy_8gaussians.yaml", "model.width=16", "model.depth=2", "data.batch_size=16",
       "data.toy_train_size=1000", "sampler.steps=3", "train.log_every=2", "train.checkpoint_every=4",
       "train.sample_every=0", "train.keep_checkpoints=10", "train.threads=1", "train.progress=false",
       "train.tensorboard=false", "train.device=cpu", "train.precision=fp32", "buffer.backend=ray",
       "buffer.ray_address=auto", "buffer.capacity=64", "buffer.shards=3", "buffer.mixing=affine"]
CHAINS = 64 * 2  # buffer.capacity x ranks
# Prints the number of live Ray nodes once it reaches the number read from each input line (a
# ConfigError, retried, until the head answers).
WATCH = """
import sys, time
import ray
from ebmscale.buffer.ray_host import ConfigError, connect_cluster
deadline = time.monotonic() + 120
while True:
    try:
        connect_cluster('auto', 'ebmscale-test-watch')
        break
    except ConfigError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
for line in sys.stdin:
    deadline = time.monotonic() + 120
    while (alive := sum(1 for n in ray.nodes() if n.get('Alive'))) < int(line) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(alive, flush=True)
"""


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def three_hosts():
    """Namespaces A, B, C with addresses 10.231.N.1, .2, .3: a bridge in A carries A's address, and
    a veth pair joins it to each of B and C. Yields (namespace, address, device) for each."""
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            pytest.skip(f"{package} ('{tool}') is not installed")
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.231.{os.getpid() % 250}"
    hosts = [(f"eb{h}{tag}", f"{subnet}.{i + 1}", f"{'br' if h == 'a' else 've'}{h}{tag}") for i, h in enumerate("abc")]
    made = []
    try:
        for ns, _, _ in hosts:
            r = _ip("netns", "add", ns)
            if r.returncode:
                pytest.skip(f"cannot create network namespaces here: {r.stderr.strip()}")
            made.append(ns)
        (ns_a, ip_a, bridge), others = hosts[0], hosts[1:]
        steps = [("-n", ns_a, "link", "add", bridge, "type", "bridge"),
                 ("-n", ns_a, "addr", "add", f"{ip_a}/24", "dev", bridge), ("-n", ns_a, "link", "set", bridge, "up"),
                 ("-n", ns_a, "link", "set", "lo", "up")]
        for ns, addr, dev in others:
            port = "p" + dev  # A's end of the pair, a port of the bridge
            steps += [("-n", ns_a, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns),
                      ("-n", ns_a, "link", "set", port, "master", bridge), ("-n", ns_a, "link", "set", port, "up"),
                      ("-n", ns, "addr", "add", f"{addr}/24", "dev", dev), ("-n", ns, "link", "set", dev, "up"),
                      ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            r = _ip(*step)
            if r.returncode:
                pytest.skip(f"cannot wire the namespaces (ip {' '.join(step)}): {r.stderr.strip()}")
        yield hosts
    finally:
        for ns in made:
            _ip("netns", "del", ns)  # takes its devices along (the bridge, its end of each pair)


def _boot(ns: str) -> tuple[subprocess.Popen, int]:
    """A "machine": network namespace ``ns`` and a PID namespace of its own (with a /proc that shows
    only it), whose init is an idle ``sleep``. Ray's driver finds its node's raylet by scanning the
    processes it can see: with one PID namespace for all, every rank would pick the head's. Killing
    the init kills everything on the machine. Returns the ``unshare`` process and the init's pid."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--mount-proc", "sleep", "3600"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (init := _descendants(proc.pid)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not init:
        proc.kill()
        pytest.skip(f"cannot create a PID namespace here: {proc.communicate()[1].strip()}")
    return proc, init[0]


def _popen(init: int, cmd: list[str], env: dict, wd: str = REPO, **kw) -> subprocess.Popen:
    """``cmd`` in directory ``wd`` on the machine whose init is ``init`` (``nsenter`` forks it
    there: the command is the ``nsenter`` process's child), in a session of its own."""
    return subprocess.Popen(["nsenter", "-t", str(init), "-p", "-m", "-n", f"--wd={wd}", *cmd], env=env,
                            start_new_session=True, **kw)


def _in_netns(ns: str) -> list[int]:
    """Live processes in network namespace ``ns`` (on one host, what runs on that "machine")."""
    inode = os.stat(f"/run/netns/{ns}").st_ino
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/net") == f"net:[{inode}]" and _alive(int(entry)):
                out.append(int(entry))
        except OSError:
            pass
    return out


def _kill_netns(ns: str) -> list[int]:
    """SIGKILL every process in network namespace ``ns`` (a machine lost) until none is left;
    returns those still there after 30 s."""
    deadline = time.monotonic() + 30
    while (left := _in_netns(ns)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return left


def _wait_for(launches: list[subprocess.Popen], text: str, keep) -> list[str]:
    """Read each launcher's output until a line with ``text``; when one ends first, stop them
    all and fail with their logs (also written to ``keep``/machine<m>.log)."""
    logs = [""] * len(launches)
    for m, proc in enumerate(launches):
        while text not in logs[m]:
            line = proc.stdout.readline()
            if not line:
                for p in launches:
                    _kill_tree(p.pid)
                logs = [log + p.communicate(timeout=60)[0] for log, p in zip(logs, launches)]
                for n, log in enumerate(logs):
                    (keep / f"machine{n}.log").write_text(log)
                pytest.fail(f"machine {m}'s run ended before '{text}' (logs in {keep}):\n" +
                            "\n".join(log[-3000:] for log in logs))
            logs[m] += line
    return logs


def _chains(path: str) -> int:
    """Chains in a checkpoint's buffer shard files."""
    ck = StepCheckpoint(path)
    return sum(len(np.load(os.path.join(path, n), mmap_mode="r")) for n in ck.files
               if n.startswith("buffer/") and n.endswith(".npy") and n.count(".") == 1)


def test_two_machines_and_a_buffer_node_survive_node_loss_and_sigkill(three_hosts, tmp_path):
    t_start = time.monotonic()
    ip_a = three_hosts[0][1]
    root = tempfile.mkdtemp(prefix="ebn", dir="/tmp")  # short: Ray puts unix sockets under it
    token = os.path.join(root, "cluster.token")
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ACCELERATE_"))}
    base.update(PYTHONPATH=REPO + os.pathsep + base.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1", HOME=str(tmp_path / "home"), RAY_AUTH_TOKEN_PATH=token,
                RAY_BIN=os.path.join(os.path.dirname(sys.executable), "ray"))

    def env(host: int, cluster: int) -> dict:
        """Host ``host``'s environment for the ``cluster``-th start of Ray. One RAY_TMPDIR for all
        hosts, as every node of a real cluster has /tmp: a worker node takes the head's temp
        directory and records the cluster there (what ``buffer.ray_address=auto`` reads)."""
        _, ip, dev = three_hosts[host]
        return dict(base, RAY_TMPDIR=os.path.join(root, f"ray{cluster}"), RAY_NODE_IP=ip, GLOO_SOCKET_IFNAME=dev)

    def node(host: int, cluster: int) -> subprocess.Popen:
        """Start host ``host``'s Ray node (the head on A); its output goes to a log file beside the run."""
        cmd = ["launch/ray/head.sh"] if host == 0 else ["launch/ray/worker.sh", f"{ip_a}:6379"]
        # The head checks its nodes every second (Ray's default, 3 s, x 5 failed checks before a
        # node counts as dead, would add some 10 s to the test).
        extra = {"RAY_health_check_period_ms": "1000"} if host == 0 else {}
        with open(tmp_path / f"ray-{three_hosts[host][0]}-{cluster}.log", "w") as fh:
            return _popen(machines[host], ["bash", *cmd, "--block"], dict(env(host, cluster), **extra), stdout=fh,
                          stderr=subprocess.STDOUT)

    def start_cluster(hosts: list[int], cluster: int) -> list[subprocess.Popen]:
        """The head, then one worker at a time, each once the head lists the one before: on one
        host the workers share the head's session directory (Ray takes it from the head), and
        two raylets starting at once can pick the same socket names."""
        for h in hosts:
            booted, machines[h] = _boot(three_hosts[h][0])
            procs.append(booted)
        nodes = [node(0, cluster)]
        watch = _popen(machines[0], [sys.executable, "-c", WATCH], env(0, cluster), stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for n, h in enumerate(hosts):
                if n:
                    nodes.append(node(h, cluster))
                watch.stdin.write(f"{n + 1}\n")
                watch.stdin.flush()
                alive = watch.stdout.readline()
                assert alive.strip() == str(n + 1), alive + watch.stdout.read()[-2000:] + "".join(
                    f"\n{f.name}:\n{f.read_text()[-2000:]}" for f in sorted(tmp_path.glob(f"ray-*-{cluster}.log")))
        finally:
            watch.stdin.close()
            watch.wait(timeout=60)
        return nodes

    def launch(machine: int, cluster: int, entry: list[str], *args: str, port: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(REPO, "launch", "accelerate", "multi_node.yaml"), "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(machine), "--main_process_ip", ip_a,
               "--main_process_port", str(port), *entry, "train", "--run-dir", str(run_dir), "--resume", "auto",
               *TOY, *args]
        return _popen(machines[machine], cmd, env(machine, cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True)

    def power_off(host: int) -> None:
        """Machine ``host`` dies: SIGKILL to its init takes every process on it along."""
        os.kill(machines[host], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _in_netns(three_hosts[host][0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _in_netns(three_hosts[host][0]), f"processes outlived machine {host}"

    def finish(launches: list[subprocess.Popen], logs: list[str]) -> list[str]:
        logs = [log + p.communicate(timeout=480)[0] for p, log in zip(launches, logs)]
        for m, log in enumerate(logs):  # kept beside the run, for a failure
            with open(tmp_path / f"machine{m}.log", "a") as fh:
                fh.write(log)
        assert [p.returncode for p in launches] == [0, 0], "\n".join(log[-4000:] for log in logs)
        return logs

    procs: list[subprocess.Popen] = []
    machines: dict[int, int] = {}  # host -> the pid of its init (see _boot)
    timings: dict[str, float] = {}
    try:
        nodes = start_cluster([0, 1, 2], 0)
        procs += nodes
        timings["cluster up"] = time.monotonic() - t_start
        # 1. A client on another machine without the token is refused by the head (it would
        # retry for 20 s; two tries are enough to read the head's answer).
        probe_env = {k: v for k, v in env(1, 0).items() if not k.startswith("RAY_AUTH")}
        join = f"import ray; ray.init(address='{ip_a}:6379'); print('joined')"
        probe = _popen(machines[1], [sys.executable, "-c", join],
                       dict(probe_env, RAY_gcs_server_port_wait_time_s="2"), wd=str(tmp_path), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
        said, err = probe.communicate(timeout=300)
        assert probe.returncode != 0 and "joined" not in said, said + err[-2000:]
        assert "Authentication token is missing or incorrect" in err, err[-2000:]
        timings["probe refused"] = time.monotonic() - t_start

        # 2-3. Twelve steps; after the step-4 checkpoint every rank pauses, C's Ray node is killed.
        go = str(tmp_path / "go")
        scenario = [os.path.join(REPO, "tests", "distributed", "ray_scenarios.py"), "--cli", str(out), "--hang",
                    "step:4", "--go", go]
        launches = [launch(m, 0, scenario, "train.steps=12", port=29500) for m in range(2)]
        procs += launches
        logs = _wait_for(launches, "test hang (step:4)", tmp_path)
        timings["paused at step 4"] = time.monotonic() - t_start
        power_off(2)  # machine C dies, with its Ray node and the shard's worker process
        nodes[2].wait(timeout=60)
        open(go, "w").close()
        timings["C killed"] = time.monotonic() - t_start
        logs = finish(launches, logs)
        timings["12 steps done"] = time.monotonic() - t_start
        cross = [json.loads((out / f"cross{r}.json").read_text()) for r in range(2)]
        assert cross[0]["seen"] and cross[0]["num_shards"] == 3
        assert cross[0]["shard_nodes"] == 3  # one shard on each Ray node
        assert cross[0]["node"] != cross[1]["node"]  # each rank on its own machine's Ray node
        # Shard 2 was on C (shard k on node k mod 3, rank 0's node first, then by address); before
        # step 12 it runs again, re-created once, on A or B; shards 0 and 1 never moved.
        shards = json.loads((out / "shards.json").read_text())
        assert [s["node"] for s in shards[:2]] == [c["node"] for c in cross]
        assert shards[2]["node"] in [c["node"] for c in cross] and shards[2]["incarnation"] == 1
        assert [s["incarnation"] for s in shards[:2]] == [0, 0]
        # Node-local draws: 1 - mix_fraction (0.75) from this node's shard, plus its share of the
        # mixed quarter; binomial sd 0.006 over 4,000 starts.
        caps = split_capacity(CHAINS, 3)
        for r, c in enumerate(cross):
            assert abs(c["local_share"] - (0.75 + 0.25 * caps[r] / CHAINS)) < 0.03, c
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
        assert sum(r["buffer_restarts"] for r in records) == 1 and all(np.isfinite(r["loss"]) for r in records)
        assert find_resume(str(run_dir)) == step_dir(str(run_dir), 12)
        assert [_chains(step_dir(str(run_dir), s)) for s in (4, 8, 12)] == [CHAINS] * 3

        # 4. On to 20 steps; at step 18 (after the step-16 checkpoint) SIGKILL both launchers.
        launches = [launch(m, 0, ["-m", "tests.faults", "--hang", "step:18"], "train.steps=20", port=29501)
                    for m in range(2)]
        procs += launches
        _wait_for(launches, "test hang (step:18)", tmp_path)
        launchers = [_descendants(p.pid)[0] for p in launches]  # the nsenter processes' children
        ranks = [pid for launcher in launchers for pid in _descendants(launcher)]
        for launcher in launchers:
            os.kill(launcher, signal.SIGKILL)  # the launcher only: its rank sits in a session of its own
        t_kill = time.monotonic()
        while any(_alive(pid) for pid in ranks) and time.monotonic() - t_kill < 30:
            time.sleep(0.2)
        assert not [pid for pid in ranks if _alive(pid)], "ranks outlived their launcher by 30 s"
        timings["ranks gone after launcher kill"] = time.monotonic() - t_kill
        for p in launches:
            assert "the launcher (pid" in p.communicate(timeout=60)[0]
        power_off(0)  # then the machines, with their Ray nodes
        power_off(1)
        resume_from = find_resume(str(run_dir))
        assert resume_from == step_dir(str(run_dir), 16)  # the newest complete checkpoint on disk
        assert all(done for s, _, done in list_checkpoints(str(run_dir)) if s <= 16)
        assert _chains(resume_from) == CHAINS
        timings["all killed"] = time.monotonic() - t_start

        # The cluster again (the two training machines), and --resume auto on both.
        nodes = start_cluster([0, 1], 1)
        procs += nodes
        launches = [launch(m, 1, ["-m", "ebmscale.cli"], "train.steps=20", port=29502) for m in range(2)]
        procs += launches
        logs = finish(launches, ["", ""])
        timings["resumed run done"] = time.monotonic() - t_start
        assert f"resumed from {resume_from} at step 16" in logs[0]
        assert find_resume(str(run_dir)) == step_dir(str(run_dir), 20)
        assert _chains(step_dir(str(run_dir), 20)) == CHAINS
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records][-2:] == [18, 20] and np.isfinite(records[-1]["loss"])
        timings["test"] = time.monotonic() - t_start
        print("node-local share of draws:", cross[0]["local_share"], cross[1]["local_share"])
        print("seconds:", {k: round(v, 1) for k, v in timings.items()})
    finally:
        for init in machines.values():
            try:
                os.kill(init, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for ns, _, _ in three_hosts:  # every process in the namespaces is this test's
            _kill_netns(ns)
        for p in procs:
            p.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)
