"""Distributed FID and Inception Score: images in, statistics out (knows nothing of models).

Each rank feeds its share of the images through the FID Inception
(:mod:`ebmscale.eval.inception`) and accumulates, in float64, the feature count, sum and sum of
outer products (:class:`FeatureStats`); one all-reduce of those sums gives the exact mean and
covariance of all N images, whatever the number of ranks (no gather of features, no padding,
no sample counted twice). The Frechet distance between two Gaussians is then computed from
the eigenvalues of a symmetric PSD matrix (:func:`frechet_distance`), which needs no ``eps``
fudge when a covariance is singular (N < 2048).

Reference statistics are ``.npz`` files with ``mu`` and ``sigma`` (what pytorch-fid's
``compute_statistics_of_path`` reads) plus ``n``, ``weights`` (the Inception's provenance) and
``resize``.

The Inception Score uses the 1008-way logits of the official weights: the split of each image
is its global index modulo ``splits``, and per-split sums of p(y|x) and of sum_y p log p are
all-reduced, so the distributed score equals the single-process one on the same images.
"""
from __future__ import annotations

import math
import os
from typing import Iterable

import numpy as np
import torch

from ebmscale import dist
from ebmscale.utils import atomic_path, even_share


class FeatureStats:
    """Running float64 count, sum and outer-product sum of feature vectors (one rank's share
    until :meth:`all_reduce`)."""

    def __init__(self, dim: int = 2048):
        self.dim = int(dim)
        self.n = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor | np.ndarray) -> None:
        """Add features ``(m, dim)``."""
        f = torch.as_tensor(feats).detach().to("cpu", torch.float64)
        if f.dim() != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be (m, {self.dim}), got {tuple(f.shape)}")
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer.addmm_(f.T, f)

    def all_reduce(self) -> "FeatureStats":
        """Sum the statistics of every rank in place (no-op in one process); returns self."""
        vec = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum, self.outer.reshape(-1)])
        dist.all_reduce_sum(vec)
        self.n = int(round(float(vec[0])))
        self.sum = vec[1 : 1 + self.dim].clone()
        self.outer = vec[1 + self.dim :].reshape(self.dim, self.dim).clone()
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) with the unbiased covariance (denominator n - 1), as ``np.cov`` gives."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        sigma = 0.5 * (sigma + sigma.T)  # exactly symmetric despite rounding
        return mu.numpy(), sigma.numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    ``tr((S1 S2)^(1/2))`` is the sum of square roots of the eigenvalues of S1 S2, which equal those
    of the symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)``; ``eigh`` of that is stable for singular
    covariances where ``scipy.linalg.sqrtm`` of the non-symmetric product needs an offset."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    w, v = np.linalg.eigh(0.5 * (s1 + s1.T))
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ (0.5 * (s2 + s2.T)) @ root1
    ev = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


class InceptionScoreStats:
    """Per-split sums for the Inception Score: count, sum_x p(y|x), sum_x sum_y p log p."""

    def __init__(self, classes: int = 1008, splits: int = 10):
        self.splits = int(splits)
        self.count = torch.zeros(self.splits, dtype=torch.float64)
        self.p_sum = torch.zeros(self.splits, classes, dtype=torch.float64)
        self.neg_entropy = torch.zeros(self.splits, dtype=torch.float64)

    def update(self, logits: torch.Tensor, first_index: int) -> None:
        """Add logits ``(m, classes)`` of the images with global indices ``first_index + i``."""
        logp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)
        p = logp.exp()
        split = (first_index + torch.arange(len(p))) % self.splits
        self.count.index_add_(0, split, torch.ones(len(p), dtype=torch.float64))
        self.p_sum.index_add_(0, split, p)
        self.neg_entropy.index_add_(0, split, (p * logp).sum(1))

    def all_reduce(self) -> "InceptionScoreStats":
        for t in (self.count, self.p_sum, self.neg_entropy):
            dist.all_reduce_sum(t)
        return self

    def score(self) -> tuple[float, float]:
        """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), p(y) the split's marginal."""
        vals = []
        for k in range(self.splits):
            n = float(self.count[k])
            if n == 0:
                continue
            py = self.p_sum[k] / n
            kl = float(self.neg_entropy[k]) / n - float((py * torch.log(py.clamp_min(1e-300))).sum())
            vals.append(math.exp(kl))
        if not vals:
            raise ValueError("Inception Score of no images")
        return float(np.mean(vals)), float(np.std(vals))


def rank_share(n: int, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(first global index, count) of this rank's part when ``n`` items are split over ranks as
    evenly as possible; the parts tile [0, n) exactly."""
    rank = dist.rank() if rank is None else rank
    world = dist.world_size() if world is None else world
    return even_share(n, world, rank)


@torch.no_grad()
def inception_statistics(batches: Iterable[torch.Tensor], detector, first_index: int = 0,
                         device: torch.device | str | None = None, splits: int = 10,
                         reduce: bool = True) -> tuple[FeatureStats, InceptionScoreStats | None]:
    """Feature statistics (and Inception-Score sums when ``detector.has_logits``) of this rank's
    images, all-reduced across ranks when ``reduce`` (a collective: every rank must call it).

    ``batches`` yields ``(m, 1|3, H, W)`` uint8 or [0, 1] float images; ``first_index`` is the
    global index of this rank's first image (it fixes the Inception-Score splits)."""
    device = device or next(detector.parameters()).device
    stats = FeatureStats(2048)
    is_stats = InceptionScoreStats(1008, splits) if getattr(detector, "has_logits", False) else None
    index = first_index
    for x in batches:
        feats, logits = detector(x.to(device))
        stats.update(feats)
        if is_stats is not None:
            is_stats.update(logits, index)
        index += len(x)
    if reduce:
        stats.all_reduce()
        if is_stats is not None:
            is_stats.all_reduce()
    return stats, is_stats


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, n: int, weights: str, resize: str,
               source: str = "") -> None:
    """Write reference statistics pytorch-fid can read (``mu``, ``sigma``), with their size,
    the Inception's provenance, the resize method and the data source; atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, mu=mu, sigma=sigma, n=np.int64(n), weights=np.str_(weights), resize=np.str_(resize),
                 source=np.str_(source))


def load_stats(path: str) -> dict:
    """Read ``.npz`` statistics (ours or pytorch-fid's: only ``mu`` and ``sigma`` are required)."""
    from ebmscale.data.builtin import DataError

    if not os.path.isfile(path):
        raise DataError(f"FID reference statistics '{path}' do not exist (write them with `ebmscale eval ref-stats`)")
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {"mu": np.asarray(f["mu"], np.float64), "sigma": np.asarray(f["sigma"], np.float64)}
            for k in ("n", "weights", "resize", "source"):
                if k in f:
                    out[k] = f[k].item()
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"FID reference statistics '{path}' are unreadable or lack mu/sigma "
                        f"({type(exc).__name__})") from None
    if out["mu"].ndim != 1 or out["sigma"].shape != (out["mu"].size, out["mu"].size):
        raise DataError(f"FID reference statistics '{path}' have mu {out['mu'].shape} and sigma {out['sigma'].shape}")
    return out


def fid_against(stats: FeatureStats, ref: dict) -> float:
    """FID of all-reduced ``stats`` against loaded reference statistics."""
    mu, sigma = stats.mean_cov()
    return frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
