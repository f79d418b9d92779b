"""Decoded images/s per loader worker: the shard stream vs torchvision's ImageFolder, same images.

For each resolution (32x32 and 128x128 by default) the script makes one set of photographic
images (random crops of scikit-learn's two bundled photos, so PNG sizes are realistic), stores it
both as an ImageFolder tree of PNG files and as webdataset shards (``write_shards``) holding the
same PNG bytes, and then times, for each worker count:

* ``shards``: :class:`ebmscale.data.stream.ShardStream` (tar reading, shuffle buffer, PNG decode
  to uint8 in the workers, chunks rebatched in the main process), shards of 1,000 images;
* ``imagefolder``: ``torchvision.datasets.ImageFolder`` with ``PILToTensor`` (the same PNG
  decode to uint8) in a shuffled ``DataLoader``, one file open per image.

Timing starts after the first batch (worker start-up and the shuffle buffer's fill excluded) and
covers ``--images`` images. Figures are images/s divided by the number of workers.

    .venv/bin/python benchmarks/data_loader.py                      # 32 and 128, 1 and 2 workers
    .venv/bin/python benchmarks/data_loader.py --resolutions 64 --images 4000 --workers 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


def make_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` uint8 RGB images of ``size`` from random crops of scikit-learn's bundled photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        p = photos[i % 2]
        side = int(rng.integers(min(size, 96), min(p.shape[:2])))
        y0, x0 = int(rng.integers(0, p.shape[0] - side)), int(rng.integers(0, p.shape[1] - side))
        crop = Image.fromarray(p[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(crop)
    return out


def write_folder(images: np.ndarray, root: str, classes: int = 10) -> None:
    """The images as an ImageFolder tree of PNG files, encoded exactly as in the shards (so both
    loaders decode the very same bytes)."""
    from ebmscale.data.shards import encode_png_batch

    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c:02d}"), exist_ok=True)
    for i, png in enumerate(encode_png_batch(images)):
        with open(os.path.join(root, f"class{i % classes:02d}", f"{i:06d}.png"), "wb") as fh:
            fh.write(png)


def time_shards(shard_dir: str, workers: int, batch: int, n: int, buffer: int) -> float:
    """Images/s of the shard stream, after its first batch."""
    from ebmscale.data.stream import ShardStream, open_shard_set

    stream = ShardStream(open_shard_set(shard_dir), batch, num_workers=workers, shuffle_buffer=buffer)
    next(stream)
    t0 = time.perf_counter()
    for _ in range(max(1, n // batch)):
        next(stream)
    rate = max(1, n // batch) * batch / (time.perf_counter() - t0)
    stream.close()
    return rate


def time_imagefolder(root: str, workers: int, batch: int, n: int) -> float:
    """Images/s of torchvision's ImageFolder + PILToTensor in a shuffled DataLoader, after its first batch."""
    import torch
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(root, transform=transforms.PILToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    steps = max(1, n // batch)
    seen = 0
    t0 = None
    while seen < steps:
        for x, _ in loader:  # passes over the folder as often as --images needs
            if t0 is None:
                t0 = time.perf_counter()  # after the first batch, as for the shards
                continue
            seen += 1
            if seen == steps:
                break
    return steps * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--images", type=int, default=2000, help="images timed per measurement (and in each set)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts to time")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--keep", default="", help="keep the generated data in this folder (default: a temp folder)")
    args = ap.parse_args(argv)

    import torch

    from ebmscale.data.shards import Source, write_shards

    torch.set_num_threads(1)
    work = args.keep or tempfile.mkdtemp(prefix="ebmscale-bench-")
    rows = []
    try:
        for res in args.resolutions:
            folder, shards = os.path.join(work, f"folder{res}"), os.path.join(work, f"shards{res}")
            if not os.path.isdir(shards):
                images = make_images(args.images, res)
                labels = np.arange(len(images)) % 10
                write_folder(images, folder)
                src = Source("bench", "", "", labels, [f"class{c:02d}" for c in range(10)], 3, images=images,
                             shape=(3, res, res))
                write_shards(src, shards, shard_size=1000, processes=1)
            for w in args.workers:
                s = time_shards(shards, w, args.batch_size, args.images, args.shuffle_buffer)
                f = time_imagefolder(folder, w, args.batch_size, args.images)
                rows.append({"resolution": res, "workers": w, "shards_per_worker": round(s / max(1, w)),
                             "imagefolder_per_worker": round(f / max(1, w)), "ratio": round(s / f, 2)})
                print(f"{res:>4}x{res:<4} workers={w}  shards {s / max(1, w):>8.0f} img/s/worker   "
                      f"ImageFolder {f / max(1, w):>8.0f} img/s/worker   ratio {s / f:.2f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"cpu_cores": len(os.sched_getaffinity(0)), "batch_size": args.batch_size, "images": args.images,
              "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
