"""Readers of the formats users have, into a :class:`Source` ready to be sharded.

An ImageNet-style folder tree (one subfolder per class), the CIFAR-10/100 python archives as
downloaded (``cifar-10-python.tar.gz``, or the folder they unpack to), NumPy ``.npz`` arrays, and
the built-in MNIST and digits. :func:`load_source` picks the reader by kind; the shard writer
(:mod:`ebmscale.data.writer`) takes any Source.
"""
from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ebmscale.data.builtin import BUILTIN_IMAGE_SETS, DataError, load_builtin

# The file extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SOURCE_KINDS = ("folder", "cifar10", "cifar100", "npz") + BUILTIN_IMAGE_SETS


@dataclass
class Source:
    """A source read into memory (arrays) or listed (files), ready to be sharded.

    Exactly one of ``images`` (uint8 NHWC) and ``files`` is set. ``labels`` is None for
    unlabelled sources. ``shape`` is the native (C, H, W) when every image shares it, else None.
    """

    kind: str
    path: str
    split: str
    labels: np.ndarray | None
    class_names: list[str]
    channels: int
    images: np.ndarray | None = None
    files: list[str] | None = None
    shape: tuple[int, int, int] | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)


def read_folder(path: str) -> Source:
    """An ImageNet-style tree ``path/<class>/**/<image>``: classes are the sorted subfolder names
    (as torchvision's ImageFolder), files are sorted within each class."""
    if not os.path.isdir(path):
        raise DataError(f"image folder '{path}' does not exist or is not a folder")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = []
        for root, _dirs, names in os.walk(os.path.join(path, name), followlinks=True):
            found += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        found.sort()
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"image folder '{path}' has no class subfolders holding images "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    return Source("folder", path, "", np.asarray(labels, np.int64), classes, 3, files=files)


def _unpickle(blob: bytes, what: str) -> dict:
    try:
        return pickle.loads(blob, encoding="bytes")  # noqa: S301 - the user's own files, as torchvision does
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise DataError(f"cannot read {what}: {type(exc).__name__}: {exc}") from None


class _CifarFiles:
    """Members of a CIFAR python archive, from the ``.tar.gz`` itself or the folder it unpacks to."""

    def __init__(self, path: str):
        self.path = path
        self.blobs: dict[str, bytes] = {}
        if os.path.isdir(path):
            for root, _dirs, names in os.walk(path):
                for n in names:
                    with open(os.path.join(root, n), "rb") as fh:
                        self.blobs.setdefault(n, fh.read())
        elif os.path.isfile(path):
            try:
                with tarfile.open(path, "r:*") as tar:
                    for m in tar:
                        if m.isreg():
                            self.blobs.setdefault(os.path.basename(m.name), tar.extractfile(m).read())
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                raise DataError(f"CIFAR archive '{path}' is not a readable tar.gz: {exc}") from None
        else:
            raise DataError(f"CIFAR archive '{path}' does not exist")

    def load(self, name: str, kind: str) -> dict:
        if name not in self.blobs:
            raise DataError(f"'{self.path}' is not a {kind} python archive: it has no '{name}'")
        return _unpickle(self.blobs[name], f"'{name}' in '{self.path}'")


def read_cifar(path: str, kind: str = "cifar10", split: str = "train", label_kind: str = "fine") -> Source:
    """CIFAR-10 or CIFAR-100 from the python-version archive; ``split`` is 'train' or 'test';
    ``label_kind`` picks CIFAR-100's 'fine' (100) or 'coarse' (20) labels."""
    if split not in ("train", "test"):
        raise DataError(f"CIFAR has splits 'train' and 'test', not '{split}'")
    files = _CifarFiles(path)
    if kind == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, names_key, meta_name = b"labels", b"label_names", "batches.meta"
    elif kind == "cifar100":
        if label_kind not in ("fine", "coarse"):
            raise DataError(f"CIFAR-100 labels are 'fine' or 'coarse', not '{label_kind}'")
        names = [split]
        label_key, names_key, meta_name = (f"{label_kind}_labels".encode(), f"{label_kind}_label_names".encode(),
                                           "meta")
    else:
        raise DataError(f"unknown CIFAR kind '{kind}' (cifar10 or cifar100)")
    xs, ys = [], []
    for n in names:
        d = files.load(n, kind)
        if b"data" not in d or label_key not in d:
            raise DataError(f"'{n}' in '{path}' lacks 'data' or '{label_key.decode()}': not a {kind} batch")
        x = np.asarray(d[b"data"], np.uint8)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise DataError(f"'{n}' in '{path}' holds data of shape {x.shape}, expected (N, 3072)")
        # Rows are the red, green and blue 32x32 planes one after the other.
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[label_key], np.int64))
    meta = files.load(meta_name, kind)
    class_names = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])]
    y = np.concatenate(ys)
    if not class_names:
        class_names = [str(i) for i in range(int(y.max()) + 1)]
    return Source(kind, path, split, y, class_names, 3, images=np.ascontiguousarray(np.concatenate(xs)),
                  shape=(3, 32, 32), extra={"labels": label_kind} if kind == "cifar100" else {})


