"""Image members of shards: encoding (PNG, JPEG, npy), the resize the converters apply, and
decoding a raw webdataset sample back to a uint8 image and label.

This module does not import torch: the shard writer's processes use it, and the loader workers'
decoding needs only NumPy and Pillow.
"""
from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np

from ebmscale.data.builtin import DataError

log = logging.getLogger(__name__)

SHARD_FORMATS = ("png", "jpg", "npy")
# The member extensions the reader takes as the image of a sample, in order of preference.
IMAGE_MEMBER_EXTS = ("png", "jpg", "jpeg", "npy", "ppm", "bmp", "webp")


# --------------------------------------------------------------------------- encoding

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


def prepare_array_image(a: np.ndarray, resolution: int) -> np.ndarray:
    """An HWC uint8 array image at ``resolution`` (unchanged when 0 or already that size)."""
    h, w, c = a.shape
    if not resolution or (h, w) == (resolution, resolution):
        return a
    from PIL import Image

    img = Image.fromarray(a[..., 0] if c == 1 else a)
    out = np.asarray(resize_center_crop(img, resolution))
    return out[..., None] if out.ndim == 2 else out


def load_file_image(path: str, resolution: int) -> np.ndarray:
    """Decode an image file as RGB, resized and centre-cropped to ``resolution``."""
    from PIL import Image

    with Image.open(path) as img:
        if img.format == "JPEG":
            # Let libjpeg decode at a reduced scale when the file is much larger than needed
            # (big speed-up for ImageNet at 32/64); the 2x margin keeps the antialiased resize's quality.
            img.draft("RGB", (2 * resolution, 2 * resolution))
        img = resize_center_crop(img.convert("RGB"), resolution)
        return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------- decoding

def decode_image_hwc(data: bytes, channels: int) -> np.ndarray:
    """uint8 (H, W, C) of an encoded image (PNG, JPEG, ... or a ``.npy`` uint8 array of shape
    (H, W, C) or (H, W)), C = 1 (grey) or 3 (RGB).

    Pillow, not torchvision's decoder: torchvision's is 1.2-2.5x faster per image but deprecated
    since 0.29, and importing torchvision costs 3-7 s in every process that decodes; Pillow also
    keeps JPEG pixels identical whichever process decodes them.
    """
    if data[:6] == b"\x93NUMPY":
        a = np.load(io.BytesIO(data), allow_pickle=False)
        if a.dtype != np.uint8 or a.ndim not in (2, 3):
            raise ValueError(f".npy member is {a.dtype} {a.shape}, not uint8 (H, W[, C])")
        return a[..., None] if a.ndim == 2 else a
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data)) as img:
        a = np.asarray(img if img.mode == mode else img.convert(mode))
    return a[..., None] if a.ndim == 2 else a


def decode_sample(sample: dict, shape: tuple[int, int, int], num_classes: int) -> tuple[np.ndarray, int] | None:
    """(uint8 HWC image, label or -1) of a raw sample, or None when it is unusable: no image,
    undecodable, not of ``shape`` (C, H, W), or (labelled sets) a missing or out-of-range label."""
    data = next((sample[e] for e in IMAGE_MEMBER_EXTS if e in sample), None)
    if data is None:
        log.warning("sample %s in %s has no image", sample.get("__key__"), sample.get("__url__"))
        return None
    try:
        img = decode_image_hwc(data, shape[0])
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad image
        log.warning("undecodable image %s in %s: %s", sample.get("__key__"), sample.get("__url__"), exc)
        return None
    if img.shape != (shape[1], shape[2], shape[0]):
        log.warning("image %s in %s is %dx%d, the manifest says %dx%d", sample.get("__key__"),
                    sample.get("__url__"), img.shape[0], img.shape[1], shape[1], shape[2])
        return None
    label = -1
    if num_classes:
        try:
            label = int(sample["cls"])
        except (KeyError, ValueError):
            log.warning("sample %s in %s has no valid label", sample.get("__key__"), sample.get("__url__"))
            return None
        if not 0 <= label < num_classes:
            log.warning("sample %s in %s has label %d outside 0..%d", sample.get("__key__"), sample.get("__url__"),
                        label, num_classes - 1)
            return None
    return img, label

