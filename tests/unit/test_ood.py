"""OOD scores and AUROC, the IDX reader for Fashion-MNIST, synthetic OOD sets, and PGD."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torch import nn

from ebmscale.data.builtin import DataError
from ebmscale.data.idx import load_fashion_mnist, read_idx_gz
from ebmscale.eval.ood import adapt_images, auroc, ood_scores, synthetic_ood
from ebmscale.eval.robustness import pgd_attack, robust_correct


def test_auroc_hand_computed():
    # in: 3, 2, 1 ; out: 2, 0 -> pairs (in > out): (3,2) (3,0) (2,0) (1,0) = 4, tie (2,2) = 0.5, of 6.
    assert auroc([3, 2, 1], [2, 0]) == pytest.approx(4.5 / 6)
    assert auroc([5, 6], [1, 2]) == 1.0
    assert auroc([1, 2], [5, 6]) == 0.0
    assert auroc([1, 1], [1, 1, 1]) == 0.5
    with pytest.raises(ValueError):
        auroc([], [1])


def write_idx(path, arr: np.ndarray) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def fashion_root(tmp_path, n: int = 12):
    """Fabricated Fashion-MNIST idx files in the Debian package's layout."""
    rng = np.random.default_rng(0)
    for prefix in ("t10k", "train"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return str(tmp_path)


def test_fashion_mnist_reader(tmp_path):
    root = fashion_root(tmp_path)
    x, y = load_fashion_mnist("test", root)
    assert x.shape == (12, 28, 28, 1) and x.dtype == np.uint8 and y.tolist() == [i % 10 for i in range(12)]
    np.testing.assert_array_equal(x[..., 0], read_idx_gz(str(tmp_path / "t10k-images-idx3-ubyte.gz")))


def test_fashion_mnist_missing_or_bad(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist") as e:
        load_fashion_mnist("test", str(tmp_path / "none"))
    assert "none/t10k-images-idx3-ubyte.gz" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="bad.gz"):
        read_idx_gz(str(tmp_path / "bad.gz"))
    write_idx(tmp_path / "short.gz", np.zeros((2, 3), np.uint8))
    raw = gzip.open(tmp_path / "short.gz").read()
    with gzip.open(tmp_path / "short.gz", "wb") as fh:
        fh.write(raw[:-1])
    with pytest.raises(DataError, match="header says"):
        read_idx_gz(str(tmp_path / "short.gz"))


def test_synthetic_sets_and_adapt():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 1, 4, 6), dtype=np.uint8)
    assert synthetic_ood("uniform", x, 7, rng).shape == (7, 1, 4, 6)
    c = synthetic_ood("constant", x, 3, rng)
    assert all(len(np.unique(img)) == 1 for img in c)
    np.testing.assert_array_equal(synthetic_ood("flip_h", x, 5, rng), x[..., ::-1])
    np.testing.assert_array_equal(synthetic_ood("flip_v", x, 2, rng), x[:2, :, ::-1, :])
    grey = np.full((2, 28, 28, 1), 100, np.uint8)
    out = adapt_images(grey, (3, 32, 32))
    assert out.shape == (2, 3, 32, 32) and (out == 100).all()


class Quadratic(nn.Module):
    """Logits f(x)_k = -|x - c_k|^2 / 2 over two centres: E(x) = -logsumexp f."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))

    def logits(self, x):
        return -0.5 * ((x[:, None, :] - self.c[None]) ** 2).sum(-1)

    def forward(self, x, y=None):
        return -torch.logsumexp(self.logits(x), 1)


def test_ood_scores_by_hand():
    m = Quadratic()
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    s = ood_scores(m, x)
    f = m.logits(x).detach()
    torch.testing.assert_close(s["log_px"], torch.logsumexp(f, 1).double())
    torch.testing.assert_close(s["max_softmax"], torch.softmax(f, 1).amax(1).double())
    # d log p / dx = sum_k p_k (c_k - x): at (1, 0) p = (1/(1+e^-2), ...); check (0, 3) exactly: -(0, 3) . norm 3
    assert float(s["neg_grad_norm"][1]) == pytest.approx(-3.0, rel=1e-5)


def test_pgd_linf_and_l2_stay_in_the_ball_and_fool_a_linear_classifier():
    w = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        w.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # class 0 iff x0 > 0
    x = torch.tensor([[0.05, 0.0], [0.5, 0.2]])
    y = torch.tensor([0, 0])
    g = torch.Generator().manual_seed(0)
    for norm in ("linf", "l2"):
        adv = pgd_attack(w, x, y, norm, eps=0.1, steps=20, bounds=(-1.0, 1.0), generator=g)
        d = (adv - x).abs().amax(1) if norm == "linf" else (adv - x).norm(dim=1)
        assert float(d.max()) <= 0.1 + 1e-6
        ok = robust_correct(w, x, y, norm, 0.1, 20, (-1.0, 1.0), g)
        assert ok.tolist() == [False, True]  # the point 0.05 from the boundary flips, the far one not
    assert robust_correct(w, x, y, "linf", 0.0, 20, (-1.0, 1.0), g).all()  # eps 0 = clean accuracy
    # Refinement runs before classifying: one that maps everything to class 0's side rescues both.
    ok = robust_correct(w, x, y, "linf", 0.1, 20, (-1.0, 1.0), g, refine=lambda a: a.abs())
    assert ok.all()
