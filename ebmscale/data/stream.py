"""The resumable webdataset stream: exact per-epoch coverage across ranks and loader workers.

What one epoch is (every process computes the same plan from the manifest alone):

1. The training samples are the manifest's shards in manifest order, minus the last ``holdout``
   samples; each shard is a *segment* ``(url, begin, end)`` of sample positions in its tar.
2. Shard shuffle: the segments are permuted by a generator seeded with ``(seed, epoch)`` --
   the same on every rank, which is what makes the split below a partition.
3. Split by node: the permuted segments are concatenated and cut into ``world`` contiguous
   ranges of ``N // world`` samples; rank ``r`` takes range ``r``. The last ``N % world``
   samples of the permuted order (fewer than ``world``, and a different shard's tail each epoch)
   sit the epoch out, so every rank consumes exactly the same number of samples per epoch and
   ranks never drift apart. Shards are never split up physically: a range that starts inside a
   shard reads past that shard's first samples without decoding them.
4. Split by worker: the rank's range is cut the same way into ``S = max(1, num_workers)``
   near-equal contiguous splits, one per DataLoader worker.
5. Sample shuffle: each split streams its segments (webdataset's ``gopen`` and key grouping over
   a fast tar reader, :func:`ebmscale.data.tar.iter_tar`) through webdataset's shuffle buffer of
   ``shuffle_buffer`` raw (undecoded) samples, seeded with ``(seed, rank, epoch, split)``.
6. Each split emits exactly ``K`` chunks per epoch (``K`` = chunks of the largest split, so
   all splits emit the same number); a chunk is the next ``chunk_size`` raw samples, decoded to
   uint8 in the worker, minus the bad ones. The rank's stream is the chunks in round-robin order
   (chunk ``k`` of an epoch comes from split ``k % S``), which is also the order in which
   PyTorch's DataLoader returns the outputs of its workers; the main process cuts that sample
   sequence into batches, which may straddle epochs. Epochs follow each other endlessly.

So with R ranks each sample is seen exactly once per epoch (N divisible by R; otherwise at most
once, with fewer than R left out), and the sequence of samples a rank sees is a pure function of
(shards, holdout, seed, rank, world, num_workers, shuffle_buffer, chunk_size) -- not of the batch
size, nor of timing.

Resume: the position is (epoch, chunk index within the epoch, samples already taken from that
chunk). A resumed stream restarts its workers at that chunk: each worker replays its epoch's tar
reading and shuffle buffer up to there without decoding (the buffer's state depends on all it has
seen), then continues, so the resumed batches are bitwise identical to the uninterrupted ones.

Bad input mid-run (a corrupt tar member, a truncated or unreadable shard, an undecodable image,
a wrong-sized image, a bad label) is skipped and counted, never raised. Counts travel with the
chunks to the main process, where ``stream.skipped`` holds this rank's total, so the trainer can
report it as a metric. A rank that skips samples reaches its epoch's end a few samples early;
batches stay full and ranks stay in step. Problems visible before reading -- a pattern matching
nothing, a missing manifest or shard, a local shard whose size differs from its manifest --
fail at start instead (:func:`ebmscale.data.manifest.open_shard_set`).
"""
from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from ebmscale.data.builtin import DataError
from ebmscale.data.codec import decode_sample
from ebmscale.data.manifest import Segment, ShardSet, take_range
from ebmscale.data.tar import tar_samples
from ebmscale.utils import even_share, hash_seed

log = logging.getLogger(__name__)

# Restarts of the loader in a row (for one chunk) before a dying worker is an error.
WORKER_RESTARTS = 3

CHUNK_SIZE = 64          # samples per worker -> main-process message; part of the stream's definition
_SHARD_ORDER_TAG = 0x5A4D5301
_SAMPLE_ORDER_TAG = 0x5A4D5302


# --------------------------------------------------------------------------- epoch plan

