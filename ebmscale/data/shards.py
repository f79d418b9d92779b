"""Writers and converters: webdataset tar shards plus a manifest, from the formats users have.

Sources: an ImageNet-style folder tree (one subfolder per class), the CIFAR-10/100 python
archives as downloaded (``cifar-10-python.tar.gz``, or the folder they unpack to), NumPy ``.npz``
arrays, and the built-in MNIST and digits. Every source goes through the same writer:

* the samples are put in a seeded random order first (class-sorted sources such as a folder tree
  would otherwise give single-class shards that a streaming shuffle buffer cannot mix);
* images are resized (shorter side) and centre-cropped to ``resolution`` when it is non-zero and
  differs from the image, then stored losslessly as PNG (``<key>.png``) with the label as ASCII
  text (``<key>.cls``) when the source has labels;
* shards of ``shard_size`` samples are written by ``processes`` worker processes in parallel, each
  into a temporary folder that is renamed into place only when every shard and the manifest are
  complete, so an interrupted conversion never leaves a half-written output;
* ``manifest.json`` records the sample count, shape, classes, per-shard counts, sizes and SHA-256
  checksums. The streaming loader (:mod:`ebmscale.data.stream`) needs the per-shard counts to split
  every epoch exactly across ranks and workers.

Output is reproducible: the same source and options give byte-identical shards (fixed tar mtimes,
a deterministic PNG encoder), whatever the number of processes.

The tar files are plain POSIX tars written by :class:`TarSink` (python's tarfile was the
bottleneck); webdataset and any tar tool read them. This module does not import torch.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import pickle
import shutil
import struct
import sys
import tarfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
from filelock import FileLock

from ebmscale.data.builtin import BUILTIN_IMAGE_SETS, DataError, load_builtin

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ebmscale-shards"
MANIFEST_VERSION = 1
SHARD_NAME = "shard-{:06d}.tar"
# The file extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SOURCE_KINDS = ("folder", "cifar10", "cifar100", "npz") + BUILTIN_IMAGE_SETS
RESIZE_METHOD = "PIL bicubic (antialiased) on the shorter side, then centre crop"
# Fixed tar member mtime: reproducible shards and checksums.
_TAR_MTIME = 0


# --------------------------------------------------------------------------- image helpers

def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png_filtered_rows(images: np.ndarray) -> np.ndarray:
    """PNG scanlines of a batch ``(N, H, W, C)`` as ``(N, H, 1 + W*C)`` uint8 with the filter byte
    first. Colour images get filter type 1 ("Sub": each byte minus the same channel of the pixel to
    its left, mod 256), which suits photographs; grey images get none, which on MNIST-like digits
    compresses smaller and faster than any filter."""
    n, h, w, c = images.shape
    rows = np.ascontiguousarray(images).reshape(n, h, w * c)
    raw = np.empty((n, h, w * c + 1), np.uint8)
    if c == 1:
        raw[:, :, 0] = 0
        raw[:, :, 1:] = rows
        return raw
    raw[:, :, 0] = 1
    raw[:, :, 1:c + 1] = rows[:, :, :c]
    np.subtract(rows[:, :, c:], rows[:, :, :-c], out=raw[:, :, c + 1:])  # uint8 wraps mod 256, as PNG wants
    return raw


def encode_png_batch(images: np.ndarray, level: int = 6) -> list[bytes]:
    """Lossless PNGs of uint8 images ``(N, H, W, C)``, C = 1 (grey) or 3 (RGB).

    A direct NumPy + zlib encoder: the filter runs once over the whole batch and the header is
    shared, leaving zlib as the main per-image cost. About 4x faster than Pillow's encoder on
    small images (this decides how long the built-in MNIST takes to convert on first use); on
    photographs the "Sub" filter lands within about 10% of Pillow's adaptive-filter file size.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"encode_png needs uint8 (N, H, W, 1|3), got {images.dtype} {images.shape}")
    _, h, w, c = images.shape
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0))
    tail = _png_chunk(b"IEND", b"")
    return [head + _png_chunk(b"IDAT", zlib.compress(r.tobytes(), level)) + tail
            for r in _png_filtered_rows(images)]


