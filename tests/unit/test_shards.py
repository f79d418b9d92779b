"""Shard writers and converters: each source format, the manifest, the CLI, the first-use cache,
and the start-time failures of the shard stream (single process; the multi-rank, multi-worker
behaviour is in tests/distributed/test_stream_ranks.py)."""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ebmscale.config import ConfigError, load_config
from ebmscale.data.builtin import DataError, load_builtin
from ebmscale.data.images import build_image_stream, image_shape
from ebmscale.cli.data import add_shards_arguments, shards_command
from ebmscale.data.codec import encode_png_batch, resize_center_crop
from ebmscale.data.manifest import open_shard_set, read_manifest, verify_shards
from ebmscale.data.sources import load_source
from ebmscale.data.stream import ShardStream, read_samples
from ebmscale.data.writer import cache_key, cached_shards, write_shards


# --------------------------------------------------------------------------- fabricated sources

def make_folder(root, sizes=((10, 14), (14, 10), (8, 8)), per_class=(5, 4, 3), bad: bool = True) -> dict:
    """An ImageNet-style tree of uniform-colour images whose colour encodes (id, class);
    returns {id: class}. Uniform images stay exact through resize + centre crop."""
    ids = {}
    i = 0
    for label, (name, n) in enumerate(zip(("cat", "dog", "eel"), per_class)):
        os.makedirs(os.path.join(root, name, "sub"), exist_ok=True)
        for j in range(n):
            w, h = sizes[(i + j) % len(sizes)]
            a = np.zeros((h, w, 3), np.uint8)
            a[...] = (i, label, 200)
            ext = "png" if j % 2 == 0 else "bmp"  # lossless formats only: the colour is the identity
            where = os.path.join(root, name, "sub" if j == 0 else "", f"img{j}.{ext}")
            Image.fromarray(a).save(where)
            ids[i] = label
            i += 1
    if bad:
        with open(os.path.join(root, "dog", "broken.png"), "wb") as fh:
            fh.write(b"not an image at all")
    return ids


def make_cifar(path, kind: str = "cifar10", per_batch: int = 4, as_folder: bool = False) -> dict:
    """A CIFAR python-format archive (or its unpacked folder) with images whose first pixel
    encodes their id; returns {split: (images NHWC, labels)}."""
    rng = np.random.default_rng(3)
    top = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    files, out, next_id = {}, {"train": ([], []), "test": ([], [])}, 0
    names = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if kind == "cifar10" else ["train", "test"]
    for name in names:
        n = per_batch if kind == "cifar10" else per_batch * (5 if name == "train" else 1)
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        x[:, 0, 0, 0] = np.arange(next_id, next_id + n)
        next_id += n
        y = rng.integers(0, 10 if kind == "cifar10" else 100, n)
        d = {b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072), b"batch_label": name.encode()}
        if kind == "cifar10":
            d[b"labels"] = y.tolist()
        else:
            d[b"fine_labels"], d[b"coarse_labels"] = y.tolist(), (y // 5).tolist()
        files[name] = pickle.dumps(d, protocol=2)
        split = "test" if "test" in name else "train"
        out[split][0].append(x)
        out[split][1].append(y)
    if kind == "cifar10":
        files["batches.meta"] = pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol=2)
    else:
        files["meta"] = pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                      b"coarse_label_names": [f"k{i}".encode() for i in range(20)]}, protocol=2)
    if as_folder:
        os.makedirs(os.path.join(path, top))
        for name, blob in files.items():
            with open(os.path.join(path, top, name), "wb") as fh:
                fh.write(blob)
    else:
        with tarfile.open(path, "w:gz") as tar:
            for name, blob in files.items():
                ti = tarfile.TarInfo(f"{top}/{name}")
                ti.size = len(blob)
                tar.addfile(ti, io.BytesIO(blob))
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in out.items()}


