"""The global replay buffer, hosted on Ray (the only module of ebmscale that imports ray).

The logic stays in :class:`ebmscale.buffer.replay.ReplayBuffer`; Ray only hosts it. Rank 0 creates
``buffer.shards`` named actors (one per rank by default), each holding a NumPy
:class:`ReplayBuffer` of an equal part of ``capacity x ranks`` chains, plus one small registry
actor that counts restarts and keeps references to the last checkpointed shard states. Every rank
holds a :class:`RayBuffer` client with the interface of :class:`ebmscale.buffer.client.LocalBuffer`:

* draws: the client spends the caller's ``rng`` on a plan (which shard serves each start, one seed
  per shard), then asks the shards in parallel; the shards' own RNGs are never used, so one process
  with a fixed seed repeats a run exactly, prefetched or not. ``mixing=random`` picks shards in
  proportion to their size (uniform over all slots of all ranks' history); ``mixing=affine`` takes
  ``1 - mix_fraction`` of the starts from the rank's own shard(s) and the rest from any shard.
* prefetch: right after a step's write-backs are queued, the next step's draw is sent (labelled
  draws with the next batch's labels, which the trainer reads one batch ahead); calls from one
  caller to one actor run in order, so it sees this rank's own writes.
* chains to and from a shard on the client's node go through shared memory
  (:mod:`ebmscale.buffer.mailbox`: the shard writes a draw's float32 starts into the client's
  mailbox and reads write-backs from it, encoding and decoding on its side; only slot indices
  travel through Ray). To a shard on another node they go in the storage dtype (fp16/uint8 halve/
  quarter the transfer; the client decodes draws) over a direct, authenticated TCP link
  (:mod:`ebmscale.buffer.link`), else by value through Ray (the choice: :mod:`ebmscale.buffer.route`).
  Write-backs are sent without waiting; at most ``max_inflight`` requests stay in flight per rank
  (and two per shard through its write mailboxes: a third waits until the first has landed).
* faults: shard actors restart automatically (Ray retries the calls in flight); a restarted shard
  reloads the state of the last checkpoint saved or loaded in this run (its shard files, or a state
  in Ray's object store, through the registry), or else refills itself with noise, and the registry
  counts the restart (metric ``buffer_restarts``).
* node loss: shards are pinned to their nodes (hard affinity), so a shard whose node died cannot
  restart there. The first rank whose call to it fails asks the registry (pinned to rank 0's node)
  to re-create it under the same name on a live node, from the same restore point; every rank
  then picks up the new actor by name and re-sends the calls lost with the node (a write-back
  lands in the re-created shard: same slots, same capacity).
* with several ranks, the order in which ranks' writes land is not deterministic: a bitwise-exact
  multi-rank resume needs ``buffer.backend=local``.
"""
from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
import uuid
from typing import Any, Callable

# Before ray starts anything: token authentication always (the token comes from a file ebmscale
# points RAY_AUTH_TOKEN_PATH at, never from $HOME: see start_embedded / connect_cluster); no
# usage-stats prompt or report.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from ebmscale.buffer import health, link, mailbox, shardfile  # noqa: E402
from ebmscale.buffer.route import Routes  # noqa: E402
from ebmscale.buffer.client import as_numpy  # noqa: E402
from ebmscale.buffer.cluster import (TOKEN_FILE, cluster_address, use_cluster_token, use_token_file,  # noqa: E402
                                     write_token)
from ebmscale.buffer.placement import (ShardLayout, by_shard, check_layout, gather, same_labels,  # noqa: E402
                                       shard_states)