@dataclass(frozen=True)
class StreamPlan:
    """Everything that defines a rank's sample sequence; picklable, sent to loader workers."""

    segments: tuple[Segment, ...]
    shape: tuple[int, int, int]
    num_classes: int
    seed: int
    rank: int
    world: int
    splits: int
    chunk_size: int
    shuffle_buffer: int

    @property
    def per_rank(self) -> int:
        """Samples each rank reads per epoch."""
        return sum(len(s) for s in self.segments) // self.world

    @property
    def chunks_per_split(self) -> int:
        """K: chunks every split emits per epoch (enough for the largest split)."""
        return max(1, math.ceil(math.ceil(self.per_rank / self.splits) / self.chunk_size))

    @property
    def chunks_per_epoch(self) -> int:
        return self.chunks_per_split * self.splits

    def split_segments(self, epoch: int, split: int) -> list[Segment]:
        """The segments split ``split`` of this rank reads in ``epoch`` (shard shuffle + node/worker split)."""
        order = np.random.default_rng([self.seed, epoch, _SHARD_ORDER_TAG]).permutation(len(self.segments))
        permuted = [self.segments[i] for i in order]
        r0 = self.rank * self.per_rank
        s0, count = even_share(self.per_rank, self.splits, split)
        s1 = s0 + count
        return take_range(permuted, r0 + s0, r0 + s1)

    def chunks(self, split: int, epoch: int, first_chunk: int) -> Iterator["Chunk"]:
        """Endless chunks of one split, from chunk ``first_chunk`` of ``epoch`` on."""
        import webdataset as wds

        k_per_split = self.chunks_per_split
        while True:
            reader = _SegmentReader()
            raw: Iterator[dict] = reader.samples(self.split_segments(epoch, split))
            if self.shuffle_buffer > 1:
                rng = random.Random(hash_seed(self.seed, self.rank, epoch, split, _SAMPLE_ORDER_TAG))
                raw = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(raw)
            for j in range(k_per_split):
                k = j * self.splits + split
                items = list(itertools.islice(raw, self.chunk_size))
                if j == k_per_split - 1:
                    # Run the reader to its end so that losses found at a shard's tail are counted
                    # in this epoch; K chunks always hold the whole split, so nothing is left.
                    leftover = next(raw, None)
                    assert leftover is None, "internal: a split holds more samples than its K chunks"
                lost, reader.lost = reader.lost, 0
                if k < first_chunk:  # only in the start epoch: first_chunk is 0 afterwards
                    continue  # resume fast-forward: read for the shuffle buffer's state, not decoded or sent
                yield self._decode(items, epoch, k, lost)
            epoch += 1
            first_chunk = 0

    def _decode(self, items: list[dict], epoch: int, k: int, lost: int) -> "Chunk":
        xs, ys = [], []
        bad = 0
        for sample in items:
            out = decode_sample(sample, self.shape, self.num_classes)
            if out is None:
                bad += 1
                continue
            xs.append(out[0])
            ys.append(out[1])
        x = to_nchw(xs, self.shape)
        y = torch.tensor(ys, dtype=torch.int64) if self.num_classes else None
        return Chunk(x, y, epoch, k, bad + lost)


class Chunk(NamedTuple):
    """What a loader worker sends: decoded uint8 images, labels, where they sit, and how many
    samples of this stretch were skipped as bad."""

    x: torch.Tensor
    y: torch.Tensor | None
    epoch: int
    index: int
    skipped: int


# --------------------------------------------------------------------------- reading

class _SegmentReader:
    """Reads segments, counting (in ``lost``) the planned samples a broken shard did not deliver."""

    def __init__(self) -> None:
        self.lost = 0

    def samples(self, segments: Sequence[Segment]) -> Iterator[dict]:
        for seg in segments:
            got = 0
            errors: list[Exception] = []
            try:
                for i, sample in enumerate(tar_samples(seg.url, errors)):
                    if i < seg.begin:
                        continue  # before this range: read past, never decoded
                    if i >= seg.end:
                        break
                    got += 1
                    yield sample
            except Exception as exc:  # noqa: BLE001 - any read failure of a shard: skip the rest of it, counted
                errors.append(exc)
            if got < len(seg):  # an error above, or tarfile ending quietly at a damaged header
                why = f" ({type(errors[0]).__name__}: {errors[0]})" if errors else ""
                log.warning("shard %s ended after %d of its samples %d..%d%s; the rest are skipped",
                            seg.url, got, seg.begin, seg.end - 1, why)
            self.lost += len(seg) - got