def read_back(out_dir) -> tuple[list[np.ndarray], list[int]]:
    """All samples of a shard folder in file order, as HWC arrays and labels."""
    s = open_shard_set(str(out_dir))
    pairs = list(read_samples(s.segments, s.shape, s.num_classes))
    return [p[0].permute(1, 2, 0).numpy() for p in pairs], [p[1] for p in pairs]


def by_first_pixel(images, labels) -> dict[int, tuple[bytes, int]]:
    return {int(a[0, 0, 0]): (a.tobytes(), int(y)) for a, y in zip(images, labels)}


# --------------------------------------------------------------------------- encoders

def test_png_encoder_is_lossless_for_grey_and_rgb():
    rng = np.random.default_rng(0)
    for shape in ((3, 9, 7, 1), (3, 5, 11, 3)):
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        for a, png in zip(x, encode_png_batch(x)):
            decoded = np.asarray(Image.open(io.BytesIO(png)))
            assert np.array_equal(decoded.reshape(a.shape), a)


def test_resize_center_crop_keeps_the_centre():
    wide = np.zeros((8, 24, 3), np.uint8)
    wide[:, 8:16] = (0, 255, 0)          # the middle third is green, the sides black
    tall = wide.transpose(1, 0, 2).copy()
    for a in (wide, tall):
        out = np.asarray(resize_center_crop(Image.fromarray(a), 4))
        assert out.shape == (4, 4, 3)
        assert out[..., 1].min() >= 200 and out[..., 0].max() == 0  # a side crop would be mostly black
    up = np.asarray(resize_center_crop(Image.fromarray(wide[:, 8:16]), 16))
    assert up.shape == (16, 16, 3)


# --------------------------------------------------------------------------- sources

