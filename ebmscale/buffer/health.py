"""Buffer health: how old the persistent chains are, how many restart from noise, how diverse
they are, and how far each class's part has been evolved. NumPy only (Ray shard actors import it).

Every figure is computed from additive counts (:func:`raw_stats`), so the parts of one buffer
(Ray shards, or the per-rank buffers of the local backend) combine exactly without moving chains:
:func:`merge` sums the counts of several parts and :func:`figures` turns counts into
``(value, weight, kind)`` triples that a weighted mean (or max/min) across ranks reproduces.

* age: sampler steps a stored chain has run since it last started from noise (a write-back adds
  the chain's K steps; a re-initialised start resets it first);
* re-initialised fraction: the share of written-back chains that had restarted from noise, since
  the previous call (the counters reset);
* diversity: mean pairwise L2 distance / sqrt(dim) of a fixed, evenly spaced subsample of slots
  (per part: on Ray, pairs within each shard); 0 when the chains collapse onto one state,
  about 0.41 x (hi - lo) for uniform noise;
* fill: the share of slots (per class in a class-partitioned buffer) holding an evolved chain,
  i.e. written back at least once since it was last noise.
"""
from __future__ import annotations

from typing import Any

import numpy as np

DIVERSITY_SUBSAMPLE = 64  # slots per part: 2,016 pairs, a few ms even at 3x128x128
PER_CLASS_LIMIT = 20  # more classes than this: log the emptiest class's fill, not one curve per class


def subsample_slots(capacity: int, m: int = DIVERSITY_SUBSAMPLE) -> np.ndarray:
    """Evenly spaced slot indices (the same ones at every call, so the figure follows fixed slots)."""
    return np.unique(np.linspace(0, capacity - 1, min(int(m), capacity)).round().astype(np.int64))


def pairwise_distance_sum(x: np.ndarray) -> tuple[float, int]:
    """(sum over pairs i < j of ||x_i - x_j|| / sqrt(dim), number of pairs). The Gram matrix is
    float32 (5x faster than float64 at 3x128x128) on centred data, which removes the common
    offset that would cancel; norms and the sum are float64."""
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    m, dim = x.shape
    if m < 2:
        return 0.0, 0
    x = x - x.mean(0, dtype=np.float64).astype(np.float32)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T).astype(np.float64), 0.0)
    iu = np.triu_indices(m, 1)
    return float(np.sqrt(d2[iu]).sum() / np.sqrt(dim)), len(iu[0])


def raw_stats(data: np.ndarray, age: np.ndarray, labels: np.ndarray | None, num_classes: int, starts: int,
              reinits: int, decode: Any, subsample: int = DIVERSITY_SUBSAMPLE) -> dict:
    """Additive counts of one buffer part. ``decode`` maps stored chains to float32."""
    div_sum, pairs = pairwise_distance_sum(decode(data[subsample_slots(len(data), subsample)]))
    evolved = age > 0
    out = {"slots": len(age), "age_sum": float(age.sum()), "age_max": int(age.max()) if len(age) else 0,
           "evolved": int(evolved.sum()), "starts": int(starts), "reinits": int(reinits), "div_sum": div_sum,
           "div_pairs": pairs, "class_slots": [], "class_evolved": []}
    if num_classes:
        out["class_slots"] = np.bincount(labels, minlength=num_classes).tolist()
        out["class_evolved"] = np.bincount(labels[evolved], minlength=num_classes).tolist()
    return out


def empty_stats(num_classes: int) -> dict:
    """The counts of no buffer at all (a rank whose global buffer is reported by rank 0)."""
    return {"slots": 0, "age_sum": 0.0, "age_max": 0, "evolved": 0, "starts": 0, "reinits": 0, "div_sum": 0.0,
            "div_pairs": 0, "class_slots": [0] * num_classes, "class_evolved": [0] * num_classes}


def merge(parts: list[dict]) -> dict:
    """Counts of several parts of one buffer: sums, and the largest age."""
    out = dict(parts[0])
    for p in parts[1:]:
        for k, v in p.items():
            if k == "age_max":
                out[k] = max(out[k], v)
            elif isinstance(v, list):
                out[k] = [a + b for a, b in zip(out[k], v)]
            else:
                out[k] = out[k] + v
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def figures(raw: dict) -> dict[str, tuple[float, float, str]]:
    """Metric name -> (value, weight, kind): the weighted mean over ranks of ``value`` with
    ``weight`` (kind 'mean'), or the max/min over ranks with a nonzero weight, is the figure of
    the whole buffer. A part without slots gets weight 0 everywhere (it reports nothing)."""
    has = 1.0 if raw["slots"] else 0.0
    out = {
        "buffer_age_mean": (_ratio(raw["age_sum"], raw["slots"]), float(raw["slots"]), "mean"),
        "buffer_age_max": (float(raw["age_max"]), has, "max"),
        "buffer_reinit_frac": (_ratio(raw["reinits"], raw["starts"]), float(raw["starts"]), "mean"),
        "buffer_diversity": (_ratio(raw["div_sum"], raw["div_pairs"]), float(raw["div_pairs"]), "mean"),
        "buffer_fill": (_ratio(raw["evolved"], raw["slots"]), float(raw["slots"]), "mean"),
    }
    slots, evolved = raw["class_slots"], raw["class_evolved"]
    if 0 < len(slots) <= PER_CLASS_LIMIT:
        for c, (s, e) in enumerate(zip(slots, evolved)):
            out[f"buffer_fill_class{c}"] = (_ratio(e, s), float(s), "mean")
    elif slots:
        # With a local buffer per rank this is the emptiest class on the emptiest rank.
        out["buffer_fill_class_min"] = (min(_ratio(e, s) for s, e in zip(slots, evolved)), has, "min")
    return out
