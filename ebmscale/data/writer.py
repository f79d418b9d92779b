"""The shard writer: any :class:`~ebmscale.data.sources.Source` as webdataset tar shards plus a
manifest, and the first-use cache that converts a training source once.

* the samples are put in a seeded random order first (class-sorted sources such as a folder tree
  would otherwise give single-class shards that a streaming shuffle buffer cannot mix);
* images are resized (shorter side) and centre-cropped to ``resolution`` when it is non-zero and
  differs from the image, then stored as PNG (lossless, ``<key>.png``), JPEG or npy
  (:mod:`ebmscale.data.codec`) with the label as ASCII text (``<key>.cls``) when the source has
  labels;
* shards of ``shard_size`` samples are written by ``processes`` worker processes in parallel, each
  into a temporary folder that is renamed into place only when every shard and the manifest are
  complete, so an interrupted conversion never leaves a half-written output;
* ``manifest.json`` (:mod:`ebmscale.data.manifest`) records the sample count, shape, classes,
  per-shard counts, sizes and SHA-256 checksums.

Output is reproducible: the same source and options give byte-identical shards (fixed tar mtimes,
a deterministic PNG encoder), whatever the number of processes. The tars are written by
:class:`~ebmscale.data.tar.TarSink`. This module does not import torch.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from filelock import FileLock

from ebmscale.data.builtin import BUILTIN_IMAGE_SETS, DataError
from ebmscale.data.codec import check_shard_format, encode_images, load_file_image, prepare_array_image
from ebmscale.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, SHARD_NAME
from ebmscale.data.sources import Source, load_source
from ebmscale.data.tar import TarSink

RESIZE_METHOD = "PIL bicubic (antialiased) on the shorter side, then centre crop"
# Fixed tar member mtime: reproducible shards and checksums.
_TAR_MTIME = 0


@dataclass
class _ShardTask:
    index: int
    path: str                       # temporary-folder path of the tar to write
    first_key: int                  # global position of the shard's first sample (its key)
    resolution: int
    images: np.ndarray | None       # NHWC uint8 slice (array sources)
    files: list[str] | None         # image paths (folder sources)
    labels: np.ndarray | None
    image_format: str = "png"       # png, jpg or npy (see SHARD_FORMATS)
    quality: int = 95               # JPEG quality


_ENCODE_BLOCK = 512


def _block_images(task: _ShardTask, lo: int, hi: int, bad: list[str]) -> tuple[list[int], np.ndarray]:
    """(indices kept, their images NHWC) for samples ``lo..hi-1`` of a task; unreadable files
    are appended to ``bad`` and left out."""
    if task.images is not None:
        images = task.images[lo:hi]
        if task.resolution and images.shape[1:3] != (task.resolution, task.resolution):
            images = np.stack([prepare_array_image(a, task.resolution) for a in images])
        return list(range(lo, hi)), images
    keep, loaded = [], []
    for i in range(lo, hi):
        try:
            loaded.append(load_file_image(task.files[i], task.resolution))
            keep.append(i)
        except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped and reported
            bad.append(f"{task.files[i]}: {type(exc).__name__}: {exc}")
    return keep, (np.stack(loaded) if loaded else np.zeros((0, 1, 1, 3), np.uint8))


def _write_shard(task: _ShardTask) -> dict:
    """Write one shard (runs in a writer process); returns its manifest entry plus the
    source images that could not be read."""
    bad: list[str] = []
    n = len(task.images) if task.images is not None else len(task.files)
    count = 0
    with TarSink(task.path, mtime=_TAR_MTIME) as sink:
        # Blocks bound the memory of decoded images (a 5000-image shard at 128x128 is 245 MB).
        for lo in range(0, n, _ENCODE_BLOCK):
            keep, images = _block_images(task, lo, min(n, lo + _ENCODE_BLOCK), bad)
            for i, blob in zip(keep, encode_images(images, task.image_format, task.quality) if keep else []):
                # webdataset groups members by the name before the first dot: <key>.png, <key>.cls
                key = f"{task.first_key + i:09d}"
                sink.add(f"{key}.{task.image_format}", blob)
                if task.labels is not None:
                    sink.add(key + ".cls", str(int(task.labels[i])).encode())
            count += len(keep)
    with open(task.path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"index": task.index, "name": os.path.basename(task.path), "count": count,
            "bytes": os.path.getsize(task.path), "sha256": digest, "bad": bad}


def _tasks(src: Source, tmp: str, order: np.ndarray, resolution: int, shard_size: int, image_format: str = "png",
           quality: int = 95) -> Iterator[_ShardTask]:
    for s, start in enumerate(range(0, len(order), shard_size)):
        idx = order[start:start + shard_size]
        yield _ShardTask(
            index=s, path=os.path.join(tmp, SHARD_NAME.format(s)), first_key=start, resolution=resolution,
            images=None if src.images is None else src.images[idx],
            files=None if src.files is None else [src.files[i] for i in idx],
            labels=None if src.labels is None else src.labels[idx], image_format=image_format, quality=quality)


def _output_shape(src: Source, resolution: int) -> tuple[int, int, int]:
    if resolution:
        return (src.channels, resolution, resolution)
    if src.shape is None:
        raise DataError(f"source '{src.path}' holds images of differing sizes: give a resolution")
    return src.shape


def claim_output(out_dir: str, overwrite: bool) -> None:
    """Fail early (before any work) when ``out_dir`` holds something we may not replace."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise DataError(f"output '{out_dir}' exists and is not a folder")
        if os.listdir(out_dir) and not overwrite:
            raise DataError(f"output folder '{out_dir}' is not empty; choose another or pass --overwrite")