def test_folder_tree_to_shards(tmp_path):
    ids = make_folder(tmp_path / "tree")
    m = write_shards(load_source("folder", str(tmp_path / "tree")), str(tmp_path / "out"), resolution=8,
                     shard_size=5, processes=2)
    assert m["num_samples"] == len(ids) == 12 and m["skipped_sources"] == 1
    assert "broken.png" in m["_summary"]["skipped_examples"][0]
    assert m["classes"] == ["cat", "dog", "eel"] and m["num_classes"] == 3 and m["shape"] == [3, 8, 8]
    # 13 files in slots of 5: the unreadable one leaves its shard one short.
    assert len(m["shards"]) == 3 and sum(s["count"] for s in m["shards"]) == 12
    images, labels = read_back(tmp_path / "out")
    assert sorted(int(a[0, 0, 0]) for a in images) == sorted(ids)
    for a, y in zip(images, labels):
        assert (a == a[0, 0]).all(), "a uniform image stays uniform through resize + crop"
        assert a[0, 0, 1] == y == ids[int(a[0, 0, 0])]
    assert verify_shards(str(tmp_path / "out"))["problems"] == []
    on_disk = json.load(open(tmp_path / "out" / "manifest.json"))
    assert on_disk["shards"] == m["shards"] and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_folder_needs_images(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no class subfolders holding images"):
        load_source("folder", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        load_source("folder", str(tmp_path / "nope"))


@pytest.mark.parametrize("as_folder", [False, True])
def test_cifar10_archive(tmp_path, as_folder):
    where = tmp_path / ("unpacked" if as_folder else "cifar-10-python.tar.gz")
    truth = make_cifar(str(where), "cifar10", as_folder=as_folder)
    for split in ("train", "test"):
        out = tmp_path / f"out-{split}"
        m = write_shards(load_source("cifar10", str(where), split), str(out), shard_size=7)
        assert m["num_samples"] == len(truth[split][0]) and m["shape"] == [3, 32, 32]
        assert m["classes"] == [f"c{i}" for i in range(10)]
        got = by_first_pixel(*read_back(out))
        assert got == by_first_pixel(*truth[split]), "pixels (plane order) and labels survive exactly"


def test_cifar100_archive_fine_and_coarse(tmp_path):
    truth = make_cifar(str(tmp_path / "c100.tar.gz"), "cifar100")
    fine = load_source("cifar100", str(tmp_path / "c100.tar.gz"), "train")
    coarse = load_source("cifar100", str(tmp_path / "c100.tar.gz"), "train", cifar100_labels="coarse")
    assert np.array_equal(fine.labels, truth["train"][1]) and np.array_equal(coarse.labels, truth["train"][1] // 5)
    assert len(fine.class_names) == 100 and len(coarse.class_names) == 20
    m = write_shards(coarse, str(tmp_path / "out"), resolution=16)
    assert m["shape"] == [3, 16, 16] and m["num_classes"] == 20
    with pytest.raises(DataError, match="not a cifar10 python archive"):
        load_source("cifar10", str(tmp_path / "c100.tar.gz"))
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="not a readable tar.gz"):
        load_source("cifar10", str(tmp_path / "junk.tar.gz"))


def test_npz_layouts_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)
    y = np.arange(6) % 3
    cases = {"nhwc": dict(x=x, y=y), "nchw": dict(images=x.transpose(0, 3, 1, 2), labels=y),
             "float": dict(data=x / 255.0)}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        src = load_source("npz", str(tmp_path / f"{name}.npz"))
        assert np.array_equal(src.images, x) and src.shape == (3, 5, 4), name
        assert (src.labels is None) == (name == "float")
    np.savez(tmp_path / "grey.npz", x=x[..., 0])
    assert load_source("npz", str(tmp_path / "grey.npz")).images.shape == (6, 5, 4, 1)
    m = write_shards(load_source("npz", str(tmp_path / "nhwc.npz")), str(tmp_path / "out"))
    assert m["num_classes"] == 3 and m["shape"] == [3, 5, 4]
    images, labels = read_back(tmp_path / "out")
    assert sorted(a.tobytes() for a in images) == sorted(a.tobytes() for a in x)
    bad = {"range": dict(x=x * 2.0), "shape": dict(x=np.zeros((4, 7, 7, 5), np.uint8)),
           "labels": dict(x=x, y=y[:3]), "nokey": dict(weights=x)}
    for name, arrays in bad.items():
        np.savez(tmp_path / f"bad-{name}.npz", **arrays)
        with pytest.raises(DataError, match="bad-" + name):
            load_source("npz", str(tmp_path / f"bad-{name}.npz"))


def test_builtin_digits_is_deterministic_across_process_counts(tmp_path):
    a = write_shards(load_source("digits"), str(tmp_path / "a"), shard_size=400, processes=1)
    b = write_shards(load_source("digits"), str(tmp_path / "b"), shard_size=400, processes=2)
    assert a["shards"] == b["shards"], "same bytes (checksums) whatever the number of writers"
    x, y = load_builtin("digits", "train")
    images, labels = read_back(tmp_path / "a")
    assert sorted(zip((i.tobytes() for i in images), labels)) == sorted(zip((i.tobytes() for i in x), y.tolist()))


# --------------------------------------------------------------------------- command line

def _cli(*argv: str) -> dict:
    p = argparse.ArgumentParser()
    add_shards_arguments(p)
    return shards_command(p.parse_args(list(argv)))


def test_cli_writes_verifies_and_refuses_to_clobber(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 4, 4), np.uint8), y=np.arange(10))
    out = str(tmp_path / "out")
    s = _cli("npz", "-i", str(tmp_path / "d.npz"), "-o", out, "--shard-size", "4", "--no-progress")
    assert (s["samples"], s["shards"], s["shape"], s["classes"]) == (10, 3, [1, 4, 4], 10)
    json.dumps(s)
    with pytest.raises(DataError, match="not empty"):
        _cli("npz", "-i", str(tmp_path / "d.npz"), "-o", out)
    again = _cli("npz", "-i", str(tmp_path / "d.npz"), "-o", out, "--overwrite", "--no-progress", "--shard-size", "4")
    assert again["samples"] == 10
    assert _cli("verify", "-i", out)["ok"] == 3
    with open(os.path.join(out, "shard-000001.tar"), "r+b") as fh:
        fh.seek(600)
        fh.write(b"\xff")
    with pytest.raises(DataError, match="shard-000001.tar: SHA-256"):
        _cli("verify", "-i", out)
    with pytest.raises(DataError, match="does not exist"):
        _cli("npz", "-i", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "o2"))
    with pytest.raises(DataError, match="--resolution is required"):
        _cli("folder", "-i", str(tmp_path), "-o", str(tmp_path / "o3"))


