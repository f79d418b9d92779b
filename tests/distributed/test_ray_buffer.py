"""The global replay buffer on a real local Ray: draw statistics, cross-rank visibility, shard
restarts (restored from the last checkpoint, or refilled), reproducibility and checkpoint round
trips through the trainer, and the embedded mode under a 2-process ``accelerate launch``.

Starting Ray costs seconds and about 0.6 GiB, so the in-process tests share one instance
(module fixture); every client creates its own shard actors in it and removes them on close.
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
import torch

from ebmscale.config import ConfigError, load_config
from tests.conftest import run_cli
from tests.distributed.dp_scenarios import REPO, _free_port

pytest.importorskip("ray")

from ebmscale.buffer.ray_host import RayBuffer, start_embedded  # noqa: E402

TOY = ["data.dataset=8gaussians", "model.arch=mlp", "model.width=8", "model.depth=2", "data.toy_train_size=500",
       "data.batch_size=16", "sampler.steps=2", "sampler.step_size=0.1", "sampler.noise_std=0.05",
       "buffer.capacity=64", "train.progress=false", "train.tensorboard=false", "train.threads=1",
       "train.device=cpu", "train.sample_every=0", "buffer.backend=ray"]


# --------------------------------------------------------------------------- 2 processes, embedded Ray
def test_embedded_mode_under_accelerate_launch(tmp_path):
    """Rank 0 starts Ray, rank 1 joins through torch.distributed; a write-back of rank 1 is seen
    by rank 0; training ends with Ray shut down, its session directory removed, nothing in $HOME
    and no Ray log lines."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RAY_"))}
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HOME=str(home))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "launch", "accelerate", "cpu_gloo.yaml"), "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(_free_port()), os.path.join(REPO, "tests", "distributed", "ray_scenarios.py"),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert (r0["world"], r0["steps"], r1["steps"]) == (2, 6, 6) and r0["is_global"]
    assert r0["cross"]["seen"] and r0["cross"]["num_shards"] == 2
    for r in (r0, r1):  # token auth on, its token file (0600) in rank 0's session directory
        assert r["cross"]["token"] == {"mode": 0o600, "in_session": True}
    assert r0["temp_dir"] and r1["temp_dir"] is None  # rank 0 owned the session directory
    for r in (r0, r1):
        assert not r["ray_connected_after"] and not r["temp_dir_left"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [3, 6] and records[-1]["buffer_restarts"] == 0
    # Buffer health of the global buffer, reported by rank 0 from the shards (rank 1 adds weight 0):
    # 3 sampler steps per write-back, 6 steps, no restarts.
    last = records[-1]
    assert last["buffer_reinit_frac"] == 0 and 3 <= last["buffer_age_max"] <= 18 and last["buffer_age_max"] % 3 == 0
    assert 0 < last["buffer_fill"] <= 1 and 0 < last["buffer_age_mean"] <= last["buffer_age_max"]
    assert not any("ray" in name.lower() for _, dirs, files in os.walk(home) for name in dirs + files)
    for noise in ("(raylet)", "Started a local Ray", "INFO worker", "ray.init", "Ray dashboard"):
        assert noise not in log, noise


def test_cluster_mode_with_the_launch_scripts(tmp_path, cli_env):
    """launch/ray/head.sh starts a cluster with a fresh token (0600 file); a client without the
    token, or with a wrong one, is refused; training with buffer.ray_address=auto and the token
    joins it."""
    ray_tmp = tempfile.mkdtemp(prefix="ebr", dir="/tmp")  # short: Ray puts unix sockets under it
    token = os.path.join(ray_tmp, "cluster.token")
    env = {k: v for k, v in cli_env.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_PORT=str(_free_port()), RAY_BIN=os.path.join(os.path.dirname(sys.executable), "ray"),
               HOME=str(tmp_path / "home"))
    no_token = dict(env)
    env["RAY_AUTH_TOKEN_PATH"] = token
    # --block keeps the cluster's processes in our own process group, so we stop exactly them.
    head = subprocess.Popen(["bash", os.path.join(REPO, "launch", "ray", "head.sh"), "--block",
                             "--ray-client-server-port", str(_free_port()),
                             "--dashboard-agent-listen-port", str(_free_port())],
                            env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        record = os.path.join(ray_tmp, "ray", "ray_current_cluster")
        for _ in range(1200):
            if os.path.exists(record) or head.poll() is not None:
                break
            time.sleep(0.1)
        assert os.path.exists(record), head.stderr.read() if head.poll() is not None else "no cluster record"
        assert os.stat(token).st_mode & 0o777 == 0o600 and len(open(token).read()) == 64
        # A plain Ray client with a wrong token is refused by the cluster itself.
        with open(record) as fh:
            address = fh.read().strip()
        probe = subprocess.run([sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1]); print('joined')",
                                address], env=dict(no_token, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
                               capture_output=True, text=True, timeout=300)
        assert probe.returncode != 0 and "joined" not in probe.stdout
        assert "ConnectionError" in probe.stderr or "Authentication" in probe.stderr, probe.stderr[-2000:]
        # ebmscale without any token: one line that says where the token comes from.
        r = run_cli(["train", "--run-dir", str(tmp_path / "refused"), "buffer.ray_address=auto", "train.steps=1",
                     *TOY], no_token, tmp_path)
        assert r.returncode == 2 and "needs its authentication token" in r.stderr, r.stderr[-2000:]
        run = tmp_path / "run"
        r = run_cli(["train", "--run-dir", str(run), "buffer.ray_address=auto", "train.steps=4", "train.log_every=2",
                     *TOY], env, tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 4
        assert not any("ray" in n.lower() for _, dirs, files in os.walk(tmp_path / "home") for n in dirs + files)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # Ray drains for up to 30 s; its group is ours to end
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --------------------------------------------------------------------------- one process, one Ray
@pytest.fixture(scope="module")
def ray_session():
    session = start_embedded("ebmscale")
    yield session
    session.close()


def _client(session, rank: int = 0, world: int = 1, num_classes: int = 0, bounds=(5.0, 6.0), share=None,
            **buffer) -> RayBuffer:
    overrides = [f"buffer.{k}={v}" for k, v in buffer.items()]
    b = load_config(None, ["buffer.backend=ray", "data.batch_size=1", *overrides]).buffer
    return RayBuffer(b, (2,), bounds, num_classes, rank, world, shard_seed=lambda k: 100 + k,
                     share=share or (lambda o: o))


def _fill(client: RayBuffer, value: float) -> None:
    """Set every stored chain to ``value`` (through the checkpoint path)."""
    state = client.state_dict()
    for s in state["shards"]:
        s["data"][:] = value
    client.load_state_dict(state)


def test_draws_reinit_fraction_and_uniform_over_all_shards(ray_session):
    c = _client(ray_session, capacity=200, shards=4, reinit_prob=0.1)
    try:
        assert not any(i["torch_loaded"] for i in c.shard_info())  # actors hold NumPy only
        _fill(c, 0.0)  # stored chains are 0, fresh noise lies in [5, 6]
        counts = np.zeros((4, 50))
        fresh, total = 0, 0
        rng = np.random.default_rng(0)
        for _ in range(20):
            x, handle = c.draw(300, None, rng)
            reinit = (x >= 5.0).all(axis=1)
            assert np.array_equal(reinit | (x == 0.0).all(axis=1), np.ones(300, bool))
            fresh, total = fresh + reinit.sum(), total + 300
            for k, _, idx, _ in handle:
                np.add.at(counts[k], idx, 1)
        assert abs(fresh / total - 0.1) < 4 * np.sqrt(0.1 * 0.9 / total)
        expected = total / 200  # uniform over all 200 slots of all shards
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 199 + 5 * np.sqrt(2 * 199)
    finally:
        c.close()


def test_uint8_draws_are_decoded_by_the_client(ray_session):
    """uint8 chains decode to float32 on the uint8 grid (by the shard into this node's shared
    memory, or here when they came by value); fresh-noise starts stay float."""
    c = _client(ray_session, capacity=100, shards=2, reinit_prob=0.5, storage="uint8")
    try:
        state = c.state_dict()
        for s in state["shards"]:
            s["data"][:] = 128
        c.load_state_dict(state)
        x, _ = c.draw(200, None, np.random.default_rng(0))
        stored = np.float32(128) * np.float32(1.0 / 255) + np.float32(5.0)
        kept = (x == stored).all(axis=1)
        assert x.dtype == np.float32 and 0 < kept.sum() < 200
        fresh = x[~kept]
        assert ((fresh >= 5.0) & (fresh <= 6.0)).all()
        # Not on the uint8 grid: noise is not quantised on its way.
        assert np.abs((fresh - 5.0) * 255 - np.rint((fresh - 5.0) * 255)).max() > 0.1
    finally:
        c.close()


def draw_and_write_back(c: RayBuffer, labels: np.ndarray | None) -> tuple[list, list]:
    """Fill ``c`` with 5.5, make three draws of 30 chains, write them back back to back (each
    to its own slots, changed, inside the bounds), flush; returns the draws and the shards' data."""
    _fill(c, 5.5)
    drawn = [c.draw(30, labels, np.random.default_rng(3 + j)) for j in range(3)]
    for j, (x, handle) in enumerate(drawn):
        c.write_back(handle, x * np.float32(0.5) + np.float32(3.0 - 0.2 * j))
    c.flush()
    return drawn, [s["data"] for s in c.state_dict()["shards"]]


def assert_same_chains(draws: list, stored: list, storage: str) -> None:
    """Two runs of :func:`draw_and_write_back` (two transfer paths) drew the same starts and slots
    and left the same chains; with fp32 storage every write-back landed on its own slots, in order."""
    for (x1, h1), (x2, h2) in zip(*draws, strict=True):
        assert np.array_equal(x1, x2) and len(np.unique(x1, axis=0)) > 1  # stored chains and fresh starts
        for (k1, p1, i1, r1), (k2, p2, i2, r2) in zip(h1, h2, strict=True):
            assert k1 == k2 and np.array_equal(p1, p2) and np.array_equal(i1, i2) and np.array_equal(r1, r2)
    for a, b in zip(*stored, strict=True):
        assert np.array_equal(a, b)
    if storage == "fp32":
        expected = [np.full_like(a, 5.5) for a in stored[0]]
        for j, (x, handle) in enumerate(draws[0]):
            for k, pos, idx, _ in handle:
                expected[k][idx] = x[pos] * np.float32(0.5) + np.float32(3.0 - 0.2 * j)
        for a, b in zip(stored[0], expected):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("storage", ["fp32", "uint8"])
def test_shared_memory_mailboxes_carry_the_same_chains_as_ray_objects(ray_session, storage, monkeypatch):
    """Draws and write-backs between a client and the shards on its node go through /dev/shm
    mailboxes: the same starts, slots and stored chains as by value through Ray (the mailboxes
    switched off by hand), back-to-back write-backs (two write mailboxes per shard) landing in
    order, and no mailbox file is left after close."""
    from ebmscale.buffer import mailbox

    monkeypatch.setattr(mailbox, "MIN_BYTES", 0)  # these toy batches would go by value
    labelled = storage == "uint8"
    c = _client(ray_session, capacity=60, shards=2, reinit_prob=0.3, storage=storage, num_classes=3 * labelled)
    try:
        labels = np.array([0, 2, 1, 1, 0] * 6) if labelled else None
        draws, stored = [], []
        for use_boxes in (True, False):
            if not use_boxes:  # the by-value path, as to a shard on another node
                boxes = c._mail.boxes
                c._mail.boxes = {(k, kind): False for k in range(2) for kind in ("draw", "write")}
            drawn, after = draw_and_write_back(c, labels)
            draws.append(drawn)
            stored.append(after)
            if use_boxes:
                # Whether a back-to-back write-back finds the first write mailbox still busy (and
                # takes the second) depends on timing; that choice is tested without timing in
                # tests/unit/test_mailbox.py. Here: the chains land the same either way.
                assert {(k, kind) for k in range(2) for kind in ("draw", "write")} <= set(c._mail.boxes)
        c._mail.boxes = boxes  # closed by close()
        boxes = list(boxes.values())
        assert_same_chains(draws, stored, storage)
    finally:
        c.close()
    assert not [p for p in boxes if os.path.exists(p.address[1]) or p.path]
    assert not any(name.startswith(f"ebmscale-box-{os.getpid()}-") for name in os.listdir(mailbox.SHM_DIR))


def test_no_room_in_dev_shm_falls_back_to_ray_objects(ray_session, monkeypatch):
    """A mailbox that cannot be made (a full /dev/shm: Docker's default is 64 MB) is not tried
    again; the chains go through Ray's object store instead. Small batches never try one."""
    from ebmscale.buffer import mailbox

    small = _client(ray_session, capacity=20, reinit_prob=0.0)
    try:
        x, handle = small.draw(8, None, np.random.default_rng(0))
        small.write_back(handle, x)
        small.flush()
        assert small._mail.boxes == {}  # 8 x 2 float32: Ray inlines them into the calls
    finally:
        small.close()
    monkeypatch.setattr(mailbox, "MIN_BYTES", 0)

    class Full(mailbox.Mailbox):
        def view(self, n, shape):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(mailbox, "Mailbox", Full)
    c = _client(ray_session, capacity=20, reinit_prob=0.0)
    try:
        _fill(c, 5.25)
        x, handle = c.draw(8, None, np.random.default_rng(0))
        assert x.shape == (8, 2) and (x == 5.25).all()
        c.write_back(handle, x + np.float32(0.5))
        c.flush()
        stored = c.state_dict()["shards"][0]["data"]
        assert (stored[handle[0][2]] == 5.75).all()
        assert c._mail.boxes == {(0, "draw"): False, (0, "write"): False}
    finally:
        c.close()


def test_stale_mailboxes_of_dead_processes_are_swept(tmp_path):
    from ebmscale.buffer import mailbox

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = mailbox.Mailbox(str(tmp_path))
    live.view(2, (3,))
    stale = tmp_path / os.path.basename(live.path).replace(f"-{os.getpid()}-", f"-{dead.pid}-", 1)
    stale.write_bytes(b"x")
    other_host = tmp_path / f"ebmscale-box-{dead.pid}-otherhost-0-1"
    other_host.write_bytes(b"x")
    mailbox.sweep_stale(str(tmp_path))
    assert os.path.exists(live.path) and not stale.exists() and other_host.exists()
    live.close()
    assert not os.listdir(tmp_path).count(os.path.basename(live.address[1] or "none"))


def test_imagenet_step_time_benchmark_runs_tiny(ray_session, tmp_path):
    """benchmarks/ray_buffer.py --imagenet at toy size: the ImageNet 128 recipe on fabricated
    shards trains a step with each buffer variant."""
    from benchmarks.ray_buffer import IMAGENET_CPU, VARIANTS, fabricated_imagenet, step_times

    overrides = [*fabricated_imagenet(str(tmp_path), n=8), *IMAGENET_CPU, "data.batch_size=2", "sampler.steps=1",
                 "buffer.capacity=1000", "train.progress=false", "train.tensorboard=false"]
    times = step_times(os.path.join(REPO, "configs", "igebm_imagenet128.yaml"), overrides, 1, 1, 0, str(tmp_path))
    assert set(times) == set(VARIANTS) and all(t > 0 for t in times.values())


def test_affine_mixing_and_class_labels(ray_session):
    box: dict = {}
    kw = dict(world=2, num_classes=4, capacity=40, mixing="affine", mix_fraction=0.2)
    a = _client(ray_session, rank=0, share=lambda o: box.setdefault("i", o), **kw)
    b = _client(ray_session, rank=1, share=lambda o: box["i"], **kw)
    try:
        assert b.state_dict()["shards"] is None  # a global buffer is saved by rank 0 only
        rng = np.random.default_rng(1)
        own, n = 0, 0
        want = np.tile(np.arange(4), 50)
        for _ in range(20):
            _, handle = b.draw(len(want), want, rng)
            for k, pos, idx, _ in handle:
                # Labelled starts come from slots of their class (slot i of a shard holds class i % 4).
                assert np.array_equal(idx % 4, want[pos])
                own += len(pos) * (k == 1)
                n += len(pos)
        # Rank 1's own shard with probability 0.8 + 0.2 * 1/2.
        assert abs(own / n - 0.9) < 4 * np.sqrt(0.9 * 0.1 / n)
        # The read-only labelled peek (class-conditional FID from the buffer): each chain from its
        # class's slots, in the order of the labels. Every stored chain is set to its slot's class.
        state = a.state_dict()
        for sh in state["shards"]:
            sh["data"][:] = (np.arange(len(sh["data"])) % 4)[:, None]
        a.load_state_dict(state)
        labels = np.array([3, 0, 2, 2, 1, 3, 0, 1, 1])
        got = b.peek(0, np.random.default_rng(2), labels)
        assert np.array_equal(got, np.repeat(labels[:, None], 2, 1).astype(np.float32))
    finally:
        b.close()
        a.close()


def test_write_back_by_one_rank_is_visible_to_another(ray_session):
    box: dict = {}
    a = _client(ray_session, rank=0, world=2, capacity=16, reinit_prob=0.0, share=lambda o: box.setdefault("i", o))
    b = _client(ray_session, rank=1, world=2, capacity=16, reinit_prob=0.0, share=lambda o: box["i"])
    try:
        assert a.names == b.names and len(a.names) == 2
        x, handle = b.draw(12, None, np.random.default_rng(5))
        b.write_back(handle, np.full_like(x, 5.5))
        b.flush()
        shards = a.state_dict()["shards"]
        for k, _, idx, _ in handle:
            assert np.all(shards[k]["data"][idx] == 5.5)
        assert {k for k, _, _, _ in handle} == {0, 1}  # rank 1 wrote into rank 0's shard too
    finally:
        b.close()
        a.close()


def test_health_is_gathered_from_the_shards(ray_session):
    """Rank 0's health figures equal those of the shards' chains pooled locally (the shards send
    counts, not chains)."""
    from ebmscale.buffer import health
    from ebmscale.buffer.replay import decode

    b = load_config(None, ["buffer.backend=ray", "data.batch_size=1", "buffer.capacity=40", "buffer.shards=2",
                           "buffer.reinit_prob=0.3"]).buffer
    c = RayBuffer(b, (2,), (5.0, 6.0), 0, 0, 1, shard_seed=lambda k: 100 + k, chain_steps=4)
    try:
        c.health()  # restart counters from zero
        x, handle = c.draw(30, None, np.random.default_rng(0))
        c.write_back(handle, x)
        c.flush()
        got = health.figures(c.health())
        reinits = sum(int(r.sum()) for _, _, _, r in handle)
        shards = c.state_dict()["shards"]
        slots = sum(len(np.unique(idx)) for _, _, idx, _ in handle)
        assert got["buffer_reinit_frac"][0] == reinits / 30 and got["buffer_age_max"][0] == 4
        assert got["buffer_fill"][0] == slots / 40 and got["buffer_age_mean"][0] == 4 * slots / 40
        assert sum(int(s["age"].sum()) for s in shards) == 4 * slots
        dec = lambda q: decode(q, "fp32", (5.0, 6.0))  # noqa: E731
        local = health.merge([health.raw_stats(s["data"], s["age"], None, 0, 0, 0, dec) for s in shards])
        assert got["buffer_diversity"][0] == pytest.approx(health.figures(local)["buffer_diversity"][0], rel=1e-12)
    finally:
        c.close()


def _wait_restarted(c: RayBuffer, shard: int) -> None:
    """Kill ``shard``'s process and wait until Ray has brought it back."""
    os.kill(c.shard_info()[shard]["pid"], 9)
    for _ in range(600):
        try:
            if c.shard_info()[shard]["incarnation"] >= 1:
                return
        except Exception:  # noqa: BLE001 - calls fail while the actor restarts
            pass
        time.sleep(0.1)
    raise AssertionError("the shard did not come back")


def test_restarted_shard_restores_the_last_checkpoint(ray_session):
    c = _client(ray_session, capacity=20, shards=2, reinit_prob=0.0)
    try:
        saved = c.state_dict()["shards"]
        x, handle = c.draw(10, None, np.random.default_rng(0))
        c.write_back(handle, np.full_like(x, 5.25))  # after the checkpoint: lost with the shard
        c.flush()
        _wait_restarted(c, 0)
        now = c.state_dict()["shards"]
        assert np.array_equal(now[0]["data"], saved[0]["data"])
        assert now[0]["rng"] == saved[0]["rng"]
        for k, _, idx, _ in handle:
            if k == 1:  # the shard that lived on kept its newer chains
                assert np.all(now[1]["data"][idx] == 5.25)
        # The draw path still works, and rank 0 reports the restart exactly once.
        c.draw(10, None, np.random.default_rng(1))
        seen = 0.0
        for _ in range(20):
            seen += c.counters()["buffer_restarts"]
            time.sleep(0.05)
        assert seen == 1
    finally:
        c.close()


def test_restarted_shard_without_checkpoint_refills_with_noise(ray_session):
    c = _client(ray_session, capacity=20, shards=2, reinit_prob=0.0)
    try:
        before = c.state_dict()  # this also becomes the restore point; drop it to test the refill
        c._take_snapshot([])
        _wait_restarted(c, 1)
        after = c.state_dict()["shards"][1]["data"]
        assert not np.array_equal(after, before["shards"][1]["data"])
        assert after.min() >= 5.0 and after.max() <= 6.0
    finally:
        c.close()


def test_unreachable_cluster_fails_at_start_naming_it(ray_session):
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:9.*buffer\.ray_address"):
        _client(ray_session, ray_address="127.0.0.1:9")


def _train_steps(tmp_path, name: str, steps: int, *extra, state=None):
    from ebmscale.trainer import Trainer

    tr = Trainer(load_config(None, [*TOY, "train.seed=4", *extra]), str(tmp_path / name))
    try:
        if state is not None:
            tr.load_state_dict(state)
        for _ in range(steps):
            tr.train_step()
        return tr.state_dict()
    finally:
        tr.buffer.close()


def test_one_process_run_is_reproducible_and_resumes_bitwise(ray_session, tmp_path):
    full = _train_steps(tmp_path, "a", 6)
    assert full["buffer"]["num_shards"] == 1 and len(full["buffer"]["shards"]) == 1
    again = _train_steps(tmp_path, "b", 6, "buffer.prefetch=false")  # prefetching changes nothing
    half = _train_steps(tmp_path, "c", 3)
    resumed = _train_steps(tmp_path, "d", 3, state=half)
    for other in (again, resumed):
        for name, p in full["model"].items():
            assert torch.equal(p, other["model"][name]), name
        assert np.array_equal(full["buffer"]["shards"][0]["data"], other["buffer"]["shards"][0]["data"])


# A class-conditional energy on the 8x8 digits: its buffer draws are labelled.
COND = ["data.dataset=digits", "model.width=4", "model.depth=2", "model.conditional=true", "model.num_classes=10",
        "data.batch_size=8", "sampler.steps=2", "buffer.capacity=40", "train.progress=false",
        "train.tensorboard=false", "train.threads=1", "train.device=cpu", "train.precision=fp32",
        "buffer.backend=ray", "train.seed=4"]


def test_class_conditional_draws_are_prefetched_and_change_nothing(ray_session, tmp_path):
    from ebmscale.trainer import Trainer

    results = {}
    for prefetch in ("true", "false"):
        tr = Trainer(load_config(None, [*COND, f"buffer.prefetch={prefetch}", "optim.accumulate=2"]),
                     str(tmp_path / prefetch))
        submitted = []
        submit = tr.buffer._submit
        tr.buffer._submit = lambda plan, labels: submitted.append(labels) or submit(plan, labels)
        try:
            for _ in range(3):
                tr.train_step()
                if prefetch == "true":  # the next micro-batch's labelled draw is already on its way
                    pending = tr.buffer._prefetched
                    assert np.array_equal(pending[3], tr.stream.peek()[1].numpy())
            results[prefetch] = (tr.state_dict(), len(submitted))
        finally:
            tr.buffer.close()
    (on, sent_on), (off, sent_off) = results["true"], results["false"]
    # 6 micro-batches: without prefetch 6 draws; with it, the first draw and 6 prefetches, every
    # draw after the first served by its prefetch.
    assert sent_off == 6 and sent_on == 7
    for name, p in on["model"].items():
        assert torch.equal(p, off["model"][name]), name
    for a, b in zip(on["buffer"]["shards"], off["buffer"]["shards"]):
        assert np.array_equal(a["data"], b["data"])
    assert on["stream"] == off["stream"]


def test_killing_a_shard_during_training(ray_session, tmp_path, monkeypatch):
    import ebmscale.trainer as trainer_module

    class Killer(trainer_module.Trainer):
        def train_step(self):
            if self.step == 3:
                _wait_restarted(self.buffer, 0)
            return super().train_step()

    monkeypatch.setattr(trainer_module, "Trainer", Killer)
    cfg = load_config(None, [*TOY, "buffer.shards=2", "train.steps=12", "train.log_every=4",
                             "train.checkpoint_every=2"])
    result = trainer_module.train(cfg, run_dir=str(tmp_path / "run"))
    assert result.steps == 12
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert sum(r["buffer_restarts"] for r in records) == 1
    assert all(np.isfinite(r["loss"]) for r in records)


def test_cli_names_an_unreachable_address(tmp_path, cli_env):
    r = run_cli(["train", "--run-dir", str(tmp_path / "run"), "buffer.ray_address=127.0.0.1:9", "train.steps=1",
                 *TOY[:-1]], cli_env, tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "127.0.0.1:9" in err[0] and "Traceback" not in r.stderr, r.stderr