from ebmscale.buffer.replay import STORAGE_DTYPES, ReplayBuffer  # noqa: E402
from ebmscale.buffer.shard import Registry, Shard  # noqa: E402
from ebmscale.config import ConfigError  # noqa: E402
from ebmscale.utils import hash_seed  # noqa: E402


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class BufferShard(Shard):
    """One shard (:class:`ebmscale.buffer.shard.Shard`: a :class:`ReplayBuffer` and its methods) in
    a Ray actor (NumPy only, no torch), with its restart logic."""

    def __init__(self, shard_id: int, kwargs: dict, registry: str, rehomed: tuple[dict | None, int] | None = None):
        self.shard_id, self.incarnation = shard_id, 0
        ctx = ray.get_runtime_context()
        if ctx.was_current_actor_reconstructed or rehomed is not None:
            # A restart after a crash (or a re-creation on another node after its node died, with
            # the registry's answer passed in): restore the last checkpoint if the registry holds
            # one (its shard files on disk, or a state in the object store).
            source, self.incarnation = rehomed or ray.get(ray.get_actor(registry).restarted.remote(shard_id))
            self.buf = _restored(kwargs, source, self.incarnation)
        else:
            self.buf = ReplayBuffer(**kwargs)

    def info(self) -> dict:
        return {"pid": os.getpid(), "incarnation": self.incarnation, "capacity": self.buf.capacity,
                "node": ray.get_runtime_context().get_node_id(), "torch_loaded": "torch" in sys.modules}


def _restored(kwargs: dict, source: dict | None, incarnation: int) -> ReplayBuffer:
    """A shard's buffer after a restart: the restore point ``source`` (shard files, or a state in
    the object store), or fresh noise from a stream new to this incarnation when there is none or
    it was lost (an object-store copy that lived only on a node that died)."""
    if source is not None:
        try:
            state = shardfile.load_state(*source["files"]) if "files" in source else ray.get(source["ref"][0], timeout=60)
        except (ray.exceptions.RayError, shardfile.ShardFileError) as exc:
            print(f"ebmscale: replay shard restore point lost ({type(exc).__name__}); refilling with noise",
                  file=sys.stderr)
        else:
            buf = ReplayBuffer(**kwargs)
            buf.load_state_dict(state)
            return buf
    return ReplayBuffer(**dict(kwargs, seed=hash_seed(kwargs["seed"], incarnation) & 0xFFFFFFFF))


# What a call to a shard raises when the shard is gone for good (its node died, so hard affinity
# cannot restart it there) rather than restarting: ActorUnavailableError is transient and retried.
_SHARD_LOST = (ray.exceptions.ActorUnschedulableError, ray.exceptions.ActorDiedError)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class BufferRegistry(Registry):
    """The :class:`ebmscale.buffer.shard.Registry` in a Ray actor (pinned to rank 0's node), which
    also re-creates the shards of a node that died."""

    def __init__(self):
        super().__init__()
        self._rehomed: list = []  # handles of re-created shards (this actor owns them)

    def rehome(self, shard_id: int, generation: int) -> tuple[int, str]:
        """Re-create shard ``shard_id`` (the caller saw ``generation`` of it fail for good) under
        its name on the live node holding the fewest shards, restoring what a restart would; a no-op
        when another rank already did (its generation moved on). Returns the shard's current
        generation and node."""
        s = self.shards[shard_id]
        if s["generation"] != generation:
            return s["generation"], s["node"]
        node = self.least_loaded({n["NodeID"] for n in ray.nodes() if n.get("Alive")})
        try:  # the old actor's name is freed once Ray has marked it dead; make sure it is
            ray.kill(ray.get_actor(s["name"], namespace=s["namespace"]), no_restart=True)
        except ValueError:
            pass
        self.restarts += 1
        source = self.source(shard_id)
        for attempt in range(50):
            try:
                actor = BufferShard.options(name=s["name"], namespace=s["namespace"],
                                            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                                            ).remote(shard_id, s["kwargs"], s["registry"], (source, self.restarts))
                break
            except ValueError:  # the name is still taken: the old actor is being torn down
                if attempt == 49:
                    raise
                time.sleep(0.1)
        self._rehomed.append(actor)
        s.update(node=node, generation=generation + 1)
        return s["generation"], node