SHARD_FORMATS = ("png", "jpg", "npy")


def check_shard_format(image_format: str, quality: int) -> None:
    """Raise DataError naming --format / --quality when they are not a shard format and a JPEG
    quality (1..100; 95 and below are what Pillow recommends)."""
    if image_format not in SHARD_FORMATS:
        raise DataError(f"unknown shard format '{image_format}' (--format: {', '.join(SHARD_FORMATS)})")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality must be a JPEG quality in 1..100, got {quality}")


def encode_images(images: np.ndarray, image_format: str = "png", quality: int = 95) -> list[bytes]:
    """Encoded members of uint8 images ``(N, H, W, C)``, C = 1 or 3: lossless PNG, JPEG at
    ``quality`` (Pillow, 4:2:0 chroma subsampling as its default; what ImageNet users keep), or
    ``.npy`` (raw uint8 HWC arrays: no decoding at all, about 3x the bytes of PNG)."""
    if image_format == "png":
        return encode_png_batch(images)
    if image_format == "npy":
        out = []
        for img in images:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(img), allow_pickle=False)
            out.append(buf.getvalue())
        return out
    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=int(quality))
        out.append(buf.getvalue())
    return out


def encode_png(img: np.ndarray, level: int = 6) -> bytes:
    """Lossless PNG of one uint8 ``(H, W, C)`` image (see :func:`encode_png_batch`)."""
    return encode_png_batch(img[None], level)[0]