def to_nchw(images: Sequence[np.ndarray], shape: tuple[int, int, int]) -> torch.Tensor:
    """HWC uint8 images -> one contiguous NCHW uint8 tensor, in NumPy: stacking per-image CHW
    views in torch would give channels-last strides, and torch's multi-threaded copy of small
    tensors costs milliseconds when the cores are busy (as they are, with the sampler running)."""
    if not images:
        return torch.empty((0, *shape), dtype=torch.uint8)
    return torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))


def read_samples(segments: Sequence[Segment], shape: tuple[int, int, int],
                 num_classes: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Decoded ``(uint8 CHW image, label or -1)`` of segments in file order, bad samples left out
    (e.g. to read a held-out split or check a conversion)."""
    for sample in _SegmentReader().samples(segments):
        out = decode_sample(sample, shape, num_classes)
        if out is not None:
            yield to_nchw([out[0]], shape)[0], out[1]


# --------------------------------------------------------------------------- the stream

class _SplitDataset(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: the chunks of the split this worker serves."""

    def __init__(self, plan: StreamPlan, epoch: int, first_chunk: int):
        super().__init__()
        self.plan, self.epoch, self.first_chunk = plan, epoch, first_chunk

    def __iter__(self) -> Iterator[Chunk]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.plan.splits:
            raise RuntimeError(f"stream planned for {self.plan.splits} workers runs in {workers}")
        # The DataLoader asks worker 0 first; on resume the next chunk may belong to another split,
        # so worker i serves split (i + first_chunk) mod S and the round robin lines up again.
        split = (worker + self.first_chunk) % workers
        return self.plan.chunks(split, self.epoch, self.first_chunk)


class ShardStream:
    """Endless, resumable batches ``(x uint8 NCHW, y int64 or None)`` of exactly ``batch_size``
    from webdataset shards, for one rank (see the module docstring for the exact semantics).

    ``skipped`` counts this rank's bad samples so far; ``samples`` the samples it has consumed;
    ``epoch`` is the epoch of the next sample.
    """

    def __init__(self, shards: ShardSet, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 num_workers: int = 0, shuffle_buffer: int = 1000, chunk_size: int = CHUNK_SIZE,
                 pin_memory: bool = False):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        if batch_size < 1 or chunk_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError("batch_size and chunk_size must be >= 1, num_workers and shuffle_buffer >= 0")
        if shards.num_samples < world:
            raise DataError(f"'{shards.manifest_path}' has {shards.num_samples} training samples, "
                            f"fewer than the {world} ranks")
        self.shards = shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        # Batches in page-locked memory, so that the trainer's .to(cuda, non_blocking=True) is a
        # real asynchronous copy (pinned chunks would not help: a batch is joined from chunks).
        self.pin_memory = pin_memory
        self.plan = StreamPlan(tuple(shards.segments), shards.shape, shards.num_classes, int(seed), rank, world,
                               max(1, num_workers), chunk_size, shuffle_buffer)
        self.epoch, self.chunk, self.offset = 0, 0, 0
        self.samples, self.skipped = 0, 0
        self.worker_restarts = 0  # loaders restarted after a worker died (see _next_chunk)
        self._it: Iterator[Chunk] | None = None
        self._loader = None
        self._current: Chunk | None = None
        self._count_next_chunk = True

    # ------------------------------------------------------------------ iteration
    def _start(self) -> Iterator[Chunk]:
        ds = _SplitDataset(self.plan, self.epoch, self.chunk)
        if self.num_workers == 0:
            return iter(ds)
        # Import the reader and decoder here, once: forked workers inherit them instead of each
        # importing them again on every (re)start.
        import PIL.Image  # noqa: F401
        import PIL.PngImagePlugin  # noqa: F401
        import webdataset  # noqa: F401
        # Our own generator: creating the iterator must not draw from the global torch RNG (that
        # would shift the trainer's random stream depending on when the loader starts).
        self._loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                   generator=torch.Generator().manual_seed(0))
        return iter(self._loader)

    def _next_chunk(self) -> Chunk:
        for attempt in range(WORKER_RESTARTS + 1):
            if self._it is None:
                self._it = self._start()
            try:
                c = next(self._it)
                break
            except RuntimeError as exc:
                # A loader worker that died (a decoder's segfault on a bad file, the OOM killer):
                # the stream knows its exact position, so a new loader starts at the chunk that
                # was being made, and the batches are those of an uninterrupted stream.
                if self._loader is None or "DataLoader worker" not in str(exc) or attempt == WORKER_RESTARTS:
                    raise
                log.warning("data loader worker died (%s); restarting the loader at chunk %d of epoch %d",
                            exc, self.chunk, self.epoch)
                self.worker_restarts += 1
                self._it, self._loader = None, None
        if (c.epoch, c.index) != (self.epoch, self.chunk):
            raise RuntimeError(f"data stream out of order: got chunk {c.index} of epoch {c.epoch}, "
                               f"expected {self.chunk} of {self.epoch}")
        if self._count_next_chunk:
            self.skipped += c.skipped
        self._count_next_chunk = True
        return c

    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        xs, ys = [], []
        need = self.batch_size
        while need:
            if self._current is None:
                self._current = self._next_chunk()
            c = self._current
            take = min(need, len(c.x) - self.offset)
            if take > 0:
                xs.append(c.x[self.offset:self.offset + take])
                if c.y is not None:
                    ys.append(c.y[self.offset:self.offset + take])
                self.offset += take
                need -= take
            if self.offset >= len(c.x):  # chunk used up (or empty): move to the next one
                self._current, self.offset = None, 0
                self.chunk += 1
                if self.chunk == self.plan.chunks_per_epoch:
                    self.epoch, self.chunk = self.epoch + 1, 0
        self.samples += self.batch_size
        # Joined in NumPy (see to_nchw), always copied: the batch owns its memory, not a view of a chunk.
        x = torch.from_numpy(np.concatenate([p.numpy() for p in xs]))
        y = torch.from_numpy(np.concatenate([p.numpy() for p in ys])) if ys else None
        if self.pin_memory:
            x, y = x.pin_memory(), (None if y is None else y.pin_memory())
        return x, y

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """This rank's position; with :meth:`load_state_dict` a resumed stream continues exactly."""
        p = self.plan
        return {"epoch": self.epoch, "chunk": self.chunk, "offset": self.offset, "samples": self.samples,
                "skipped": self.skipped, "seed": p.seed, "rank": p.rank, "world": p.world, "splits": p.splits,
                "chunk_size": p.chunk_size, "shuffle_buffer": p.shuffle_buffer,
                "shards": self.shards.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. Everything that defines the sample order must be unchanged;
        a mismatch raises DataError naming the setting."""
        p = self.plan
        # Not the rank: positions agree across ranks (equal chunk layouts) unless samples were skipped.
        checks = [("shards", "the shards (or data.holdout)", self.shards.fingerprint),
                  ("seed", "train.seed", p.seed),
                  ("world", "the number of ranks", p.world),
                  ("splits", "data.num_workers (as max(1, n))", p.splits),
                  ("chunk_size", "the chunk size", p.chunk_size),
                  ("shuffle_buffer", "data.shuffle_buffer", p.shuffle_buffer)]
        for key, what, now in checks:
            if key in state and state[key] != now:
                raise DataError(f"cannot resume the data stream: {what} was {state[key]!r}, now {now!r}; "
                                f"the sample order depends on it")
        epoch, chunk, offset = int(state["epoch"]), int(state["chunk"]), int(state["offset"])
        if not (epoch >= 0 and 0 <= chunk < p.chunks_per_epoch and 0 <= offset < p.chunk_size):
            raise DataError(f"data stream state out of range: epoch {epoch}, chunk {chunk}, offset {offset}")
        self.close()
        self.epoch, self.chunk, self.offset = epoch, chunk, offset
        self.samples, self.skipped = int(state.get("samples", 0)), int(state.get("skipped", 0))
        # A partly used chunk is produced again; its skip count is already in ``skipped``.
        self._count_next_chunk = offset == 0

    def close(self) -> None:
        """Stop the loader workers (a new iterator starts on the next batch)."""
        self._it, self._loader, self._current = None, None, None

    def stats(self) -> dict[str, float]:
        """Counters for the metrics log."""
        return {"data_skipped": float(self.skipped), "data_epoch": float(self.epoch),
                "data_samples": float(self.samples), "data_worker_restarts": float(self.worker_restarts)}