class _Session:
    """This process's connection to Ray: who started it, and what to remove at the end."""

    def __init__(self, owned: bool, temp_dir: str | None):
        self.owned, self.temp_dir = owned, temp_dir
        if owned:  # a run that never reached close(): still stop Ray before removing its files
            atexit.register(self.close)

    def close(self) -> None:
        if self.owned and ray.is_initialized():
            ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


_QUIET = dict(log_to_driver=False, logging_level=logging.ERROR)
def _refresh_auth() -> None:
    """Make Ray read RAY_AUTH_MODE and the token again before a ray.init: it caches both, from the
    first time it was imported (maybe before this module set them) or the last instance it
    joined (what Ray's own helpers do when they switch token auth on)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def start_embedded(namespace: str, dashboard: bool = False, temp_dir: str = "") -> _Session:
    """Start a local Ray instance in this process (or reuse the one already connected)."""
    if ray.is_initialized():
        return _Session(owned=False, temp_dir=None)
    own_temp = not temp_dir
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="ebmscale-ray-", dir="/tmp")
    # Token authentication, the token in the session directory (0600), never in $HOME.
    os.makedirs(temp_dir, exist_ok=True)
    token_path = os.path.join(os.path.abspath(temp_dir), TOKEN_FILE)
    write_token(token_path, secrets.token_hex(32))
    use_token_file(token_path)
    _refresh_auth()
    # address='local': a new instance even where `ray start` left one (or a stale record of one);
    # num_cpus=1: the actors ask for none, and Ray would otherwise pre-start a worker per core;
    # the dashboard, if asked for, on loopback only.
    ray.init(address="local", namespace=namespace, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             _temp_dir=os.path.abspath(temp_dir), num_cpus=1, **_QUIET)
    return _Session(owned=True, temp_dir=temp_dir if own_temp else None)


def connect_cluster(address: str, namespace: str, timeout_s: float = 10.0, token_path: str = "") -> _Session:
    """Join a running cluster with its token (``token_path``: an embedded instance's token file;
    else :func:`~ebmscale.buffer.cluster.use_cluster_token`); an address that does not answer fails
    here, naming it (Ray itself would retry for minutes)."""
    target = cluster_address(address)
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at '{target}' (buffer.ray_address={address}): "
                          f"{exc or type(exc).__name__}") from None
    if ray.is_initialized():  # already connected in this process (a test, a benchmark): reuse it
        return _Session(owned=False, temp_dir=None)
    if token_path:
        use_token_file(token_path)
    else:
        use_cluster_token(target)
    _refresh_auth()
    try:
        ray.init(address=target, namespace=namespace, **_QUIET)
    except ConnectionError as exc:
        raise ConfigError(f"cannot join the Ray cluster at '{target}' (buffer.ray_address={address}): {exc} (is "
                          "RAY_AUTH_TOKEN_PATH the token file of this cluster?)") from None
    return _Session(owned=True, temp_dir=None)


def _spread_nodes() -> list[str]:
    """Ids of the cluster's live nodes: this process's node first, then the others by address.
    (Ray's SPREAD strategy put both zero-CPU shards on one node of a two-node cluster.)"""
    here = ray.get_runtime_context().get_node_id()
    others = sorted((n["NodeManagerAddress"], n["NodeID"]) for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here)
    return [here, *(node for _, node in others)]


class RayBuffer:
    """This rank's client of the global sharded buffer (see the module docstring). ``share(obj)``
    returns rank 0's ``obj`` on every rank and ``barrier()`` waits for all ranks (``ebmscale.dist``
    provides both over torch.distributed); ``shard_seed(k)`` seeds shard k's initial noise."""

    is_global = True

    def __init__(self, b: Any, shape: tuple[int, ...], bounds: tuple[float, float], num_classes: int, rank: int,
                 world: int, shard_seed: Callable[[int], int], share: Callable[[Any], Any] = lambda o: o,
                 barrier: Callable[[], None] = lambda: None, chain_steps: int = 0):
        self.rank, self.world = rank, world
        self.chain_steps = int(chain_steps)  # sampler steps between a draw and its write-back (chain age)
        self.shape, self.bounds, self.storage = tuple(shape), tuple(bounds), b.storage
        self.num_classes, self.mixing, self.mix_fraction = num_classes, b.mixing, b.mix_fraction
        self.use_prefetch, self.max_inflight = b.prefetch, b.max_inflight
        self._share, self._barrier = share, barrier
        self.capacities = check_layout(b, world, num_classes)
        n_shards = len(self.capacities)
        self._session: _Session | None = None
        self._owned: list = []
        self.closed = False
        if rank == 0:
            try:
                self._session = (start_embedded(b.ray_namespace, b.ray_dashboard, b.ray_temp_dir) if not b.ray_address
                                 else connect_cluster(b.ray_address, b.ray_namespace))
                info = self._create(b, n_shards, shard_seed)
            except Exception as exc:
                share({"error": str(exc)})  # the other ranks fail with it instead of waiting forever
                raise
            share(info)
        else:
            info = share(None)
            if "error" in info:
                raise ConfigError(f"rank 0 could not start the Ray replay buffer: {info['error']}")
            self._session = (connect_cluster(info["address"], b.ray_namespace, token_path=info["token_path"])
                             if not b.ray_address
                             else connect_cluster(b.ray_address, b.ray_namespace))
        self.names, self.namespace = info["shards"], b.ray_namespace
        self.shards = [ray.get_actor(n, namespace=b.ray_namespace) for n in self.names]
        self._generation = [0] * len(self.shards)  # of each shard's actor this rank holds (see _rehome)
        self.registry = ray.get_actor(info["registry"], namespace=b.ray_namespace)
        # Which node each shard runs on, and this rank's: mixing=affine draws from this node's shards.
        self.node = ray.get_runtime_context().get_node_id()
        self._shard_nodes = list(info["nodes"])  # where rank 0 placed them (hard affinity: exact)
        self._set_capacities(self.capacities)
        self._inflight: list = []
        self._prefetched: tuple | None = None
        self._restart_poll = None
        self._restarts_seen = 0
        self._snapshot_refs: list = []
        # Shared-memory mailboxes to the shards on this node (see ebmscale.buffer.mailbox), direct
        # links from this node's address as Ray knows it to those on others (ebmscale.buffer.link).
        chain_bytes = int(np.prod(self.shape)) * np.dtype(STORAGE_DTYPES[self.storage]).itemsize
        local = lambda k: self._shard_nodes[k] == self.node  # noqa: E731
        self._mail = mailbox.ClientBoxes(self.shape, chain_bytes, local=local,
                                         probe=lambda k, address: self._call_each("probe", [(k, (address,))])[0])
        mailbox.sweep_stale()
        host = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == self.node)
        self._links = link.ClientLinks(chain_bytes, host, remote=lambda k: not local(k), open=self._open_link,
                                       min_bytes=lambda: mailbox.MIN_BYTES)
        self._route = Routes(self._mail, self._links, local, self.shape, self.storage, self.bounds)

    def _open_link(self, k: int, address: tuple[str, int], secret: bytes, key: str) -> Callable[[float], bool | None]:
        """Ask shard ``k`` to link to this client; returns the wait for its answer (link.ClientLinks)."""
        ref = self.shards[k].connect_link.remote(address, secret, key)
        return lambda timeout: None if not ray.wait([ref], timeout=timeout)[0] else bool(self._get_quietly(ref))

    @staticmethod
    def _get_quietly(ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError:
            return None

    def _set_capacities(self, capacities: list[int]) -> None:
        """The draw arithmetic over ``capacities`` and the shards' nodes (ebmscale.buffer.placement)."""
        self.capacities = list(capacities)
        self.layout = ShardLayout(self.capacities, self.rank, self.world, self._shard_nodes, self.node)

    def _create(self, b: Any, n_shards: int, shard_seed: Callable[[int], int]) -> dict:
        run = uuid.uuid4().hex[:10]
        registry = f"ebmscale-{run}-registry"
        names = [f"ebmscale-{run}-shard-{k}" for k in range(n_shards)]
        nodes = _spread_nodes()
        # Rank 0 keeps these handles: a (non-detached) actor whose handles are all dropped is stopped.
        # The registry lives on rank 0's node (it re-creates the shards of a node that dies).
        self._owned = [BufferRegistry.options(name=registry, namespace=b.ray_namespace, scheduling_strategy=
                                              NodeAffinitySchedulingStrategy(nodes[0], soft=False)).remote()]
        actors, specs = [], []
        for k, name in enumerate(names):
            kwargs = dict(capacity=self.capacities[k], shape=self.shape, bounds=self.bounds, reinit_prob=b.reinit_prob,
                          storage=b.storage, num_classes=self.num_classes, seed=int(shard_seed(k)))
            # Shard k on node k mod N (rank 0's node first): the shards and their memory are spread
            # over the cluster. Hard affinity: in Ray 2.60 a soft one put shards on any node (measured:
            # 2 of 6 off target on a two-node cluster); a shard whose node dies is re-created on a
            # live node by the registry instead (see RayBuffer._rehome).
            node = nodes[k % len(nodes)]
            where = NodeAffinitySchedulingStrategy(node, soft=False)
            actors.append(BufferShard.options(name=name, namespace=b.ray_namespace, scheduling_strategy=where)
                          .remote(k, kwargs, registry))
            specs.append({"name": name, "namespace": b.ray_namespace, "kwargs": kwargs, "registry": registry,
                          "node": node})
        ray.get(self._owned[0].configure.remote(specs))
        self._owned += actors
        ray.get([a.info.remote() for a in actors])  # created and filled before any rank draws
        # Embedded: the other ranks (same node) read the token from the session directory.
        return {"address": ray.get_runtime_context().gcs_address, "shards": names, "registry": registry,
                "nodes": [spec["node"] for spec in specs],
                "token_path": os.environ.get("RAY_AUTH_TOKEN_PATH", "") if not b.ray_address else ""}

    # ------------------------------------------------------------------ draw / write back
    def _submit(self, plan: tuple[np.ndarray, np.ndarray], labels: np.ndarray | None) -> list:
        shard, seeds = plan
        parts = []
        for k, pos in by_shard(shard):
            args = (len(pos), None if labels is None else labels[pos], int(seeds[k]))
            parts.append((k, pos, self._send(k, *self._route.draw(k, args))))  # see ebmscale.buffer.route
        return parts

    def draw(self, n: int, labels: np.ndarray | None, rng: np.random.Generator) -> tuple[np.ndarray, list]:
        """``n`` chain starts drawn across the shards; the handle lists (shard, positions, slots,
        reinit mask)."""
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        plan = self.layout.plan(n if labels is None else len(labels), rng, self.mixing, self.mix_fraction)
        pre, self._prefetched = self._prefetched, None
        if (pre is not None and pre[0] == n and np.array_equal(pre[1][0], plan[0])
                and np.array_equal(pre[1][1], plan[1]) and same_labels(pre[3], labels)):
            parts = pre[2]
        else:
            parts = self._submit(plan, labels)
        results = self._get([job for _, _, job in parts])
        starts = [self._route.starts(k, len(pos), job[3], job[4], res,
                                     lambda k=k, args=job[4]: self._get([self._send(k, "sample", args[:3])])[0])
                  for (k, pos, job), res in zip(parts, results)]
        x = gather(len(plan[0]), self.shape, [pos for _, pos, _ in parts], [s for s, _, _ in starts])
        return x, [(k, pos, idx, reinit) for (k, pos, _), (_, idx, reinit) in zip(parts, starts)]

    def prefetch(self, n: int, rng: np.random.Generator, labels: np.ndarray | None = None) -> None:
        """Send the draw ``draw(n, labels, rng')`` will make with ``rng'`` equal to ``rng`` now
        (a draw with other arguments ignores it and asks again)."""
        if self.use_prefetch:
            labels = None if labels is None else np.asarray(labels, dtype=np.int64)
            plan = self.layout.plan(n if labels is None else len(labels), rng, self.mixing, self.mix_fraction)
            self._prefetched = (n, plan, self._submit(plan, labels), labels)

    def peek(self, n: int, rng: np.random.Generator, labels: np.ndarray | None = None) -> np.ndarray:
        """``n`` stored chains read across the shards (in proportion to their size, distinct slots
        within a shard), without re-initialisation or any change of state; after this rank's
        write-backs have landed. With ``labels``: one chain per label, from that class's part of
        the shard serving it, in the order of ``labels``."""
        self.flush()
        m = int(n) if labels is None else len(labels)
        shard, seeds = self.layout.plan(m, rng)
        if labels is None:
            counts = np.bincount(shard, minlength=len(self.shards))
            return np.concatenate(self._call_each("peek", [(k, (int(c), int(seeds[k]))) for k, c in enumerate(counts) if c]))
        labels = np.asarray(labels, dtype=np.int64)
        where = list(by_shard(shard))
        return gather(m, self.shape, [pos for _, pos in where],
                      self._call_each("peek", [(k, (len(pos), int(seeds[k]), labels[pos])) for k, pos in where]))

    def write_back(self, handle: list, x: np.ndarray) -> None:
        """Queue the evolved chains for their slots and return; waits only while more than
        ``max_inflight`` write requests of this rank are unfinished."""
        x = np.asarray(x)
        for k, pos, idx, reinit in handle:
            free = self._free_write_box(k, len(pos)) if x.dtype == np.float32 else None
            job = self._send(k, *self._route.write(k, pos, idx, reinit, self.chain_steps, x, free and free[1]))
            if free is not None:
                self._mail.writes[(k, free[0])] = job
            self._inflight.append(job)
        if len(self._inflight) > self.max_inflight:
            done = set(ray.wait([job[2] for job in self._inflight],
                                num_returns=len(self._inflight) - self.max_inflight)[0])
            finished = [job for job in self._inflight if job[2] in done]
            self._inflight = [job for job in self._inflight if job[2] not in done]
            self._get(finished)  # surfaces a shard that could not be restarted

    def _free_write_box(self, k: int, n: int) -> tuple[str, mailbox.Mailbox] | None:
        """A free write mailbox to shard ``k`` and its kind, or None (:meth:`ClientBoxes.free_write`)."""
        return self._mail.free_write(k, n, lambda: self._inflight,
                                     lambda job: bool(ray.wait([job[2]], timeout=0)[0]), self._landed)

    def _landed(self, job: tuple) -> None:
        """Wait until write-back ``job`` has landed and take it out of the jobs in flight."""
        self._inflight = [j for j in self._inflight if j is not job]
        self._get([job])

    def flush(self) -> None:
        """Wait until this rank's write-backs have landed."""
        if self._inflight:
            finished, self._inflight = self._inflight, []
            self._get(finished)

    # ------------------------------------------------------------------ node loss
    def _send(self, k: int, method: str, args: tuple) -> tuple:
        """Call ``shards[k].method(*args)`` (``link_draw``: no call, ref None; it went over a link); the job
        ``(shard, generation, ref, method, args)`` remembers the shard's actor, to send it again (see _get)."""
        ref = None if method == "link_draw" else getattr(self.shards[k], method).remote(*args)
        return k, self._generation[k], ref, method, args

    def _rehome(self, k: int, generation: int) -> None:
        """Shard ``k``'s actor of ``generation`` is gone for good (its node died): have the
        registry re-create it on a live node (once, whichever rank asks first), then take the new
        actor by name. Nothing to do when this rank already holds a newer actor."""
        if generation == self._generation[k]:
            self._generation[k], self._shard_nodes[k] = ray.get(self.registry.rehome.remote(k, generation))
            self.shards[k] = ray.get_actor(self.names[k], namespace=self.namespace)
            self._links.drop(k)  # to the old actor
            self._prefetched = None  # sent to the old actor
            self._set_capacities(self.capacities)  # this node's shards may have changed

    def _get(self, jobs: list[tuple]) -> list:
        """``ray.get`` of shard calls made by :meth:`_send`; a call whose shard was lost with its
        node is sent again to the shard's re-created actor."""
        out = []
        for job in jobs:
            for attempt in range(3):
                k, generation, ref, method, args = job
                try:
                    res = None if ref is None else ray.get(ref)
                except _SHARD_LOST:
                    if attempt == 2:
                        raise
                    self._rehome(k, generation)
                    job = self._send(k, *self._route.portable(k, method, args))
                    continue
                if method == "write_link" and res == link.RESEND:  # not over the link: send them by value
                    res = self._get([self._send(k, *self._route.portable(k, method, args))])[0]
                self._route.landed(method, args)
                out.append(res)
                break
        return out

    def _call_each(self, method: str, calls: list[tuple[int, tuple]]) -> list:
        """``shards[k].method(*args)`` for each ``(k, args)`` at once, surviving node loss (see _get)."""
        return self._get([self._send(k, method, args) for k, args in calls])

    def counters(self) -> dict[str, float]:
        """Shard restarts since the last call (rank 0 counts, others report 0: the metric is a sum).
        Polled without blocking: a restart shows up within a step or two."""
        delta = 0
        if self.rank == 0:
            if self._restart_poll is not None and ray.wait([self._restart_poll], timeout=0)[0]:
                total = int(ray.get(self._restart_poll))
                delta, self._restarts_seen, self._restart_poll = total - self._restarts_seen, total, None
            if self._restart_poll is None:
                self._restart_poll = self.registry.count.remote()
        return {"buffer_restarts": float(delta)}

    def health(self, subsample: int = health.DIVERSITY_SUBSAMPLE) -> dict | None:
        """On rank 0: the health counts of the whole buffer, merged from each shard's few numbers
        (diversity from pairs within each shard); None on other ranks (rank 0 reports it)."""
        if self.rank != 0:
            return None
        return health.merge(self._call_each("health", [(k, (subsample,)) for k in range(len(self.shards))]))

    def shard_info(self) -> list[dict]:
        """Per shard: pid, incarnation (restarts), capacity, node, and whether torch got imported."""
        return self._call_each("info", [(k, ()) for k in range(len(self.shards))])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """On rank 0: every shard's :meth:`ReplayBuffer.state_dict` (contents, labels, RNG) and the
        shard count; these states also become what a crashed shard restarts from. On other ranks
        ``shards`` is None (a global buffer is saved once)."""
        if self.rank != 0:
            return {"backend": "ray", "num_shards": len(self.shards), "shards": None}
        self.flush()
        states_raw = self._call_each("state_dict", [(k, ()) for k in range(len(self.shards))])
        # The restore point is put by rank 0 (stored on its node, owned by it), not left where each
        # shard made it: it must outlive the node of a shard that dies.
        self._take_snapshot([ray.put(st) for st in states_raw])
        # ray.get maps the arrays read-only from the object store: hand out writable copies.
        states = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()} for st in states_raw]
        return {"backend": "ray", "num_shards": len(self.shards), "shards": states}

    def load_state_dict(self, state: dict) -> None:
        """Rank 0 pushes the saved shards into the actors (re-split when the shard count or sizes
        differ, or from a local buffer's state); other ranks do nothing, so every rank may call it.
        A checkpoint's shard files (``{"sharded": step_path, "files": entries}``) are read by the
        shards themselves (:meth:`load_saved`)."""
        if "sharded" in state:
            return self.load_saved(state["sharded"], state["files"])
        if self.rank != 0:
            return
        shards = shard_states(as_numpy(state), self.capacities, self.num_classes)
        self.flush()
        self._prefetched = None
        self._call_each("load_state_dict", [(k, (s,)) for k, s in enumerate(shards)])
        self._take_snapshot([ray.put(s) for s in shards])

    def _take_snapshot(self, refs: list) -> None:
        self._snapshot_refs = refs  # rank 0 owns these objects: keep them referenced
        ray.get(self.registry.set_sources.remote([{"ref": [r]} for r in refs]))

    # ------------------------------------------------------------------ sharded checkpoints
    def save_shards(self, step_path: str) -> dict[str, dict]:
        """Rank 0: every shard writes its own files into checkpoint directory ``step_path`` at
        once (nothing of the buffer passes through this process); returns the marker entries.
        These files become what a crashed shard restarts from. Call after every rank's
        write-backs have landed (:meth:`flush` on every rank, then a barrier)."""
        self.flush()
        entries: dict[str, dict] = {}
        for e in self._call_each("save", [(k, (step_path,)) for k in range(len(self.shards))]):
            entries.update(e)
        self._snapshot_refs = []
        ray.get(self.registry.set_sources.remote(self.layout.file_sources(step_path)))
        return entries

    def verify_saved(self, step_path: str, files: dict[str, dict]) -> str | None:
        """Rank 0: the shards check a checkpoint's buffer files against the marker, in parallel
        (each file read once, where its shard runs); the first problem as one line, or None."""
        jobs = [(k % len(self.shards), (step_path, shardfile.files_of(files, k))) for k in shardfile.saved_shards(files)]
        return next((e for e in self._call_each("verify", jobs) if e), None)

    def load_saved(self, step_path: str, files: dict[str, dict]) -> None:
        """Restore a checkpoint's shard files (collective-safe: every rank takes the new layout;
        rank 0 has each shard read its own part, in parallel). Same shard count: shard k reads
        file k. Otherwise the saved chains are re-split into the current shard count, keeping
        every chain once (:func:`~ebmscale.buffer.shardfile.plan_load`), so the buffer keeps the
        checkpoint's number of chains."""
        caps, sources = shardfile.load_sources(step_path, files, len(self.shards))
        self._prefetched = None
        if self.rank == 0:
            self.flush()
            errors = [e for e in self._call_each("load", list(enumerate(sources))) if e]
            if errors:
                raise shardfile.ShardFileError(errors[0])
            self._snapshot_refs = []
            ray.get(self.registry.set_sources.remote([{"files": src} for src in sources]))
        self._set_capacities(caps)

    # ------------------------------------------------------------------ shutdown
    def close(self, clean: bool = True) -> None:
        """Release Ray. ``clean``: flush, and take the shards down only after every rank has
        (collective); after a failure just disconnect (rank 0's exit takes its actors along)."""
        if self.closed:
            return
        self.closed = True
        try:
            if clean:
                self.flush()
                self._barrier()  # every rank's writes have landed
                if self.rank != 0 and self._session is not None:
                    self._session.close()
                self._barrier()  # the other ranks have disconnected before rank 0 stops Ray
            if self.rank == 0 and self._session is not None and not self._session.owned:
                for a in [*self.shards, self.registry]:  # a Ray we did not start keeps running: free its actors
                    ray.kill(a, no_restart=True)
        finally:
            self._route.close()
            if self._session is not None:
                self._session.close()


def wait_for_nodes(address: str, nodes: int, timeout_s: float = 300.0) -> int:
    """Wait until the Ray cluster at ``address`` (host:port) has ``nodes`` live nodes and return
    how many it has; raises ConfigError naming the address when it has not within ``timeout_s``.
    For launch scripts (launch/slurm/train.sbatch) that start a cluster and then train on it;
    the token comes from RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN as for training."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:  # the head may not listen yet
        try:
            connect_cluster(address, "ebmscale-wait", timeout_s=5.0)
            break
        except ConfigError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)
    try:
        while True:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= nodes or time.monotonic() > deadline:
                break
            time.sleep(2.0)
    finally:
        ray.shutdown()
    if alive < nodes:
        raise ConfigError(f"the Ray cluster at '{address}' has {alive} of {nodes} nodes after {timeout_s:.0f} s")
    return alive