def resize_center_crop(img, size: int):
    """Resize a PIL image so that its shorter side is ``size``, then crop the centre square
    (the torchvision ``Resize(size)`` + ``CenterCrop(size)`` recipe, with Pillow's bicubic)."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _prepare_array_image(a: np.ndarray, resolution: int) -> np.ndarray:
    """An HWC uint8 array image at ``resolution`` (unchanged when 0 or already that size)."""
    h, w, c = a.shape
    if not resolution or (h, w) == (resolution, resolution):
        return a
    from PIL import Image

    img = Image.fromarray(a[..., 0] if c == 1 else a)
    out = np.asarray(resize_center_crop(img, resolution))
    return out[..., None] if out.ndim == 2 else out


def _load_file_image(path: str, resolution: int) -> np.ndarray:
    """Decode an image file as RGB, resized and centre-cropped to ``resolution``."""
    from PIL import Image

    with Image.open(path) as img:
        if img.format == "JPEG":
            # Let libjpeg decode at a reduced scale when the file is much larger than needed
            # (big speed-up for ImageNet at 32/64); the 2x margin keeps the antialiased resize's quality.
            img.draft("RGB", (2 * resolution, 2 * resolution))
        img = resize_center_crop(img.convert("RGB"), resolution)
        return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------- sources

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


# --------------------------------------------------------------------------- writing

@dataclass
class _ShardTask:
    index: int
    path: str                       # temporary-folder path of the tar to write
    first_key: int                  # global position of the shard's first sample (its key)
    resolution: int
    images: np.ndarray | None       # NHWC uint8 slice (array sources)
    files: list[str] | None         # image paths (folder sources)
    labels: np.ndarray | None
    image_format: str = "png"       # png, jpg or npy (see SHARD_FORMATS)
    quality: int = 95               # JPEG quality


class TarSink:
    """A minimal writer of plain POSIX (ustar) tar files, the container webdataset reads.

    Python's ``tarfile`` (behind webdataset's ``TarWriter``) spends about 40 us per member building
    headers, more than encoding a small PNG; this fills the same standard header from a template.
    Members are written in call order, which is the sample order readers see.
    """

    def __init__(self, path: str, mtime: int = 0):
        self.fh = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in close()
        t = bytearray(512)
        t[100:108] = b"0000444\0"                      # mode r--r--r--
        t[108:116] = t[116:124] = b"0000000\0"         # uid, gid
        t[136:148] = b"%011o\0" % int(mtime)
        t[148:156] = b" " * 8                          # the checksum is computed with its field as spaces
        t[156:157] = b"0"                              # regular file
        t[257:265] = b"ustar\x0000"
        self._template = bytes(t)

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode()
        if len(raw) > 100:
            raise ValueError(f"tar member name longer than 100 bytes: {name}")
        h = bytearray(self._template)
        h[0:len(raw)] = raw
        h[124:136] = b"%011o\0" % len(data)
        h[148:156] = b"%06o\0 " % sum(h)
        pad = -len(data) % 512
        self.fh.write(h)
        self.fh.write(data)
        if pad:
            self.fh.write(bytes(pad))

    def close(self) -> None:
        self.fh.write(bytes(1024))  # two zero blocks end the archive
        self.fh.close()

    def __enter__(self) -> "TarSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ENCODE_BLOCK = 512


def _block_images(task: _ShardTask, lo: int, hi: int, bad: list[str]) -> tuple[list[int], np.ndarray]:
    """(indices kept, their images NHWC) for samples ``lo..hi-1`` of a task; unreadable files
    are appended to ``bad`` and left out."""
    if task.images is not None:
        images = task.images[lo:hi]
        if task.resolution and images.shape[1:3] != (task.resolution, task.resolution):
            images = np.stack([_prepare_array_image(a, task.resolution) for a in images])
        return list(range(lo, hi)), images
    keep, loaded = [], []
    for i in range(lo, hi):
        try:
            loaded.append(_load_file_image(task.files[i], task.resolution))
            keep.append(i)
        except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped and reported
            bad.append(f"{task.files[i]}: {type(exc).__name__}: {exc}")
    return keep, (np.stack(loaded) if loaded else np.zeros((0, 1, 1, 3), np.uint8))


def _write_shard(task: _ShardTask) -> dict:
    """Write one shard (runs in a writer process); returns its manifest entry plus the
    source images that could not be read."""
    bad: list[str] = []
    n = len(task.images) if task.images is not None else len(task.files)
    count = 0
    with TarSink(task.path, mtime=_TAR_MTIME) as sink:
        # Blocks bound the memory of decoded images (a 5000-image shard at 128x128 is 245 MB).
        for lo in range(0, n, _ENCODE_BLOCK):
            keep, images = _block_images(task, lo, min(n, lo + _ENCODE_BLOCK), bad)
            for i, blob in zip(keep, encode_images(images, task.image_format, task.quality) if keep else []):
                # webdataset groups members by the name before the first dot: <key>.png, <key>.cls
                key = f"{task.first_key + i:09d}"
                sink.add(f"{key}.{task.image_format}", blob)
                if task.labels is not None:
                    sink.add(key + ".cls", str(int(task.labels[i])).encode())
            count += len(keep)
    with open(task.path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"index": task.index, "name": os.path.basename(task.path), "count": count,
            "bytes": os.path.getsize(task.path), "sha256": digest, "bad": bad}


def _tasks(src: Source, tmp: str, order: np.ndarray, resolution: int, shard_size: int, image_format: str = "png",
           quality: int = 95) -> Iterator[_ShardTask]:
    for s, start in enumerate(range(0, len(order), shard_size)):
        idx = order[start:start + shard_size]
        yield _ShardTask(
            index=s, path=os.path.join(tmp, SHARD_NAME.format(s)), first_key=start, resolution=resolution,
            images=None if src.images is None else src.images[idx],
            files=None if src.files is None else [src.files[i] for i in idx],
            labels=None if src.labels is None else src.labels[idx], image_format=image_format, quality=quality)


def _output_shape(src: Source, resolution: int) -> tuple[int, int, int]:
    if resolution:
        return (src.channels, resolution, resolution)
    if src.shape is None:
        raise DataError(f"source '{src.path}' holds images of differing sizes: give a resolution")
    return src.shape


def claim_output(out_dir: str, overwrite: bool) -> None:
    """Fail early (before any work) when ``out_dir`` holds something we may not replace."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise DataError(f"output '{out_dir}' exists and is not a folder")
        if os.listdir(out_dir) and not overwrite:
            raise DataError(f"output folder '{out_dir}' is not empty; choose another or pass --overwrite")


