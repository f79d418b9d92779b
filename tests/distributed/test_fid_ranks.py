"""Distributed FID statistics over 2 real gloo processes equal the single-process figures.

Each rank takes its share (``rank_share``) of the same float32 features, accumulates float64
sums and outer products, and all-reduces them; the FID from the reduced statistics must equal
pytorch-fid's ``calculate_frechet_distance`` on all the features in one process (1e-6
relative), with N exact. The Inception-Score sums are checked the same way.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from ebmscale.eval.fid import FeatureStats, InceptionScoreStats, frechet_distance, rank_share
from tests.distributed.dp_scenarios import _free_port

N, D, WORLD = 301, 64, 2  # N odd: the ranks' shares differ in size


def _features():
    rng = np.random.default_rng(0)
    f1 = (rng.normal(size=(N, D)) @ rng.normal(size=(D, D))).astype(np.float32)
    f2 = (rng.normal(0.2, 1.0, size=(N + 50, D)) @ rng.normal(size=(D, D))).astype(np.float32)
    logits = rng.normal(scale=3.0, size=(N, 10)).astype(np.float32)
    return f1, f2, logits


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        f1, f2, logits = _features()
        first, count = rank_share(N)
        stats = FeatureStats(D)
        is_stats = InceptionScoreStats(10, splits=3)
        for lo in range(first, first + count, 40):  # batches, as an image loop would feed them
            hi = min(lo + 40, first + count)
            stats.update(torch.from_numpy(f1[lo:hi]))
            is_stats.update(torch.from_numpy(logits[lo:hi]), lo)
        stats.all_reduce()
        is_stats.all_reduce()
        mu, sigma = stats.mean_cov()
        f2d = f2.astype(np.float64)
        fid = frechet_distance(mu, sigma, f2d.mean(0), np.cov(f2d, rowvar=False))
        np.savez(os.path.join(out, f"rank{rank}.npz"), fid=fid, n=stats.n, local=count, mu=mu, sigma=sigma,
                 is_score=np.array(is_stats.score()))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fid_ranks"))
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=True, start_method="spawn")
    return [dict(np.load(os.path.join(out, f"rank{r}.npz"))) for r in range(WORLD)]


def test_two_process_fid_equals_single_process_pytorch_fid(ranks):
    # Imported here, not at module level: the spawned ranks import this module and need not load it.
    from pytorch_fid.fid_score import calculate_frechet_distance

    f1, f2, _ = _features()
    a, b = f1.astype(np.float64), f2.astype(np.float64)
    ref = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    for r in ranks:
        assert int(r["n"]) == N  # exact N: every feature counted once
        assert float(r["fid"]) == pytest.approx(ref, rel=1e-6)
        np.testing.assert_allclose(r["sigma"], np.cov(a, rowvar=False), rtol=1e-9, atol=1e-9)
    assert sorted(int(r["local"]) for r in ranks) == [150, 151]


def test_two_process_inception_score_equals_single_process(ranks):
    _, _, logits = _features()
    single = InceptionScoreStats(10, splits=3)
    single.update(torch.from_numpy(logits), 0)
    for r in ranks:
        np.testing.assert_allclose(r["is_score"], single.score(), rtol=1e-12)
