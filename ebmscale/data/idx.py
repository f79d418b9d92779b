"""IDX files (the MNIST family's format), gzip-compressed: Fashion-MNIST from the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``)."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from ebmscale.data.builtin import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx_gz(path: str) -> np.ndarray:
    """A gzip IDX file as an array: magic 0x0000 + dtype code (0x08 = uint8) + rank, then one
    big-endian uint32 per dimension, then the data."""
    try:
        with gzip.open(path, "rb") as fh:
            head = fh.read(4)
            if len(head) != 4 or head[:2] != b"\x00\x00" or head[2] != 0x08:
                raise DataError(f"'{path}' is not a uint8 IDX file")
            dims = struct.unpack(f">{head[3]}I", fh.read(4 * head[3]))
            data = np.frombuffer(fh.read(), dtype=np.uint8)
    except (OSError, EOFError, struct.error) as exc:
        raise DataError(f"'{path}' cannot be read as a gzip IDX file ({type(exc).__name__})") from None
    if data.size != int(np.prod(dims)):
        raise DataError(f"'{path}' holds {data.size} bytes of data, its header says {dims}")
    return data.reshape(dims)


def load_fashion_mnist(split: str = "test", root: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``(uint8 [N, 28, 28, 1], int64 [N])`` from ``root``."""
    if split not in _FILES:
        raise DataError(f"Fashion-MNIST has splits 'train' and 'test', not '{split}'")
    images, labels = (os.path.join(root, f) for f in _FILES[split])
    if not os.path.isfile(images):
        raise DataError(f"Fashion-MNIST not found: '{images}' does not exist (install the Debian package "
                        f"dataset-fashion-mnist, or point --fashion-root at the idx .gz files)")
    x, y = read_idx_gz(images), read_idx_gz(labels)
    if x.ndim != 3 or len(x) != len(y):
        raise DataError(f"Fashion-MNIST in '{root}': images {x.shape} and labels {y.shape} do not match")
    return x[..., None].copy(), y.astype(np.int64)