def write_shards(src: Source, out_dir: str, *, resolution: int = 0, shard_size: int = 5000, processes: int = 1,
                 seed: int = 0, shuffle: bool = True, progress: bool = False, overwrite: bool = False,
                 image_format: str = "png", quality: int = 95) -> dict:
    """Write ``src`` as webdataset shards plus ``manifest.json`` into ``out_dir``; return the manifest.
    Images are stored as ``image_format`` (:func:`encode_images`; JPEG at ``quality``).

    The work happens in a sibling temporary folder renamed to ``out_dir`` at the end, so readers
    never see a partial output. ``processes`` > 1 writes shards in parallel worker processes.
    """
    check_shard_format(image_format, quality)
    if shard_size < 1:
        raise DataError(f"samples per shard must be >= 1, got {shard_size}")
    if resolution < 0:
        raise DataError(f"resolution must be >= 0, got {resolution}")
    if len(src) == 0:
        raise DataError(f"source '{src.path or src.kind}' holds no images")
    out_dir = os.path.abspath(out_dir)
    claim_output(out_dir, overwrite)
    shape = _output_shape(src, resolution)
    order = np.random.default_rng([seed, 0x5A4D]).permutation(len(src)) if shuffle else np.arange(len(src))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(tmp)
    t0 = time.perf_counter()
    try:
        results = _run_tasks(_tasks(src, tmp, order, resolution, shard_size, image_format, quality), len(src),
                             processes, progress,
                             desc=f"shards {src.kind}")
        results.sort(key=lambda r: r["index"])
        bad = [b for r in results for b in r.pop("bad")]
        for r in results:
            r.pop("index")
        total = sum(r["count"] for r in results)
        if total == 0:
            raise DataError(f"no image of '{src.path or src.kind}' could be read (first error: {bad[0]})")
        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
            "num_samples": total, "shape": list(shape), "resolution": shape[1],
            "num_classes": len(src.class_names) if src.labels is not None else 0,
            "classes": src.class_names if src.labels is not None else [],
            "image_format": image_format, **({"jpeg_quality": int(quality)} if image_format == "jpg" else {}),
            "label_format": "cls" if src.labels is not None else None,
            "resize": RESIZE_METHOD if resolution else None,
            "source": {"kind": src.kind, "path": os.path.abspath(src.path) if src.path else "",
                       "split": src.split, **src.extra},
            "shuffled": bool(shuffle), "seed": int(seed), "skipped_sources": len(bad),
            "shards": results,
        }
        with open(os.path.join(tmp, MANIFEST_NAME), "w") as fh:
            json.dump(manifest, fh, indent=1)
        if os.path.exists(out_dir):  # checked by claim_output: empty, or overwrite allowed
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["_summary"] = {"seconds": time.perf_counter() - t0, "skipped_examples": bad[:5]}
    return manifest


def _run_tasks(tasks: Iterator[_ShardTask], total: int, processes: int, progress: bool, desc: str) -> list[dict]:
    from tqdm import tqdm

    results = []
    with tqdm(total=total, unit="img", desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        if processes <= 1:
            for t in tasks:
                results.append(_write_shard(t))
                bar.update(results[-1]["count"] + len(results[-1]["bad"]))
        else:
            # fork where available: spawn would re-run an unguarded user script's top level in every
            # writer. The writers only run NumPy, zlib and Pillow, never torch or CUDA, so forking
            # a process that holds torch threads or a CUDA context is safe here.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(processes) as pool:
                for r in pool.imap_unordered(_write_shard, tasks):
                    results.append(r)
                    bar.update(r["count"] + len(r["bad"]))
    return results


def default_processes() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- manifests

def manifest_path_for(path: str) -> str:
    """The manifest of a shard folder, or ``path`` itself when it names the manifest file."""
    return path if path.endswith(".json") else os.path.join(path, MANIFEST_NAME)


def read_manifest(path: str) -> dict:
    """Load and sanity-check a manifest (``path``: the file or the shard folder)."""
    mpath = manifest_path_for(path)
    if not os.path.isfile(mpath):
        raise DataError(f"shard manifest '{mpath}' does not exist; write shards with `ebmscale data shards`")
    try:
        with open(mpath) as fh:
            m = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"shard manifest '{mpath}' is not readable JSON: {exc}") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise DataError(f"'{mpath}' is not an ebmscale shard manifest")
    if m.get("version") != MANIFEST_VERSION:
        raise DataError(f"shard manifest '{mpath}' has version {m.get('version')}, this ebmscale reads "
                        f"{MANIFEST_VERSION}; rewrite the shards")
    return m