# --------------------------------------------------------------------------- first-use cache

def test_first_use_cache_is_atomic_and_reused(tmp_path, monkeypatch):
    import ebmscale.data.writer as writer

    cache = str(tmp_path / "cache")
    real = writer._write_shard
    calls = {"n": 0}

    def dies_on_second_shard(task):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # an interrupted conversion
        return real(task)

    monkeypatch.setattr(writer, "_write_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        cached_shards("digits", "", cache, shard_size=500, processes=1)
    assert [n for n in os.listdir(os.path.join(cache, "shards")) if not n.endswith(".lock")] == []
    monkeypatch.setattr(writer, "_write_shard", real)
    debris = os.path.join(cache, "shards", f".{cache_key('digits', '', 'train', 0)}.tmp-1-2")
    os.makedirs(debris)  # what a killed run leaves behind
    first = cached_shards("digits", "", cache, shard_size=500, processes=1)
    assert not os.path.exists(debris)
    stamp = os.path.getmtime(os.path.join(first, "manifest.json"))
    assert cached_shards("digits", "", cache, shard_size=500, processes=1) == first
    assert os.path.getmtime(os.path.join(first, "manifest.json")) == stamp
    assert read_manifest(first)["num_samples"] == len(load_builtin("digits")[0])


def test_config_builds_the_stream_through_the_cache(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (40, 4, 4), dtype=np.uint8)
    x[:, 0, 0] = np.arange(40)  # all distinct
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 4)
    cfg = load_config(None, ["data.dataset=npz", f"data.path={tmp_path / 'd.npz'}", f"data.cache_dir={tmp_path / 'c'}",
                             "data.batch_size=8", "data.holdout=8"])
    assert image_shape(cfg) == (1, 4, 4)
    stream = build_image_stream(cfg, 0, 1)
    assert stream.shards.num_samples == 32 and len(stream.shards.heldout) >= 1
    seen = torch.cat([next(stream)[0] for _ in range(4)])
    assert seen.shape == (32, 1, 4, 4) and seen.dtype == torch.uint8
    assert len({bytes(v.numpy().tobytes()) for v in seen}) == 32, "one epoch: the 32 training samples once each"
    held = {bytes(x.numpy().tobytes()) for x, _ in read_samples(stream.shards.heldout, (1, 4, 4), 4)}
    assert len(held) == 8 and not held & {bytes(v.numpy().tobytes()) for v in seen}
    cfg16 = load_config(None, ["data.dataset=npz", f"data.path={tmp_path / 'd.npz'}", "data.resolution=8"])
    assert image_shape(cfg16) == (1, 8, 8)


# --------------------------------------------------------------------------- start-time failures

