"""Buffer health figures on fabricated buffers with known answers (ebmscale.buffer.health), their
exact combination across parts (shards / ranks), and the max/min metric kinds they use."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ebmscale.buffer import health
from ebmscale.buffer.client import LocalBuffer, resplit_states
from ebmscale.buffer.replay import ReplayBuffer
from ebmscale.metrics import MetricLogger


def _two_level_buffer(**kw) -> ReplayBuffer:
    """8 chains of 4 dims: slots 0-3 all zeros, slots 4-7 all ones."""
    buf = ReplayBuffer(8, (4,), bounds=(0.0, 1.0), reinit_prob=0.0, seed=0, **kw)
    buf.data[:4], buf.data[4:] = 0.0, 1.0
    return buf


def _values(raw: dict) -> dict[str, float]:
    return {k: v for k, (v, _, _) in health.figures(raw).items()}


def test_figures_of_a_fabricated_buffer():
    buf = _two_level_buffer()
    f = _values(buf.health(subsample=8))
    # Nothing written yet: every chain is noise (age 0, nothing evolved, no draw).
    assert f["buffer_age_mean"] == 0 and f["buffer_age_max"] == 0 and f["buffer_fill"] == 0
    assert f["buffer_reinit_frac"] == 0
    # 28 pairs among the 8 slots; the 16 pairs across the two levels lie 2/sqrt(4) = 1 apart.
    assert f["buffer_diversity"] == pytest.approx(16 / 28, abs=1e-12)
    x = np.zeros((3, 4), np.float32)
    buf.write(np.array([0, 1, 2]), x, reinit=np.array([False, True, False]), steps=10)  # ages 10, 10, 10
    buf.write(np.array([0, 1]), x[:2], reinit=np.array([False, False]), steps=10)  # 20, 20
    buf.write(np.array([0]), x[:1], reinit=np.array([True]), steps=10)  # slot 0 restarted: 10
    assert buf.age.tolist() == [10, 20, 10, 0, 0, 0, 0, 0]
    f = _values(buf.health(subsample=8))
    assert f["buffer_age_mean"] == 40 / 8 and f["buffer_age_max"] == 20
    assert f["buffer_reinit_frac"] == 2 / 6 and f["buffer_fill"] == 3 / 8
    # Slots 0-3 are all zeros still: the diversity is unchanged.
    assert f["buffer_diversity"] == pytest.approx(16 / 28, abs=1e-12)
    # The restart counters cover the interval since the previous call.
    assert _values(buf.health())["buffer_reinit_frac"] == 0


def test_collapsed_and_uniform_buffers_bracket_the_diversity():
    buf = ReplayBuffer(1000, (3, 8, 8), bounds=(-1.0, 1.0), seed=0)  # uniform noise on [-1, 1]
    # E|u - v|^2 = (hi - lo)^2 / 6 per dimension: about 0.816 after the 1/sqrt(dim) scaling.
    assert _values(buf.health())["buffer_diversity"] == pytest.approx(2 / math.sqrt(6), rel=0.02)
    buf.data[:] = buf.data[0]
    assert _values(buf.health())["buffer_diversity"] == pytest.approx(0.0, abs=1e-6)


def test_per_class_fill_of_a_partitioned_buffer():
    buf = ReplayBuffer(8, (2,), num_classes=2, reinit_prob=0.0, seed=0)  # slot i holds class i % 2
    client = LocalBuffer(buf, chain_steps=5)
    x, handle = client.draw(3, np.array([0, 0, 0]), np.random.default_rng(0))
    client.write_back(handle, x)
    filled = len(np.unique(handle[0]))
    f = _values(client.health())
    assert f["buffer_fill_class0"] == filled / 4 and f["buffer_fill_class1"] == 0
    assert f["buffer_age_max"] == 5 and f["buffer_age_mean"] == 5 * filled / 8
    many = ReplayBuffer(60, (2,), num_classes=30, seed=0)
    many.write(np.arange(30), np.zeros((30, 2), np.float32), steps=1)  # one slot of each class: half full
    f = _values(many.health())
    assert f["buffer_fill_class_min"] == 0.5 and not any(k.startswith("buffer_fill_class1") for k in f)


def test_parts_combine_exactly_across_shards_and_ranks(tmp_path):
    """A Ray buffer merges its shards' counts; a local buffer per rank is combined by the metric
    reduction (weighted means, max). Both give the figures of the parts pooled."""
    a, b = _two_level_buffer(), ReplayBuffer(4, (4,), bounds=(0.0, 1.0), reinit_prob=0.0, seed=1)
    a.write(np.array([0, 5]), np.zeros((2, 4), np.float32), reinit=np.array([True, False]), steps=3)
    b.write(np.array([1, 1, 2]), np.ones((3, 4), np.float32), reinit=np.array([False, False, True]), steps=7)
    ra, rb = a.health(subsample=8), b.health(subsample=8)
    merged = _values(health.merge([ra, rb]))
    assert merged["buffer_age_mean"] == (3 + 3 + 7 + 7) / 12 and merged["buffer_age_max"] == 7
    assert merged["buffer_reinit_frac"] == 2 / 5 and merged["buffer_fill"] == 4 / 12
    log = MetricLogger(None)
    for raw in (ra, rb, health.empty_stats(0)):  # the empty part: a non-zero rank of a global buffer
        for name, (v, w, kind) in health.figures(raw).items():
            log.report(name, v, weight=w, kind=kind)
    reduced = log.reduce()
    assert set(reduced) == set(merged)
    for k, v in merged.items():
        assert reduced[k] == pytest.approx(v, abs=1e-12), k


def test_ages_survive_state_round_trips_and_resplits():
    buf = ReplayBuffer(6, (2,), seed=0)
    buf.write(np.arange(6), np.zeros((6, 2), np.float32), steps=1)
    buf.write(np.array([4]), np.zeros((1, 2), np.float32), steps=2)
    other = ReplayBuffer(6, (2,), seed=1)
    other.load_state_dict(buf.state_dict())
    assert other.age.tolist() == [1, 1, 1, 1, 3, 1]
    old = buf.state_dict()
    del old["age"]  # a checkpoint from before ages were kept: every chain counts as fresh
    other.load_state_dict(old)
    assert other.age.tolist() == [0] * 6
    halves = resplit_states([buf.state_dict()], [3, 3], 0)
    assert [h["age"].tolist() for h in halves] == [[1, 1, 1], [1, 3, 1]]


def test_max_and_min_kinds_ignore_unweighted_reports():
    log = MetricLogger(None)
    log.report("top", 3.0, kind="max")
    log.report("top", 99.0, weight=0.0, kind="max")
    log.report("top", 5.0, kind="max")
    log.report("low", 2.0, kind="min")
    log.report("low", -7.0, weight=0.0, kind="min")
    log.report("none", 1.0, weight=0.0, kind="max")
    log.report("mean", 4.0)
    out = log.reduce()
    assert out["top"] == 5.0 and out["low"] == 2.0 and math.isnan(out["none"]) and out["mean"] == 4.0


def test_pairwise_distances_match_the_direct_sum_even_for_near_duplicates():
    rng = np.random.default_rng(0)
    # Chains near one offset state, differing by ~1e-3: the Gram shortcut must not cancel them away.
    x = (0.9 + 1e-3 * rng.standard_normal((20, 3 * 16 * 16))).astype(np.float32)
    got, pairs = health.pairwise_distance_sum(x)
    x64 = x.astype(np.float64)
    want = sum(np.linalg.norm(x64[i] - x64[j]) for i in range(20) for j in range(i + 1, 20)) / np.sqrt(x.shape[1])
    assert pairs == 190 and got == pytest.approx(want, rel=1e-4)
