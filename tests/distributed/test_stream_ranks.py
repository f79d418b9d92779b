"""The shard stream across ranks and real DataLoader workers: exact per-epoch coverage for each
source format, bitwise resume, and corrupt shards skipped and counted.

Ranks are simulated by building each rank's stream with explicit (rank, world) -- the stream
never consults torch.distributed -- and every stream here runs 2 real loader worker processes.
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ebmscale.data.builtin import DataError
from ebmscale.data.sources import load_source
from ebmscale.data.writer import write_shards
from ebmscale.data.manifest import open_shard_set
from ebmscale.data.stream import ShardStream, read_samples

WORKERS = 2


# --------------------------------------------------------------------------- tiny sources

def folder_source(root) -> str:
    """24 uniform images (id in red, class in green) of mixed sizes in 3 class folders."""
    for i in range(24):
        d = os.path.join(root, f"class{i % 3}")
        os.makedirs(d, exist_ok=True)
        a = np.zeros((9 + i % 4, 12 - i % 3, 3), np.uint8)
        a[...] = (i, i % 3, 50)
        Image.fromarray(a).save(os.path.join(d, f"{i}.png"))
    return str(root)


def cifar_source(path) -> str:
    """A CIFAR-10 python archive with 5 x 5 training images (id in the first pixel's red)."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        blobs = {"batches.meta": {b"label_names": [f"c{i}".encode() for i in range(10)]}}
        for b in range(1, 6):
            x = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
            ids = np.arange((b - 1) * 5, b * 5)
            x[:, 0, 0, 0] = ids
            blobs[f"data_batch_{b}"] = {b"data": x.reshape(5, 3072), b"labels": (ids % 10).tolist()}
        blobs["test_batch"] = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
        for name, d in blobs.items():
            raw = pickle.dumps(d, protocol=2)
            ti = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            ti.size = len(raw)
            tar.addfile(ti, io.BytesIO(raw))
    return str(path)


def npz_source(path, n: int = 24) -> str:
    """``n`` grey 6x6 images, id in the first pixel, label = id mod 4."""
    x = np.random.default_rng(1).integers(0, 256, (n, 6, 6), dtype=np.uint8)
    x[:, 0, 0] = np.arange(n)
    np.savez(path, x=x, y=np.arange(n) % 4)
    return str(path)


def label_of(kind: str, i: int) -> int:
    return {"folder": i % 3, "cifar10": i % 10, "npz": i % 4}[kind]


def stream(shards, rank: int, world: int = 2, batch: int = 4, **kw) -> ShardStream:
    opts = dict(seed=7, num_workers=WORKERS, shuffle_buffer=5, chunk_size=4)
    opts.update(kw)
    return ShardStream(shards, batch, rank=rank, world=world, **opts)


def take(s: ShardStream, batches: int) -> tuple[list[int], list[int]]:
    """ids (first pixel) and labels of the next ``batches`` batches."""
    ids, labels = [], []
    for _ in range(batches):
        x, y = next(s)
        ids += x[:, 0, 0, 0].tolist()
        labels += y.tolist()
    return ids, labels


# --------------------------------------------------------------------------- coverage

@pytest.mark.parametrize("kind", ["folder", "cifar10", "npz"])
def test_each_sample_once_per_epoch_across_2_ranks_x_2_workers(tmp_path, kind):
    make = {"folder": lambda: folder_source(tmp_path / "tree"), "cifar10": lambda: cifar_source(tmp_path / "c.tar.gz"),
            "npz": lambda: npz_source(tmp_path / "d.npz")}[kind]
    write_shards(load_source(kind, make()), str(tmp_path / "shards"), resolution=8 if kind == "folder" else 0,
                 shard_size=5, processes=1)
    shards = open_shard_set(str(tmp_path / "shards"))
    n = shards.num_samples                      # 24, or 25 for the CIFAR archive
    per_rank = n // 2                           # 12: both ranks equal, in lockstep
    epochs = {0: [], 1: []}
    for rank in range(2):
        s = stream(shards, rank)
        ids, labels = take(s, 2 * per_rank // 4)  # two epochs in batches of 4
        assert labels == [label_of(kind, i) for i in ids]
        epochs[0].append(ids[:per_rank])
        epochs[1].append(ids[per_rank:])
        assert s.epoch == 2 and s.skipped == 0
        assert ids[:per_rank] != ids[per_rank:], "a new shard and sample order every epoch"
    for e, (r0, r1) in epochs.items():
        assert not set(r0) & set(r1), f"epoch {e}: a sample went to both ranks"
        seen = r0 + r1
        assert len(set(seen)) == len(seen) == 2 * per_rank, f"epoch {e}: a duplicate within a rank"
        assert set(seen) <= set(range(n)) and n - len(seen) == n % 2, "only the N mod world remainder sits out"
    again = stream(shards, 0)
    assert take(again, 3)[0] == epochs[0][0], "deterministic given (seed, rank, epoch)"
    assert take(stream(shards, 0, seed=8), 3)[0] != epochs[0][0]


# --------------------------------------------------------------------------- resume

def test_resumed_stream_equals_the_uninterrupted_one(tmp_path):
    write_shards(load_source("npz", npz_source(tmp_path / "d.npz", 60)), str(tmp_path / "s"), shard_size=7)
    shards = open_shard_set(str(tmp_path / "s"))
    opts = dict(batch=7, chunk_size=5, shuffle_buffer=6)   # batches straddle chunks and epochs (30 per rank)
    full = stream(shards, 1, **opts)
    reference = [next(full) for _ in range(14)]
    for cut in (5, 8):                                     # at a chunk boundary (35 = 7 x 5) and inside one
        first = stream(shards, 1, **opts)
        for _ in range(cut):
            next(first)
        state = first.state_dict()
        first.close()
        resumed = stream(shards, 1, **opts)
        resumed.load_state_dict(state)
        for i in range(cut, 14):
            x, y = next(resumed)
            assert torch.equal(x, reference[i][0]) and torch.equal(y, reference[i][1]), f"batch {i} after cut {cut}"
        assert resumed.samples == 14 * 7 and resumed.state_dict() == full.state_dict()
    with pytest.raises(DataError, match="data.num_workers"):
        stream(shards, 1, num_workers=0, **opts).load_state_dict(state)


def test_a_dead_loader_worker_is_replaced_and_the_batches_stay_exact(tmp_path, monkeypatch):
    """A worker killed by a signal while it decodes (as a decoder's segfault on a bad file would
    kill it): the stream starts a new loader at the chunk being made, counts the restart, and
    delivers the batches of an uninterrupted stream. A worker that dies every time is an error
    after WORKER_RESTARTS restarts."""
    import signal

    from ebmscale.data import stream as stream_module

    write_shards(load_source("npz", npz_source(tmp_path / "d.npz", 60)), str(tmp_path / "s"), shard_size=7)
    shards = open_shard_set(str(tmp_path / "s"))
    opts = dict(batch=7, chunk_size=5, shuffle_buffer=6)
    full = stream(shards, 1, **opts)
    reference = [next(full) for _ in range(10)]
    full.close()

    decode = stream_module.decode_sample
    deaths = tmp_path / "deaths"

    def dying_decode(sample, shape, num_classes, limit: int = 1):
        # In a loader worker (a forked copy of this function): the first `limit` calls after a
        # sample of id 30 or more die by SIGKILL, once per call, recorded in a file.
        out = decode(sample, shape, num_classes)
        if out is not None and out[0][0, 0, 0] >= 30 and os.getpid() != parent:
            n = len(deaths.read_text()) if deaths.exists() else 0
            if n < limit:
                deaths.write_text("x" * (n + 1))
                os.kill(os.getpid(), signal.SIGKILL)
        return out

    parent = os.getpid()
    monkeypatch.setattr(stream_module, "decode_sample", dying_decode)
    s = stream(shards, 1, **opts)
    for i in range(10):
        x, y = next(s)
        assert torch.equal(x, reference[i][0]) and torch.equal(y, reference[i][1]), f"batch {i}"
    assert s.worker_restarts == 1 and deaths.read_text() == "x"
    assert s.stats()["data_worker_restarts"] == 1.0
    s.close()

    deaths.unlink()
    monkeypatch.setattr(stream_module, "decode_sample",
                        lambda *a: dying_decode(*a, limit=100))  # every worker dies on its first id >= 30
    s = stream(shards, 1, **opts)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        for _ in range(10):
            next(s)
    assert s.worker_restarts == stream_module.WORKER_RESTARTS


# --------------------------------------------------------------------------- bad input

def _member(tar_path: str, suffix: str, index: int) -> tarfile.TarInfo:
    with tarfile.open(tar_path) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(suffix)][index]


def test_corrupt_shards_are_skipped_counted_and_resumed_exactly(tmp_path):
    # 60 samples in shards of 7: per rank 30, per worker 15 = 3 chunks of 5.
    write_shards(load_source("npz", npz_source(tmp_path / "d.npz", 60)), str(tmp_path / "s"), shard_size=7)
    shards = open_shard_set(str(tmp_path / "s"))
    ids_at = {}  # (shard, position) -> id, read before the damage
    for seg in shards.segments:
        for pos, (x, _) in enumerate(read_samples([seg], shards.shape, shards.num_classes)):
            ids_at[(os.path.basename(seg.url), pos)] = int(x[0, 0, 0])
    # An undecodable image: garbage over the PNG header of shard 2's fourth sample.
    bad_png = _member(str(tmp_path / "s" / "shard-000002.tar"), ".png", 3)
    with open(tmp_path / "s" / "shard-000002.tar", "r+b") as fh:
        fh.seek(bad_png.offset_data + 8)
        fh.write(b"\xff" * 24)
    # A corrupt tar member: garbage over the header of shard 5's sixth image ends that shard
    # there (the file keeps its size, so nothing can tell at start), losing its last 2 samples.
    hit = _member(str(tmp_path / "s" / "shard-000005.tar"), ".png", 5)
    with open(tmp_path / "s" / "shard-000005.tar", "r+b") as fh:
        fh.seek(hit.offset)
        fh.write(b"\x07" * 512)
    bad_ids = {ids_at[("shard-000002.tar", 3)], ids_at[("shard-000005.tar", 5)], ids_at[("shard-000005.tar", 6)]}

    delivered, skipped = [], {}
    for rank in range(2):
        s = stream(shards, rank, batch=1, chunk_size=5, shuffle_buffer=6)
        while s.epoch == 0:  # one epoch, sample by sample (no chunk of this data ends up empty)
            delivered += take(s, 1)[0]
        skipped[rank] = s.skipped
    assert sum(skipped.values()) == 3, "1 undecodable image + 2 samples behind the bad header, counted"
    assert sorted(delivered) == sorted(set(range(60)) - bad_ids), "everything else once, no crash"

    # Resume inside a chunk whose skips were already counted: neither lost nor counted twice.
    rank = max(skipped, key=skipped.get)
    full = stream(shards, rank, batch=1, chunk_size=5, shuffle_buffer=6)
    reference, counts = [], []
    for _ in range(70):                                     # past two epochs of 30
        reference.append(next(full)[0])
        counts.append(full.skipped)
    first = next(i for i, c in enumerate(counts) if c > 0)  # the first sample of the chunk carrying a skip
    for cut in (first, first + 1):  # just before that chunk (offset 0), and one sample into it
        part = stream(shards, rank, batch=1, chunk_size=5, shuffle_buffer=6)
        for _ in range(cut):
            next(part)
        assert (part.state_dict()["offset"] > 0) == (cut > first)
        resumed = stream(shards, rank, batch=1, chunk_size=5, shuffle_buffer=6)
        resumed.load_state_dict(part.state_dict())
        for i in range(cut, 70):
            assert torch.equal(next(resumed)[0], reference[i]), f"sample {i} after a cut at {cut}"
        assert resumed.skipped == full.skipped == counts[-1] > 0, f"cut at {cut}"
    assert resumed.stats()["data_skipped"] == float(full.skipped)


def test_unlabelled_shards_stream_images_only(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", images=x)
    write_shards(load_source("npz", str(tmp_path / "u.npz")), str(tmp_path / "s"), shard_size=3)
    s = stream(open_shard_set(str(tmp_path / "s")), 0, world=1, batch=5)
    got = [next(s) for _ in range(2)]
    assert all(y is None for _, y in got)
    seen = torch.cat([b for b, _ in got]).permute(0, 2, 3, 1).numpy()
    assert sorted(a.tobytes() for a in seen) == sorted(a.tobytes() for a in x)
