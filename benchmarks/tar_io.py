"""Tar I/O per member: the hand-written reader and writer (ebmscale/data/tar.py) against Python's
tarfile and webdataset's own tar reader and TarWriter, on the same shards.

The script writes ``--shards`` shards of ``--samples`` photographic crops each (``make_images``
of benchmarks/data_loader.py, at ``--size``, labelled) with the project's writer (``write_shards``),
once per member ``--formats`` (PNG, JPEG), and then times, from the page cache:

* read: every sample of every shard, members grouped into samples by webdataset's
  ``group_by_keys`` for all three -- ``iter_tar`` (hand), ``tarfile.open(mode="r|")`` streaming
  (tarfile), ``webdataset.tariterators.tar_file_iterator`` (webdataset, tarfile underneath);
* write: the same members (already encoded) into new shards -- ``TarSink`` (hand),
  ``tarfile.open(mode="w")`` + ``addfile`` (tarfile), ``webdataset.TarWriter(encoder=False)``
  (webdataset). Every written shard is read back and compared with its source, outside the timing.

Each measurement is repeated ``--repeats`` times (implementations interleaved) and the fastest is
reported, the least disturbed on a shared machine. Prints a Markdown table, then one JSON line.

    .venv/bin/python benchmarks/tar_io.py                          # 8 shards x 1000, 32x32, PNG and JPEG
    .venv/bin/python benchmarks/tar_io.py --shards 2 --samples 20 --repeats 1   # seconds
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from typing import Callable, Iterator

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import print_report  # noqa: E402
from benchmarks.data_loader import make_images  # noqa: E402
from ebmscale.data.manifest import read_manifest  # noqa: E402
from ebmscale.data.sources import Source  # noqa: E402
from ebmscale.data.tar import TarSink, iter_tar  # noqa: E402
from ebmscale.data.writer import write_shards  # noqa: E402

IMPLS = ("hand", "tarfile", "webdataset")


# --------------------------------------------------------------------------- readers: {"fname", "data"} per member

def members_hand(path: str) -> Iterator[dict]:
    errors: list[Exception] = []
    with open(path, "rb") as fh:
        yield from iter_tar(fh, errors)
    if errors:
        raise errors[0]


def members_tarfile(path: str) -> Iterator[dict]:
    with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for m in tar:
            if m.isreg():
                yield {"fname": m.name, "data": tar.extractfile(m).read()}


def members_webdataset(path: str) -> Iterator[dict]:
    from webdataset.tariterators import tar_file_iterator

    with open(path, "rb") as fh:
        yield from tar_file_iterator(fh)


READERS: dict[str, Callable[[str], Iterator[dict]]] = {
    "hand": members_hand, "tarfile": members_tarfile, "webdataset": members_webdataset}


def read_all(impl: str, paths: list[str]) -> int:
    """Samples of every shard, grouped into samples as the stream groups them."""
    from webdataset.tariterators import group_by_keys

    n = 0
    for p in paths:
        for _sample in group_by_keys({**m, "__url__": p} for m in READERS[impl](p)):
            n += 1
    return n


# --------------------------------------------------------------------------- writers

def write_hand(path: str, members: list[tuple[str, bytes]]) -> None:
    with TarSink(path, mtime=0) as sink:
        for name, data in members:
            sink.add(name, data)


def write_tarfile(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o444
            tar.addfile(ti, io.BytesIO(data))


def write_webdataset(path: str, members: list[tuple[str, bytes]]) -> None:
    import webdataset as wds

    samples: dict[str, dict] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        samples.setdefault(key, {"__key__": key})[ext] = data
    with wds.TarWriter(path, encoder=False, mtime=0) as w:
        for s in samples.values():
            w.write(s)


WRITERS: dict[str, Callable[[str, list[tuple[str, bytes]]], None]] = {
    "hand": write_hand, "tarfile": write_tarfile, "webdataset": write_webdataset}


# --------------------------------------------------------------------------- the benchmark

def make_shards(root: str, images: np.ndarray, per_shard: int, image_format: str) -> list[str]:
    """Shards of ``images`` (labelled 0..9 in turn) written by the project's writer; their paths."""
    n, size = len(images), images.shape[1]
    labels = np.arange(n, dtype=np.int64) % 10
    src = Source("bench", "", "", labels, [str(i) for i in range(10)], 3, images=images, shape=(3, size, size))
    out = os.path.join(root, image_format)
    write_shards(src, out, shard_size=per_shard, processes=1, shuffle=False, image_format=image_format,
                 quality=90)
    return [os.path.join(out, s["name"]) for s in read_manifest(out)["shards"]]


