"""``ebmscale data shards``: its arguments and the handler over :mod:`ebmscale.data.writer`."""
from __future__ import annotations

import argparse
import os

from ebmscale.data.builtin import BUILTIN_IMAGE_SETS, DataError
from ebmscale.data.codec import check_shard_format
from ebmscale.data.manifest import MANIFEST_NAME, verify_shards
from ebmscale.data.sources import SOURCE_KINDS, load_source
from ebmscale.data.writer import claim_output, default_processes, write_shards


def add_shards_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ebmscale data shards``."""
    parser.add_argument("source", choices=SOURCE_KINDS + ("verify",),
                        help="what to convert: folder (ImageNet-style tree), cifar10 / cifar100 (python archive "
                             "or its folder), npz, mnist, digits; or 'verify' to check the checksums of --input")
    parser.add_argument("--input", "-i", default="",
                        help="the source's path (folder, .tar.gz, .npz; a shard folder for verify); "
                             "unused for mnist and digits")
    parser.add_argument("--out", "-o", default="", help="output folder for the shards and manifest.json")
    parser.add_argument("--split", default="train", choices=("train", "test"),
                        help="split of CIFAR and the built-in sets")
    parser.add_argument("--resolution", type=int, default=0,
                        help="side of the square output images: shorter-side resize + centre crop; "
                             "0 = native size (required for folder)")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    parser.add_argument("--format", default="png", help="image members: png (lossless, default), jpg (JPEG at "
                                                        "--quality; decodes faster), npy (raw uint8 arrays)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 1..100 of --format jpg")
    parser.add_argument("--processes", type=int, default=0, help="writer processes; 0 = all available cores")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order written to the shards")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: seeded shuffle)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--images-key", default=None, help="npz: name of the image array (default: auto)")
    parser.add_argument("--labels-key", default=None, help="npz: name of the label array (default: auto)")
    parser.add_argument("--cifar100-labels", default="fine", choices=("fine", "coarse"),
                        help="cifar100: fine (100) or coarse (20) labels")


def shards_command(args: argparse.Namespace) -> dict:
    """Run ``ebmscale data shards``; returns a JSON-able summary."""
    if args.source == "verify":
        if not args.input:
            raise DataError("verify needs --input: the shard folder or its manifest.json")
        report = verify_shards(args.input)
        if report["problems"]:
            raise DataError(f"{len(report['problems'])} of {report['shards']} shards are damaged: "
                            + "; ".join(report["problems"][:5]))
        return {"verified": os.path.abspath(args.input), **report}
    if not args.out:
        raise DataError("--out is required: the folder to write shards into")
    if args.source not in BUILTIN_IMAGE_SETS and not args.input:
        raise DataError(f"--input is required for source '{args.source}'")
    if args.source == "folder" and args.resolution <= 0:
        raise DataError("--resolution is required for folder sources (images are resized and centre-cropped)")
    if args.processes < 0:
        raise DataError(f"--processes must be >= 0, got {args.processes}")
    check_shard_format(args.format, args.quality)
    claim_output(os.path.abspath(args.out), args.overwrite)  # before reading a large source
    src = load_source(args.source, args.input, args.split, images_key=args.images_key,
                      labels_key=args.labels_key, cifar100_labels=args.cifar100_labels)
    n_shards = -(-len(src) // max(1, args.shard_size))
    processes = min(args.processes or default_processes(), n_shards)
    m = write_shards(src, args.out, resolution=args.resolution, shard_size=args.shard_size, processes=processes,
                     seed=args.seed, shuffle=not args.no_shuffle, progress=not args.no_progress,
                     overwrite=args.overwrite, image_format=args.format, quality=args.quality)
    s = m.pop("_summary")
    return {"out": os.path.abspath(args.out), "manifest": os.path.join(os.path.abspath(args.out), MANIFEST_NAME),
            "source": args.source, "samples": m["num_samples"], "shards": len(m["shards"]),
            "shape": m["shape"], "format": m["image_format"], "classes": m["num_classes"], "skipped": m["skipped_sources"],
            "skipped_examples": s["skipped_examples"], "processes": processes,
            "seconds": round(s["seconds"], 3), "images_per_s": round(m["num_samples"] / max(s["seconds"], 1e-9), 1)}
