"""Classifier metrics for JEM-style models: accuracy, expected calibration error, reliability
diagrams. Functions take probabilities/labels (NumPy or torch) and know nothing of models."""
from __future__ import annotations

import numpy as np
import torch


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def accuracy(probs, labels) -> float:
    """Top-1 accuracy of class probabilities (or logits) ``probs`` [N, C] against ``labels`` [N]."""
    return float((_np(probs).argmax(1) == _np(labels)).mean())


def calibration_bins(probs, labels, n_bins: int = 20) -> dict[str, np.ndarray]:
    """Per-bin confidence, accuracy and count for equal-width confidence bins over [0, 1]
    (a prediction with confidence c falls in bin ceil(c * n_bins) - 1, so 1.0 is in the last)."""
    p, y = _np(probs).astype(np.float64), _np(labels)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"confidence": np.where(count > 0, conf_sum / count, np.nan),
                "accuracy": np.where(count > 0, acc_sum / count, np.nan), "count": count,
                "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def expected_calibration_error(probs, labels, n_bins: int = 20) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over equal-width confidence bins (JEM uses 20)."""
    b = calibration_bins(probs, labels, n_bins)
    n = b["count"].sum()
    mask = b["count"] > 0
    return float((b["count"][mask] / n * np.abs(b["accuracy"][mask] - b["confidence"][mask])).sum())


def reliability_diagram(probs, labels, path: str, n_bins: int = 20, title: str = "") -> None:
    """Write a reliability-diagram PNG (accuracy per confidence bin against the diagonal)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    b = calibration_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    fig = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    centres = (b["edges"][:-1] + b["edges"][1:]) / 2
    ax.bar(centres, np.nan_to_num(b["accuracy"]), width=1.0 / n_bins, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} ECE={100 * ece:.2f}%".strip())
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