_NPZ_IMAGE_KEYS = ("x", "images", "image", "imgs", "data", "X", "x_train")
_NPZ_LABEL_KEYS = ("y", "labels", "label", "targets", "target", "Y", "y_train")


def _npz_pick(keys: Sequence[str], wanted: str | None, candidates: Sequence[str], path: str, what: str) -> str | None:
    if wanted:
        if wanted not in keys:
            raise DataError(f"'{path}' has no array '{wanted}' (it has: {', '.join(keys)})")
        return wanted
    return next((k for k in candidates if k in keys), None)


def npz_layout(shape: tuple[int, ...], path: str) -> tuple[str, tuple[int, int, int]]:
    """('nhwc' | 'nchw' | 'nhw', (C, H, W)) of an image array's shape."""
    if len(shape) == 3:
        return "nhw", (1, shape[1], shape[2])
    if len(shape) == 4 and shape[3] in (1, 3):
        return "nhwc", (shape[3], shape[1], shape[2])
    if len(shape) == 4 and shape[1] in (1, 3):
        return "nchw", (shape[1], shape[2], shape[3])
    raise DataError(f"images in '{path}' have shape {tuple(shape)}: expected (N, H, W), (N, H, W, 1|3) "
                    f"or (N, 1|3, H, W)")


def npz_image_shape(path: str, images_key: str | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the images in an ``.npz`` without loading them (reads the array header)."""
    if not os.path.isfile(path):
        raise DataError(f"npz file '{path}' does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            key = _npz_pick(keys, images_key, _NPZ_IMAGE_KEYS, path, "images")
            if key is None:
                raise DataError(f"'{path}' has no image array (looked for {', '.join(_NPZ_IMAGE_KEYS)}; "
                                f"it has: {', '.join(keys)})")
            with zf.open(key + ".npy") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, _ = read_header(fh)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"'{path}' is not a readable .npz file: {exc}") from None
    return npz_layout(tuple(shape), path)[1]


def read_npz(path: str, images_key: str | None = None, labels_key: str | None = None) -> Source:
    """Images (uint8, or floats in [0, 1]) and optional integer labels from an ``.npz``.

    Image keys tried in order: x, images, image, imgs, data, X, x_train; label keys: y, labels,
    label, targets, target, Y, y_train (or name them). Layouts (N, H, W), (N, H, W, C) and
    (N, C, H, W) with C in {1, 3} are recognised."""
    if not os.path.isfile(path):
        raise DataError(f"npz file '{path}' does not exist")
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = list(arrays.keys())
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"'{path}' is not a readable .npz file: {exc}") from None
    ikey = _npz_pick(keys, images_key, _NPZ_IMAGE_KEYS, path, "images")
    if ikey is None:
        raise DataError(f"'{path}' has no image array (looked for {', '.join(_NPZ_IMAGE_KEYS)}; "
                        f"it has: {', '.join(keys)}); name it with --images-key")
    x = arrays[ikey]
    layout, (c, h, w) = npz_layout(x.shape, path)
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating):
            lo, hi = float(x.min()), float(x.max())
            if lo < 0.0 or hi > 1.0:
                raise DataError(f"float images in '{path}' range over [{lo:.4g}, {hi:.4g}]; expected [0, 1] or uint8")
            x = np.rint(x * 255.0).astype(np.uint8)
        elif np.issubdtype(x.dtype, np.integer) and x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"integer images in '{path}' range over [{x.min()}, {x.max()}]; expected 0..255")
        else:
            x = x.astype(np.uint8)
    x = x[..., None] if layout == "nhw" else x.transpose(0, 2, 3, 1) if layout == "nchw" else x
    lkey = _npz_pick(keys, labels_key, _NPZ_LABEL_KEYS, path, "labels")
    y = None
    names: list[str] = []
    if lkey is not None:
        y = np.asarray(arrays[lkey])
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"labels '{lkey}' in '{path}' must be {len(x)} integers, got {y.dtype} {y.shape}")
        if len(y) and y.min() < 0:
            raise DataError(f"labels '{lkey}' in '{path}' must be >= 0, found {y.min()}")
        y = y.astype(np.int64)
        names = [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
    return Source("npz", path, "", y, names, c, images=np.ascontiguousarray(x), shape=(c, h, w),
                  extra={"images_key": ikey, "labels_key": lkey})


def read_builtin(name: str, split: str = "train") -> Source:
    """A built-in set (MNIST, digits) as a Source."""
    x, y = load_builtin(name, split)
    return Source(name, "", split, y, [str(i) for i in range(10)], x.shape[3], images=x,
                  shape=(x.shape[3], x.shape[1], x.shape[2]))


def load_source(kind: str, path: str = "", split: str = "train", *, images_key: str | None = None,
                labels_key: str | None = None, cifar100_labels: str = "fine") -> Source:
    """Read any supported source kind."""
    if kind == "folder":
        return read_folder(path)
    if kind in ("cifar10", "cifar100"):
        return read_cifar(path, kind, split, cifar100_labels)
    if kind == "npz":
        return read_npz(path, images_key, labels_key)
    if kind in BUILTIN_IMAGE_SETS:
        return read_builtin(kind, split)
    raise DataError(f"unknown source kind '{kind}' (known: {', '.join(SOURCE_KINDS)})")