def write_shards(src: Source, out_dir: str, *, resolution: int = 0, shard_size: int = 5000, processes: int = 1,
                 seed: int = 0, shuffle: bool = True, progress: bool = False, overwrite: bool = False,
                 image_format: str = "png", quality: int = 95) -> dict:
    """Write ``src`` as webdataset shards plus ``manifest.json`` into ``out_dir``; return the manifest.
    Images are stored as ``image_format`` (:func:`ebmscale.data.codec.encode_images`; JPEG at
    ``quality``).

    The work happens in a sibling temporary folder renamed to ``out_dir`` at the end, so readers
    never see a partial output. ``processes`` > 1 writes shards in parallel worker processes.
    """
    check_shard_format(image_format, quality)
    if shard_size < 1:
        raise DataError(f"samples per shard must be >= 1, got {shard_size}")
    if resolution < 0:
        raise DataError(f"resolution must be >= 0, got {resolution}")
    if len(src) == 0:
        raise DataError(f"source '{src.path or src.kind}' holds no images")
    out_dir = os.path.abspath(out_dir)
    claim_output(out_dir, overwrite)
    shape = _output_shape(src, resolution)
    order = np.random.default_rng([seed, 0x5A4D]).permutation(len(src)) if shuffle else np.arange(len(src))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(tmp)
    t0 = time.perf_counter()
    try:
        results = _run_tasks(_tasks(src, tmp, order, resolution, shard_size, image_format, quality), len(src),
                             processes, progress,
                             desc=f"shards {src.kind}")
        results.sort(key=lambda r: r["index"])
        bad = [b for r in results for b in r.pop("bad")]
        for r in results:
            r.pop("index")
        total = sum(r["count"] for r in results)
        if total == 0:
            raise DataError(f"no image of '{src.path or src.kind}' could be read (first error: {bad[0]})")
        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
            "num_samples": total, "shape": list(shape), "resolution": shape[1],
            "num_classes": len(src.class_names) if src.labels is not None else 0,
            "classes": src.class_names if src.labels is not None else [],
            "image_format": image_format, **({"jpeg_quality": int(quality)} if image_format == "jpg" else {}),
            "label_format": "cls" if src.labels is not None else None,
            "resize": RESIZE_METHOD if resolution else None,
            "source": {"kind": src.kind, "path": os.path.abspath(src.path) if src.path else "",
                       "split": src.split, **src.extra},
            "shuffled": bool(shuffle), "seed": int(seed), "skipped_sources": len(bad),
            "shards": results,
        }
        with open(os.path.join(tmp, MANIFEST_NAME), "w") as fh:
            json.dump(manifest, fh, indent=1)
        if os.path.exists(out_dir):  # checked by claim_output: empty, or overwrite allowed
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["_summary"] = {"seconds": time.perf_counter() - t0, "skipped_examples": bad[:5]}
    return manifest


