"""A corrupt image mid-run is skipped and counted in the training metrics, never a crash."""
import json

import numpy as np

from ebmscale.config import load_config
from ebmscale.data.sources import load_source
from ebmscale.data.writer import write_shards
from ebmscale.trainer import train
from tests.distributed.test_stream_ranks import _member


def test_training_reports_skipped_samples(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), y=rng.integers(0, 10, 16))
    write_shards(load_source("npz", str(tmp_path / "d.npz")), str(tmp_path / "s"), shard_size=8)
    bad_png = _member(str(tmp_path / "s" / "shard-000001.tar"), ".png", 2)
    with open(tmp_path / "s" / "shard-000001.tar", "r+b") as fh:  # same size: only reading can tell
        fh.seek(bad_png.offset_data + 8)
        fh.write(b"\xff" * 24)
    cfg = load_config(None, ["data.dataset=shards", f"data.path={tmp_path / 's'}", "data.batch_size=4",
                             "model.width=4", "model.depth=2", "sampler.steps=2", "buffer.capacity=16",
                             "train.steps=8", "train.log_every=8", "train.progress=false", "train.tensorboard=false",
                             "buffer.backend=local"])
    result = train(cfg, run_dir=str(tmp_path / "run"))
    assert result.steps == 8
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # 8 steps x 4 = 32 samples from 15 good ones per epoch: the bad one is met in epochs 0, 1 and 2.
    assert rec["data_skipped"] >= 2 and rec["data_skipped"] == int(rec["data_skipped"])
    assert rec["data_worker_restarts"] == 0, "a bad PNG is skipped in the worker, which lives on"
