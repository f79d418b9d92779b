"""What each ImageNet recipe costs at full size: counted FLOPs per training step, buffer and
checkpoint bytes, and the projected H200-hours per ImageNet epoch.

For each recipe (IGEBM 32/64/128, JEM 32/64/128) the network is built at its real architecture
with fake tensors (``FakeTensorMode``: shapes only, nothing computed or allocated) and
``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of

* one Langevin step: the energy forward of the step's chains and the backward to the input only
  (the sampler never takes parameter gradients), in sampling mode -- times ``sampler.steps``;
* the loss forward over [x+, x-] through the network and its full backward;

times ``optim.accumulate`` micro-batches per optimizer step, per rank. The counter counts matrix
products and convolutions (forward and backward), not elementwise work (activations, spectral-norm
power iterations, optimizer update), which is small beside them at these sizes.

Bytes: the replay buffer per rank (``buffer.capacity`` chains in ``buffer.storage``, plus int64
class labels when partitioned); a checkpoint (fp32 weights, EMA when kept, Adam's two moments,
and the buffer of every rank, for ``--ranks`` ranks).

Projection: H200-hours per epoch of 1,281,167 ImageNet training images = counted FLOPs per image x
images / (dense bf16 peak x utilisation) / 3600, with the peak 989 TFLOP/s (H200 SXM, dense BF16)
and the utilisation ``--utilisation`` (default 0.4) stated in the table: an assumption, not a
measurement. Independent of the number of GPUs (the work per image is fixed).

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--utilisation 0.4] [--ranks 8]

Prints a Markdown table and, as its last line, one JSON object with all figures. Measured step
times and activation memory per chain are in benchmarks/sampler_memory.py and
benchmarks/train_speed.py (CPU figures in docs/benchmarks.md and docs/distributed.md); this script computes, it does not time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ebmscale.config import load_config  # noqa: E402
from ebmscale.models import build_model, count_parameters  # noqa: E402
from ebmscale.sampling import sampling_mode  # noqa: E402

RECIPES = ["igebm_imagenet32.yaml", "igebm_imagenet64.yaml", "igebm_imagenet128.yaml", "jem_imagenet32.yaml",
           "jem_imagenet64.yaml", "jem_imagenet128.yaml"]
IMAGENET_TRAIN = 1_281_167
H200_BF16_DENSE = 989e12
STORAGE_BYTES = {"fp32": 4, "fp16": 2, "uint8": 1}


def _energy(model, cfg, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return model(x, y) if cfg.model.conditional else model(x)


def counted_flops(cfg) -> dict:
    """FLOPs of one optimizer step of one rank under ``cfg``, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return _count(cfg, FlopCounterMode)


def _count(cfg, FlopCounterMode) -> dict:
    shape = (3, cfg.data.resolution, cfg.data.resolution)
    model = build_model(cfg.model, shape)
    n = cfg.data.batch_size
    m = cfg.sampler.batch_size or n
    y = torch.zeros(max(n, m), dtype=torch.long) if cfg.model.conditional else None
    x = torch.empty(m, *shape)
    with sampling_mode(model), FlopCounterMode(display=False) as fc:
        x.requires_grad_(True)
        e = _energy(model, cfg, x, None if y is None else y[:m])
        e.sum().backward()  # parameters are frozen in sampling mode: the input gradient only
    sampler_step = fc.get_total_flops()
    model.train()
    xs = torch.empty(n + m, *shape)
    ys = None if y is None else torch.cat([y[:n], y[:m]])
    with FlopCounterMode(display=False) as fc:
        if cfg.objective.kind == "jem":
            model.logits(xs).sum().backward()  # JEM's one training forward: logits of [x+, x-]
        else:
            _energy(model, cfg, xs, ys).sum().backward()
    loss = fc.get_total_flops()
    k = cfg.optim.accumulate
    sampler = cfg.sampler.steps * sampler_step
    return {"parameters": count_parameters(model), "sampler_flops_per_langevin_step": sampler_step,
            "sampler_flops": k * sampler, "loss_flops": k * loss, "step_flops": k * (sampler + loss),
            "images_per_step": k * n, "chains_per_step": k * m}


def bytes_of(cfg, ranks: int, params: int) -> dict:
    shape = (3, cfg.data.resolution, cfg.data.resolution)
    b = cfg.buffer
    labels = 8 * b.capacity if (cfg.model.conditional or (cfg.objective.kind == "jem" and cfg.objective.pxy_weight > 0)) else 0
    buffer = b.capacity * int(np.prod(shape)) * STORAGE_BYTES[b.storage] + labels
    weights = 4 * params * (1 + (cfg.optim.ema > 0) + (2 if cfg.optim.name in ("adam", "adamw") else 1))
    return {"buffer_bytes_per_rank": buffer, "checkpoint_bytes": weights + ranks * buffer,
            "checkpoint_weights_bytes": weights}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--utilisation", type=float, default=0.4, help="assumed fraction of the H200's dense bf16 peak")
    p.add_argument("--ranks", type=int, default=8, help="ranks whose buffers a checkpoint holds")
    args = p.parse_args(argv)
    rows = []
    for name in RECIPES:
        cfg = load_config(os.path.join(ROOT, "configs", name))
        row = {"recipe": name, **counted_flops(cfg)}
        row.update(bytes_of(cfg, args.ranks, row["parameters"]))
        per_image = row["step_flops"] / row["images_per_step"]
        row["flops_per_image"] = per_image
        row["h200_hours_per_epoch"] = per_image * IMAGENET_TRAIN / (H200_BF16_DENSE * args.utilisation) / 3600
        row["sampler_share"] = row["sampler_flops"] / row["step_flops"]
        rows.append(row)
    print(f"| recipe | parameters | GFLOP per step (rank) | sampler share | GFLOP per image | buffer per rank | "
          f"checkpoint ({args.ranks} ranks) | H200-hours per epoch at {args.utilisation:.0%} of 989 TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['parameters']:,} | {r['step_flops'] / 1e9:,.0f} | {r['sampler_share']:.1%} | "
              f"{r['flops_per_image'] / 1e9:,.1f} | {r['buffer_bytes_per_rank'] / 2**20:,.0f} MiB | "
              f"{r['checkpoint_bytes'] / 2**30:,.2f} GiB | {r['h200_hours_per_epoch']:,.1f} |")
    result = {"utilisation": args.utilisation, "peak_flops": H200_BF16_DENSE, "ranks": args.ranks,
              "imagenet_train_images": IMAGENET_TRAIN, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