def test_bad_shard_paths_and_resolution_fail_at_start(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((12, 6, 6, 3), np.uint8))
    write_shards(load_source("npz", str(tmp_path / "d.npz")), str(tmp_path / "s"), shard_size=5)
    pattern = str(tmp_path / "s" / "nothing-{000..009}.tar")
    with pytest.raises(DataError, match="shard pattern '.*nothing-\\{000..009\\}.tar' matches no files"):
        open_shard_set(pattern)
    assert open_shard_set(str(tmp_path / "s" / "shard-{000000..000001}.tar")).num_samples == 10
    assert open_shard_set(str(tmp_path / "s" / "*.tar")).num_samples == 12
    cfg = load_config(None, ["data.dataset=shards", f"data.path={tmp_path / 's'}", "data.resolution=32"])
    with pytest.raises(DataError, match="6x6 images but data.resolution is 32"):
        image_shape(cfg)
    with pytest.raises(DataError, match="holdout=12 must be less than the 12 samples"):
        open_shard_set(str(tmp_path / "s"), holdout=12)
    os.rename(tmp_path / "s" / "manifest.json", tmp_path / "m.json")
    with pytest.raises(DataError, match="manifest.json' does not exist"):
        open_shard_set(str(tmp_path / "s" / "*.tar"))
    assert open_shard_set(str(tmp_path / "s" / "*.tar"), manifest=str(tmp_path / "m.json")).num_samples == 12
    with pytest.raises(DataError, match="fewer than the 13 ranks"):
        ShardStream(open_shard_set(str(tmp_path / "s" / "*.tar"), manifest=str(tmp_path / "m.json")), 4, world=13)
    (tmp_path / "s" / "extra.tar").write_bytes(b"")
    with pytest.raises(DataError, match="extra.tar' is not listed in manifest"):
        open_shard_set(str(tmp_path / "s" / "*.tar"), manifest=str(tmp_path / "m.json"))


def test_truncated_shard_fails_at_start_and_is_counted_when_read(tmp_path):
    from ebmscale.data.stream import _SegmentReader

    np.savez(tmp_path / "d.npz", x=np.zeros((14, 6, 6), np.uint8))
    write_shards(load_source("npz", str(tmp_path / "d.npz")), str(tmp_path / "s"), shard_size=7)
    tar = str(tmp_path / "s" / "shard-000001.tar")
    size = os.path.getsize(tar)
    with tarfile.open(tar) as t:
        sixth = [m for m in t.getmembers() if m.name.endswith(".png")][5]
    with open(tar, "r+b") as fh:
        fh.truncate(sixth.offset_data + 10)  # ends inside the sixth image
    cut = sixth.offset_data + 10
    with pytest.raises(DataError, match=f"shard-000001.tar' is {cut} bytes, its manifest says {size}"):
        open_shard_set(str(tmp_path / "s"))
    # Mid-run (e.g. a remote shard, which cannot be checked at start) the same damage is skipped and counted.
    from ebmscale.data.manifest import Segment

    reader = _SegmentReader()
    got = list(reader.samples([Segment(tar, 0, 7), Segment(tar, 2, 4)]))
    assert len(got) == 5 + 2 and reader.lost == 2
    os.remove(tar)
    with pytest.raises(DataError, match="shard-000001.tar' listed in the manifest does not exist"):
        open_shard_set(str(tmp_path / "s"))


def test_data_config_checks():
    with pytest.raises(ConfigError, match="data.resolution is required for dataset 'folder'"):
        load_config(None, ["data.dataset=folder", "data.path=x"])
    with pytest.raises(ConfigError, match="data.manifest is only read for dataset 'shards'"):
        load_config(None, ["data.manifest=m.json"])
    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        load_config(None, ["data.shuffle_buffer=-1"])