def _run_tasks(tasks: Iterator[_ShardTask], total: int, processes: int, progress: bool, desc: str) -> list[dict]:
    from tqdm import tqdm

    results = []
    with tqdm(total=total, unit="img", desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        if processes <= 1:
            for t in tasks:
                results.append(_write_shard(t))
                bar.update(results[-1]["count"] + len(results[-1]["bad"]))
        else:
            # fork where available: spawn would re-run an unguarded user script's top level in every
            # writer. The writers only run NumPy, zlib and Pillow, never torch or CUDA, so forking
            # a process that holds torch threads or a CUDA context is safe here.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(processes) as pool:
                for r in pool.imap_unordered(_write_shard, tasks):
                    results.append(r)
                    bar.update(r["count"] + len(r["bad"]))
    return results


def default_processes() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- first-use cache

def _source_fingerprint(kind: str, path: str) -> list:
    """What identifies a source's content cheaply: path plus sizes and mtimes (for a folder
    tree, of the root and every class subfolder, which change when files come or go)."""
    if kind in BUILTIN_IMAGE_SETS:
        return [kind]
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise DataError(f"data.path '{path}' does not exist")
    st = os.stat(path)
    fp: list = [kind, path, st.st_size, st.st_mtime_ns]
    if os.path.isdir(path):
        for e in sorted(os.scandir(path), key=lambda e: e.name):
            if e.is_dir():
                fp += [e.name, e.stat().st_mtime_ns]
    return fp


def cache_key(kind: str, path: str, split: str, resolution: int) -> str:
    """Folder name under ``<cache_dir>/shards/`` for a converted source."""
    blob = json.dumps([_source_fingerprint(kind, path), split, resolution, MANIFEST_VERSION], sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    base = kind if kind in BUILTIN_IMAGE_SETS else f"{kind}-{os.path.basename(os.path.abspath(path)) or 'root'}"
    return f"{base}-{split or 'all'}-r{resolution}-{digest}"


def cached_shards(kind: str, path: str, cache_dir: str, *, split: str = "train", resolution: int = 0,
                  shard_size: int = 5000, processes: int = 0, progress: bool = False,
                  log: Any = None) -> str:
    """The shard folder for a source, converted into ``<cache_dir>/shards/`` on first use.

    Safe against concurrent ranks (a file lock: the first converts, the rest wait and reuse) and
    against interruption (the writer renames a finished temporary folder into place; stale
    temporary folders of interrupted conversions are removed here, under the lock).
    """
    root = os.path.join(os.path.abspath(cache_dir), "shards")
    os.makedirs(root, exist_ok=True)
    key = cache_key(kind, path, split, resolution)
    out = os.path.join(root, key)
    if os.path.isfile(os.path.join(out, MANIFEST_NAME)):
        return out
    # An exclusive lock: ranks on one machine convert a source once, the others wait and reuse.
    with FileLock(os.path.join(root, f".{key}.lock")):
        if os.path.isfile(os.path.join(out, MANIFEST_NAME)):
            return out  # another rank finished it while we waited
        for name in os.listdir(root):
            if name.startswith(f".{key}.tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        if os.path.isdir(out):  # a folder without a manifest can only be debris: replace it
            shutil.rmtree(out)
        t0 = time.perf_counter()
        src = load_source(kind, path, split)
        n_shards = -(-len(src) // shard_size)
        write_shards(src, out, resolution=resolution, shard_size=shard_size,
                     processes=min(processes or default_processes(), n_shards), progress=progress)
        if log is not None:
            log(f"converted {kind} ({len(src)} images) into shards at {out} in {time.perf_counter() - t0:.1f} s")
    return out
