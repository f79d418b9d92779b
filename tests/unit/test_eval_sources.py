"""Where evaluation images come from: each rank's share of a source (shards, .npz, built-in)
tiles the first N images exactly, in order; the product-of-experts sample output round-trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ebmscale.config import ConfigError
from ebmscale.data.sources import read_npz
from ebmscale.data.writer import write_shards
from ebmscale.eval.commands import rank_images
from ebmscale.eval.generate import buffer_images


def _npz(tmp_path, n=11):
    x = np.random.default_rng(0).integers(0, 256, (n, 6, 6, 1), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n)  # id in the first pixel
    path = tmp_path / "imgs.npz"
    np.savez(path, images=x, labels=np.arange(n) % 3)
    return str(path), x


def _shares(monkeypatch, spec, n, world=2, batch=3):
    out = []
    for r in range(world):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        total, first, batches = rank_images(spec, "auto", "test", n, batch)
        got = [(x, y) for x, y in batches]
        assert all(len(x) <= batch for x, _ in got)
        out.append((total, first, torch.cat([x for x, _ in got]) if got else torch.zeros(0, 1, 6, 6, dtype=torch.uint8),
                    np.concatenate([y for _, y in got]) if got else np.zeros(0, np.int64)))
    return out


@pytest.mark.parametrize("n", [0, 7])
def test_npz_and_shards_rank_shares_tile_the_first_n(tmp_path, monkeypatch, n):
    path, x = _npz(tmp_path)
    shards = tmp_path / "shards"
    write_shards(read_npz(path), str(shards), shard_size=4, shuffle=False)
    want = n or len(x)
    for spec in (path, str(shards)):
        parts = _shares(monkeypatch, spec, n)
        assert [p[0] for p in parts] == [want, want]
        assert parts[1][1] == len(parts[0][2])
        ids = torch.cat([p[2] for p in parts])[:, 0, 0, 0].tolist()
        assert ids == list(range(want)), spec  # every image once, in order
        assert np.concatenate([p[3] for p in parts]).tolist() == [i % 3 for i in range(want)]


def test_unknown_source_kind_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--kind"):
        rank_images(str(tmp_path / "what.bin"))


def test_buffer_images_by_class_and_too_many():
    state = {"data": torch.arange(12, dtype=torch.float32).view(6, 2), "labels": torch.tensor([0, 1, 0, 1, 0, 1]),
             "storage": "fp32", "bounds": [-1.0, 1.0]}
    np.testing.assert_array_equal(buffer_images(state, 2, 1, labels=1), [[6, 7], [10, 11]])
    np.testing.assert_array_equal(buffer_images(state, 3, 0), [[0, 1], [2, 3], [4, 5]])
    with pytest.raises(ConfigError, match="--n"):
        buffer_images(state, 4, 0, labels=0)
