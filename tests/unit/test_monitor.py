"""What a run shows while it trains: sample grids and energy histograms in the TensorBoard event
file (read back with TensorBoard's own event reader), and buffer health in metrics.jsonl."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ebmscale.config import load_config
from ebmscale.trainer import train

TINY = ["data.dataset=digits", "model.width=4", "model.depth=2", "data.batch_size=16", "sampler.steps=3",
        "buffer.capacity=64", "train.progress=false", "buffer.backend=local", "train.precision=fp32",
        "train.threads=1", "train.device=cpu", "train.steps=4", "train.log_every=2", "train.sample_every=2",
        "train.checkpoint_every=0", "train.rollback_max=0"]


def _events(run_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_conditional_run_logs_grids_histograms_and_health(tmp_path):
    run = str(tmp_path / "run")
    train(load_config(None, [*TINY, "model.conditional=true", "model.num_classes=10", "train.report=false"]), run)
    acc = _events(run)
    tags = acc.Tags()
    assert {"samples/negatives", "samples/buffer", "samples/classes"} <= set(tags["images"])
    assert {"energy/positive", "energy/negative", "energy/buffer"} <= set(tags["histograms"])
    for tag in ("samples/negatives", "samples/buffer", "samples/classes"):
        assert [e.step for e in acc.Images(tag)] == [2, 4], tag
    # A class grid: one row of 8 per class present among the 16 chains (8x8 digits, 2 px padding).
    img = acc.Images("samples/classes")[-1]
    assert img.width == 8 * 10 + 2 and (img.height - 2) % 10 == 0
    for tag in ("energy/positive", "energy/negative", "energy/buffer"):
        h = acc.Histograms(tag)
        assert [e.step for e in h] == [2, 4] and all(e.histogram_value.num == 16 for e in h[:1] if "buffer" not in tag)
        assert np.isfinite(h[-1].histogram_value.sum)
    assert acc.Histograms("energy/buffer")[0].histogram_value.num == 64  # the whole (small) buffer
    # Health figures beside the losses, in TensorBoard and metrics.jsonl.
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    last = records[-1]
    assert last["step"] == 4 and last["buffer_age_max"] % 3 == 0 and 3 <= last["buffer_age_max"] <= 12
    assert 0 < last["buffer_fill"] <= 1 and sum(last[f"buffer_fill_class{c}"] for c in range(10)) > 0
    assert "buffer_diversity" in tags["scalars"]
    files = sorted(os.listdir(os.path.join(run, "samples")))
    assert files == ["buffer-step-0000002.png", "buffer-step-0000004.png", "classes-step-0000002.png",
                     "classes-step-0000004.png", "final.png", "step-0000002.png", "step-0000004.png"]


def test_without_tensorboard_only_pngs_are_written(tmp_path):
    run = str(tmp_path / "run")
    train(load_config(None, [*TINY, "train.tensorboard=false", "train.report=false", "train.steps=2"]), run)
    assert not os.path.exists(os.path.join(run, "tb"))
    assert "buffer-step-0000002.png" in os.listdir(os.path.join(run, "samples"))
