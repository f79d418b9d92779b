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


# --------------------------------------------------------------------------- class-conditional samples
N_COND = 21  # 2 classes: 11 + 10 samples; the ranks' shares differ in size too


def _conditional_statistics(first: int, count: int, init: str) -> tuple:
    """This share's class-conditional samples of the 2-class toy energy (noise or buffer starts),
    flattened into FeatureStats (the features stand in for Inception's: the reduction is the
    same), and the share's per-class counts."""
    from ebmscale.buffer.replay import ReplayBuffer
    from ebmscale.eval.generate import balanced_classes, buffer_class_images, conditional_generate
    from tests.unit.test_conditional_sampling import SETTINGS, SHAPE, TwoClassEnergy

    labels, ordinals = balanced_classes(N_COND, 2)
    mine = labels[first:first + count]
    starts = None
    if init == "buffer":
        state = ReplayBuffer(24, SHAPE, (0.0, 1.0), num_classes=2, seed=7).state_dict()
        starts = buffer_class_images(state, mine, ordinals[first:first + count])
    stats = FeatureStats(16)
    for x in conditional_generate(TwoClassEnergy(), mine, first, SHAPE, SETTINGS, 4, init_bounds=(0.0, 1.0),
                                  starts=starts, batch_size=4):
        stats.update(x.flatten(1))
    return stats, np.bincount(mine, minlength=2)


def _conditional_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = {}
        for init in ("noise", "buffer"):
            stats, counts = _conditional_statistics(*rank_share(N_COND), init)
            stats.all_reduce()
            mu, sigma = stats.mean_cov()
            res.update({f"{init}_mu": mu, f"{init}_sigma": sigma, f"{init}_n": stats.n, f"{init}_counts": counts})
        np.savez(os.path.join(out, f"cond{rank}.npz"), **res)
    finally:
        tdist.destroy_process_group()


def test_two_ranks_give_the_class_conditional_statistics_of_one(tmp_path):
    mp.start_processes(_conditional_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    ranks = [dict(np.load(os.path.join(tmp_path, f"cond{r}.npz"))) for r in range(WORLD)]
    for init in ("noise", "buffer"):
        one, counts = _conditional_statistics(0, N_COND, init)
        mu, sigma = one.mean_cov()
        assert counts.tolist() == [11, 10]
        # Exact per-class counts, split over the ranks.
        assert (ranks[0][f"{init}_counts"] + ranks[1][f"{init}_counts"]).tolist() == [11, 10]
        for r in ranks:
            assert int(r[f"{init}_n"]) == N_COND
            np.testing.assert_allclose(r[f"{init}_mu"], mu, rtol=0, atol=1e-12)
            np.testing.assert_allclose(r[f"{init}_sigma"], sigma, rtol=0, atol=1e-12)
