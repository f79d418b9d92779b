"""Decoded images/s per loader worker: the shard stream (PNG and JPEG members) vs torchvision's
ImageFolder, same images; and what the IGEBM ImageNet-128 recipe's training step consumes.

For each resolution (32x32 and 128x128 by default) the script makes one set of photographic
images (random crops of scikit-learn's two bundled photos, so PNG sizes are realistic), stores it
both as an ImageFolder tree of PNG files and as webdataset shards (``write_shards``) holding the
same PNG bytes, and then times, for each worker count:

* ``shards``: :class:`ebmscale.data.stream.ShardStream` (tar reading, shuffle buffer, PNG decode
  to uint8 in the workers, chunks rebatched in the main process), shards of 1,000 images;
* ``imagefolder``: ``torchvision.datasets.ImageFolder`` with ``PILToTensor`` (the same PNG
  decode to uint8) in a shuffled ``DataLoader``, one file open per image;
* ``--formats``: the shard stream again over shards of each other member format (``jpg`` at
  ``--quality``, ``npy``), written from the same images.

``--consumption CONFIG`` also times training steps of that recipe (e.g. the IGEBM ImageNet-128
one) at its architecture and sampler settings, with a small batch (``--consumption-batch``), the
Ray buffer and synthetic JPEG shards of its shape (``benchmarks/scale.py``'s measured run), and
reports the images/s its step consumes per rank -- beside the loader's images/s with the workers
the recipe configures (``data.num_workers: -1`` = auto) on the same shards.

Timing starts after the first batch (worker start-up and the shuffle buffer's fill excluded) and
covers ``--images`` images. Figures are images/s divided by the number of workers.

    .venv/bin/python benchmarks/data_loader.py                      # 32 and 128, 1 and 2 workers
    .venv/bin/python benchmarks/data_loader.py --resolutions 64 --images 4000 --workers 4
    .venv/bin/python benchmarks/data_loader.py --resolutions 64 128 --workers 1 --formats jpg \
        --no-imagefolder --consumption configs/igebm_imagenet128.yaml
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks.scale, ebmscale


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
    from ebmscale.data.codec import encode_png_batch

    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c:02d}"), exist_ok=True)
    for i, png in enumerate(encode_png_batch(images)):
        with open(os.path.join(root, f"class{i % classes:02d}", f"{i:06d}.png"), "wb") as fh:
            fh.write(png)


def time_shards(shard_dir: str, workers: int, batch: int, n: int, buffer: int) -> float:
    """Images/s of the shard stream, after its first batch."""
    from ebmscale.data.manifest import open_shard_set
    from ebmscale.data.stream import ShardStream

    stream = ShardStream(open_shard_set(shard_dir), batch, num_workers=workers, shuffle_buffer=buffer)
    next(stream)
    t0 = time.perf_counter()
    for _ in range(max(1, n // batch)):
        next(stream)
    rate = max(1, n // batch) * batch / (time.perf_counter() - t0)
    stream.close()
    return rate


def consumption(config: str, batch: int, steps: int, work: str, overrides: list[str] | None = None,
                timeout: float = 3600) -> dict:
    """Images/s one rank's training step consumes under ``config`` (its architecture, sampler
    steps, precision as resolved here, the Ray buffer), with ``batch`` examples per step, on
    synthetic JPEG shards of the recipe's shape: the mean over ``steps`` steps after one warm-up
    step, measured by ``benchmarks/scale.py``'s run of the real trainer in a fresh process; and
    what the shard loader supplies from the same shards with the recipe's workers (``loader``;
    ``supply_ratio`` = supplied / consumed)."""
    from benchmarks.scale import measure_steps, run_overrides, synthetic_shards
    from ebmscale.config import load_config

    base = load_config(config, overrides or [])
    shards = synthetic_shards(work, base.data.resolution, max(1, base.model.num_classes))
    run = run_overrides(shards, batch, base.sampler.steps, 1, os.path.join(work, "consume-run"))
    r = measure_steps(config, 1, [*(overrides or []), *run], 1, steps, work, timeout)
    supply = loader_rate(shards, base.data.num_workers)
    return {"config": config, "batch": batch, "sampler_steps": base.sampler.steps, "precision": r["precision"],
            "step_s": round(r["step_time"], 3), "sampler_s": round(r["sampler_time"], 3),
            "buffer_s": round(r["buffer_time"], 3), "images_per_s": round(batch / r["step_time"], 4),
            "recipe_workers": supply["workers"], "loader": supply,
            "supply_ratio": supply["images_per_s"] * r["step_time"] / batch}


def loader_rate(shards: str, num_workers: int, batch: int = 16, n: int = 512) -> dict:
    """Images/s the shard stream supplies from ``shards`` with the workers ``data.num_workers``
    resolves to here (-1 = auto: this rank's cores minus one)."""
    from ebmscale.data.images import resolve_num_workers

    workers = resolve_num_workers(num_workers)
    return {"workers": workers, "images_per_s": time_shards(shards, workers, batch, n, 256)}


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
    ap.add_argument("--formats", nargs="*", default=[], choices=("jpg", "npy"),
                    help="also time shards of these member formats")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of --formats jpg")
    ap.add_argument("--no-imagefolder", action="store_true", help="skip the ImageFolder baseline")
    ap.add_argument("--consumption", default="", help="recipe whose training step's image consumption to time")
    ap.add_argument("--consumption-batch", type=int, default=2)
    ap.add_argument("--consumption-steps", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from ebmscale.data.sources import Source
    from ebmscale.data.writer import write_shards

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
                for fmt in args.formats:
                    write_shards(src, f"{shards}-{fmt}", shard_size=1000, processes=1, image_format=fmt,
                                 quality=args.quality)
            for w in args.workers:
                s = time_shards(shards, w, args.batch_size, args.images, args.shuffle_buffer)
                row = {"resolution": res, "workers": w, "shards_per_worker": round(s / max(1, w))}
                line = f"{res:>4}x{res:<4} workers={w}  png shards {s / max(1, w):>8.0f} img/s/worker"
                for fmt in args.formats:
                    r = time_shards(f"{shards}-{fmt}", w, args.batch_size, args.images, args.shuffle_buffer)
                    row[f"{fmt}_shards_per_worker"] = round(r / max(1, w))
                    line += f"   {fmt} shards {r / max(1, w):>8.0f}"
                if not args.no_imagefolder:
                    f = time_imagefolder(folder, w, args.batch_size, args.images)
                    row.update(imagefolder_per_worker=round(f / max(1, w)), ratio=round(s / f, 2))
                    line += f"   ImageFolder {f / max(1, w):>8.0f} img/s/worker   ratio {s / f:.2f}"
                rows.append(row)
                print(line, flush=True)
        consumed = None
        if args.consumption:
            consumed = consumption(args.consumption, args.consumption_batch, args.consumption_steps, work)
            print(f"{args.consumption}: one rank's step consumes {consumed['images_per_s']} img/s "
                  f"(batch {consumed['batch']}, {consumed['sampler_steps']} Langevin steps, {consumed['precision']}, "
                  f"{consumed['step_s']} s/step); the recipe's loader ({consumed['recipe_workers']} worker(s) here) "
                  f"supplies {consumed['loader']['images_per_s']:,.0f} img/s from the same JPEG shards: "
                  f"{consumed['supply_ratio']:,.0f}x",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    from benchmarks._report import cpu_name

    result = {"cpu": cpu_name(), "cpu_cores": len(os.sched_getaffinity(0)), "batch_size": args.batch_size,
              "images": args.images, "rows": rows, "consumption": consumed}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