def test_tar_reader_matches_tarfile_on_other_writers(tmp_path):
    """The loader's tar reader against python's tarfile, on PAX/GNU/ustar archives (plain and
    gzipped, long names, directories) and webdataset's TarWriter."""
    import webdataset as wds

    from ebmscale.data.tar import iter_tar

    files = [("d/" * 60 + "long.png", b"x" * 700), ("k1.png", bytes(range(256)) * 3), ("k1.cls", b"3"),
             ("empty.txt", b""), ("\u00fc.cls", "\u00fcn".encode())]
    archives = []
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        for comp in ("", "gz"):
            path = str(tmp_path / f"t{fmt}.tar{'.gz' if comp else ''}")
            with tarfile.open(path, "w:" + comp, format=fmt) as t:
                d = tarfile.TarInfo("somedir")
                d.type = tarfile.DIRTYPE
                t.addfile(d)
                for name, blob in files:
                    if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                        continue
                    ti = tarfile.TarInfo(name)
                    ti.size, ti.mtime = len(blob), 1.5  # a float mtime: PAX headers in PAX format
                    t.addfile(ti, io.BytesIO(blob))
            archives.append(path)
    with wds.TarWriter(str(tmp_path / "wds.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"s{i}", "png": b"abc" * i, "cls": str(i)})
    archives.append(str(tmp_path / "wds.tar"))
    for path in archives:
        with tarfile.open(path) as t:
            want = [(m.name, t.extractfile(m).read()) for m in t if m.isreg()]
        errors: list = []
        with open(path, "rb") as fh:
            got = [(m["fname"], m["data"]) for m in iter_tar(fh, errors)]
        assert got == want and not errors, path


# --------------------------------------------------------------------------- member formats

@pytest.mark.parametrize("fmt, channels", [("jpg", 3), ("jpg", 1), ("npy", 3), ("png", 3)])
def test_jpeg_and_npy_shards_read_like_png(tmp_path, fmt, channels):
    rng = np.random.default_rng(0)
    # Smooth images (JPEG's case): a gradient plus a little noise, one per class.
    base = np.linspace(0, 255, 16)[None, :, None] * np.ones((12, 16, 16, channels)) * 0.8
    x = np.clip(base + rng.normal(0, 4, base.shape) + np.arange(12)[:, None, None, None] * 3, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x[..., 0] if channels == 1 else x, y=np.arange(12) % 3)
    out = str(tmp_path / "out")
    s = _cli("npz", "-i", str(tmp_path / "d.npz"), "-o", out, "--shard-size", "5", "--no-progress",
             "--no-shuffle", "--format", fmt, "--quality", "90")
    assert s["format"] == fmt and s["samples"] == 12
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["image_format"] == fmt and manifest.get("jpeg_quality") == (90 if fmt == "jpg" else None)
    with tarfile.open(os.path.join(out, "shard-000000.tar")) as tf:
        assert sorted({n.rsplit(".", 1)[1] for n in tf.getnames()}) == ["cls", fmt]
    ss = open_shard_set(out)
    got = list(read_samples(ss.segments, ss.shape, ss.num_classes))
    images = np.stack([img.numpy().transpose(1, 2, 0) for img, _ in got])
    assert [int(y) for _, y in got] == (np.arange(12) % 3).tolist()
    err = np.abs(images.astype(int) - x.astype(int))
    if fmt == "jpg":
        assert 0 < err.mean() < 6 and err.max() < 40  # lossy, close (it smooths the noise away)
    else:
        assert err.max() == 0  # lossless
    assert_stream = ShardStream(ss, 4)
    assert next(assert_stream)[0].shape == (4, channels, 16, 16)


@pytest.mark.parametrize("args, needle", [(["--format", "webp"], "unknown shard format 'webp'"),
                                          (["--format", "jpg", "--quality", "0"], "--quality"),
                                          (["--format", "jpg", "--quality", "101"], "--quality")])
def test_bad_shard_format_or_quality_is_one_line(tmp_path, cli_env, args, needle):
    from tests.conftest import run_cli

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4, 4), np.uint8))
    r = run_cli(["data", "shards", "npz", "-i", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"), *args],
                cli_env, tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_auto_num_workers_follow_the_cores_per_rank(monkeypatch):
    from ebmscale.data.images import resolve_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_num_workers(-1) == 3  # 4 cores per rank, one kept for the training process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_num_workers(-1) == 8 and resolve_num_workers(-1, max_workers=16) == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert resolve_num_workers(-1) == 1 and resolve_num_workers(0) == 0 and resolve_num_workers(5) == 5
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_config(None, ["data.num_workers=-2"])
