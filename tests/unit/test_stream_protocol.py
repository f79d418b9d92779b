"""Every training stream the trainer can get is a ``ebmscale.data.Stream``: batches, a position to
checkpoint and resume, and the counts the trainer reports as ``data_skipped`` (skipped samples)
and ``data_worker_restarts``."""
from __future__ import annotations

import numpy as np

from ebmscale.config import load_config
from ebmscale.data import Stream, build_train_stream
from ebmscale.data.lookahead import Lookahead
from ebmscale.data.manifest import open_shard_set
from ebmscale.data.memory import ArrayStream
from ebmscale.data.sources import load_source
from ebmscale.data.stream import ShardStream
from ebmscale.data.writer import write_shards


def _shard_stream(tmp_path) -> ShardStream:
    np.savez(tmp_path / "d.npz", x=np.arange(24 * 4 * 4, dtype=np.uint8).reshape(24, 4, 4), y=np.arange(24) % 3)
    write_shards(load_source("npz", str(tmp_path / "d.npz")), str(tmp_path / "s"), shard_size=8)
    return ShardStream(open_shard_set(str(tmp_path / "s")), 4, shuffle_buffer=0)


def test_every_stream_is_a_stream_and_counts_skips(tmp_path):
    toy = build_train_stream(load_config(None, ["data.dataset=8gaussians", "model.arch=mlp", "data.batch_size=4",
                                                "data.toy_train_size=64"]))
    arrays = ArrayStream(np.zeros((8, 2), np.float32), None, 4)
    shards = _shard_stream(tmp_path)
    for stream in (toy, arrays, shards, Lookahead(arrays), Lookahead(shards)):
        assert isinstance(stream, Stream), type(stream).__name__
        state = stream.state_dict()
        x, y = next(stream)
        assert len(x) == 4
        assert stream.skipped == 0 and stream.worker_restarts == 0
        stream.load_state_dict(state)
        assert np.array_equal(next(stream)[0].numpy(), x.numpy()), "state_dict is the position of the next batch"


def test_an_object_without_the_skip_counter_is_not_a_stream():
    class NoCounter:
        def __iter__(self):
            return self

        def __next__(self):
            return None, None

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

    assert not isinstance(NoCounter(), Stream)
    with_counter = NoCounter()
    with_counter.skipped = 0
    assert not isinstance(with_counter, Stream), "worker_restarts is a counter of the protocol too"
    with_counter.worker_restarts = 0
    assert isinstance(with_counter, Stream)