def bench_format(root: str, paths: list[str], fmt: str, repeats: int) -> list[dict]:
    members = {p: [(m["fname"], m["data"]) for m in members_hand(p)] for p in paths}
    n_members = sum(len(v) for v in members.values())
    n_samples = read_all("hand", paths)  # also warms the page cache
    read_bytes = sum(os.path.getsize(p) for p in paths)
    times: dict[tuple[str, str], list[float]] = {}
    written: dict[str, int] = {}
    for _ in range(repeats):
        for impl in IMPLS:
            t0 = time.perf_counter()
            got = read_all(impl, paths)
            times.setdefault(("read", impl), []).append(time.perf_counter() - t0)
            if got != n_samples:
                raise SystemExit(f"tar_io: {impl} read {got} samples, expected {n_samples}")
        for impl in IMPLS:
            out = os.path.join(root, f"out-{fmt}-{impl}")
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            targets = [os.path.join(out, os.path.basename(p)) for p in paths]
            t0 = time.perf_counter()
            for p, q in zip(paths, targets):
                WRITERS[impl](q, members[p])
            times.setdefault(("write", impl), []).append(time.perf_counter() - t0)
            for p, q in zip(paths, targets):  # same members (TarWriter orders each sample's by extension)
                if sorted((m["fname"], m["data"]) for m in members_hand(q)) != sorted(members[p]):
                    raise SystemExit(f"tar_io: {impl} wrote {q} with other members than {p}")
            written[impl] = sum(os.path.getsize(q) for q in targets)
    rows = []
    for (op, impl), ts in times.items():
        best = min(ts)
        nbytes = read_bytes if op == "read" else written[impl]
        rows.append({"op": op, "format": fmt, "impl": impl, "shards": len(paths), "samples": n_samples,
                     "members": n_members, "mb": nbytes / 1e6, "seconds": best, "seconds_median": statistics.median(ts),
                     "samples_per_s": n_samples / best, "mb_per_s": nbytes / 1e6 / best,
                     "us_per_member": best / n_members * 1e6})
    for r in rows:
        hand = next(h for h in rows if (h["op"], h["impl"]) == (r["op"], "hand"))
        r["vs_hand"] = hand["seconds"] / r["seconds"]  # < 1: slower than the hand-written one
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--samples", type=int, default=1000, help="samples per shard")
    ap.add_argument("--size", type=int, default=32, help="image side")
    ap.add_argument("--formats", nargs="+", default=["png", "jpg"], choices=("png", "jpg", "npy"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import webdataset

    root = tempfile.mkdtemp(prefix="ebmscale-tario-")
    rows = []
    try:
        images = make_images(args.shards * args.samples, args.size)
        for fmt in args.formats:
            paths = make_shards(root, images, args.samples, fmt)
            rows += bench_format(root, paths, fmt, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print_report(rows, [("op", lambda r: r["op"]), ("members", lambda r: r["format"]),
                        ("impl", lambda r: r["impl"]), ("samples/s", lambda r: f"{r['samples_per_s']:,.0f}"),
                        ("MB/s", lambda r: f"{r['mb_per_s']:.0f}"),
                        ("us/member", lambda r: f"{r['us_per_member']:.1f}"),
                        ("speed vs hand", lambda r: f"{r['vs_hand']:.2f}x")],
                 meta={"benchmark": "tar_io", "cpu": cpu, "cores": os.cpu_count(),
                       "load_avg_1min": os.getloadavg()[0], "webdataset": webdataset.__version__,
                       "python": platform.python_version(), "shards": args.shards, "samples_per_shard": args.samples,
                       "size": args.size, "repeats": args.repeats})


if __name__ == "__main__":
    main()