def verify_shards(path: str) -> dict:
    """Check every shard of a manifest against its recorded size and SHA-256; returns
    ``{"shards": n, "ok": n_ok, "problems": [one line per bad shard]}``."""
    m = read_manifest(path)
    root = os.path.dirname(os.path.abspath(manifest_path_for(path)))
    problems = []
    for s in m["shards"]:
        p = os.path.join(root, s["name"])
        if not os.path.isfile(p):
            problems.append(f"{s['name']}: missing")
            continue
        if os.path.getsize(p) != s["bytes"]:
            problems.append(f"{s['name']}: {os.path.getsize(p)} bytes, manifest says {s['bytes']}")
            continue
        with open(p, "rb") as fh:
            if hashlib.file_digest(fh, "sha256").hexdigest() != s["sha256"]:
                problems.append(f"{s['name']}: SHA-256 differs from the manifest")
    return {"shards": len(m["shards"]), "ok": len(m["shards"]) - len(problems), "problems": problems}


# --------------------------------------------------------------------------- first-use cache

def _source_fingerprint(kind: str, path: str) -> list:
    """What identifies a source's content cheaply: path plus sizes and mtimes (for a folder
    tree, of the root and every class subfolder, which change when files come or go)."""
    if kind in BUILTIN_IMAGE_SETS:
        return [kind]
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise DataError(f"data.path '{path}' does not exist")
    st = os.stat(path)
    fp: list = [kind, path, st.st_size, st.st_mtime_ns]
    if os.path.isdir(path):
        for e in sorted(os.scandir(path), key=lambda e: e.name):
            if e.is_dir():
                fp += [e.name, e.stat().st_mtime_ns]
    return fp


def cache_key(kind: str, path: str, split: str, resolution: int) -> str:
    """Folder name under ``<cache_dir>/shards/`` for a converted source."""
    blob = json.dumps([_source_fingerprint(kind, path), split, resolution, MANIFEST_VERSION], sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    base = kind if kind in BUILTIN_IMAGE_SETS else f"{kind}-{os.path.basename(os.path.abspath(path)) or 'root'}"
    return f"{base}-{split or 'all'}-r{resolution}-{digest}"


def cached_shards(kind: str, path: str, cache_dir: str, *, split: str = "train", resolution: int = 0,
                  shard_size: int = 5000, processes: int = 0, progress: bool = False,
                  log: Any = None) -> str:
    """The shard folder for a source, converted into ``<cache_dir>/shards/`` on first use.

    Safe against concurrent ranks (a file lock: the first converts, the rest wait and reuse) and
    against interruption (the writer renames a finished temporary folder into place; stale
    temporary folders of interrupted conversions are removed here, under the lock).
    """
    root = os.path.join(os.path.abspath(cache_dir), "shards")
    os.makedirs(root, exist_ok=True)
    key = cache_key(kind, path, split, resolution)
    out = os.path.join(root, key)
    if os.path.isfile(os.path.join(out, MANIFEST_NAME)):
        return out
    # An exclusive lock: ranks on one machine convert a source once, the others wait and reuse.
    with FileLock(os.path.join(root, f".{key}.lock")):
        if os.path.isfile(os.path.join(out, MANIFEST_NAME)):
            return out  # another rank finished it while we waited
        for name in os.listdir(root):
            if name.startswith(f".{key}.tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        if os.path.isdir(out):  # a folder without a manifest can only be debris: replace it
            shutil.rmtree(out)
        t0 = time.perf_counter()
        src = load_source(kind, path, split)
        n_shards = -(-len(src) // shard_size)
        write_shards(src, out, resolution=resolution, shard_size=shard_size,
                     processes=min(processes or default_processes(), n_shards), progress=progress)
        if log is not None:
            log(f"converted {kind} ({len(src)} images) into shards at {out} in {time.perf_counter() - t0:.1f} s")
    return out
