"""What a shard folder holds: ``manifest.json`` (written by :mod:`ebmscale.data.writer`), its
checks, and the resolution of a shard path or pattern into the :class:`ShardSet` a stream reads.

The manifest records the sample count, shape, classes, per-shard counts, sizes and SHA-256
checksums. The stream needs the per-shard counts to split every epoch exactly across ranks and
workers; the sizes let a missing or truncated local shard fail at start.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Sequence

from ebmscale.data.builtin import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ebmscale-shards"
MANIFEST_VERSION = 1
SHARD_NAME = "shard-{:06d}.tar"


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


# --------------------------------------------------------------------------- shard sets

@dataclass(frozen=True)
class Segment:
    """Samples ``begin`` to ``end - 1`` (positions in tar order) of the shard at ``url``."""

    url: str
    begin: int
    end: int

    def __len__(self) -> int:
        return self.end - self.begin


@dataclass
class ShardSet:
    """The shards a stream reads, with what the manifest says about them."""

    manifest_path: str
    segments: list[Segment]        # the training samples, manifest order
    heldout: list[Segment]         # the last ``holdout`` samples (validation)
    shape: tuple[int, int, int]    # (C, H, W)
    num_classes: int
    classes: list[str]
    fingerprint: str               # identifies the shards' content (from their checksums)

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self.segments)


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_pattern(pattern: str) -> list[str]:
    """Shard URLs of a pattern with brace ranges (``shard-{000000..000099}.tar``) and, for local
    paths, glob wildcards. Remote URLs (``pipe:``, ``s3://``...) are only brace-expanded."""
    import braceexpand

    out: list[str] = []
    for p in braceexpand.braceexpand(pattern):
        if _is_remote(p):
            out.append(p)
        elif any(ch in p for ch in "*?["):
            out += sorted(glob.glob(p))
        elif os.path.isfile(p):
            out.append(p)
    return list(dict.fromkeys(out))


def _manifest_entry(url: str, by_name: dict[str, dict]) -> dict | None:
    """The manifest entry of a shard URL: by file name, or for a remote URL such as
    ``pipe:aws s3 cp s3://b/shard-000001.tar -`` by the shard name it contains."""
    name = os.path.basename(url)
    if name in by_name or not _is_remote(url):
        return by_name.get(name)
    hits = [n for n in by_name if n in url]
    return by_name[max(hits, key=len)] if hits else None


def _check_local_shard(url: str, entry: dict) -> None:
    """A local shard must exist and have its recorded size: a missing or truncated file fails at
    start (damage that keeps the size -- or a remote shard -- is found, skipped and counted mid-run)."""
    if _is_remote(url):
        return
    path = url[len("file:"):] if url.startswith("file:") else url
    if not os.path.isfile(path):
        raise DataError(f"shard '{path}' listed in the manifest does not exist")
    size = os.path.getsize(path)
    if "bytes" in entry and size != entry["bytes"]:
        raise DataError(f"shard '{path}' is {size} bytes, its manifest says {entry['bytes']}: a partial copy? "
                        f"(`ebmscale data shards verify -i <folder>` checks all checksums)")


def open_shard_set(path: str, manifest: str = "", holdout: int = 0) -> ShardSet:
    """Resolve ``path`` -- a shard folder, its ``manifest.json``, or a shard pattern (brace ranges,
    globs; remote URLs with ``manifest`` given) -- into a :class:`ShardSet`. Fails at start, with
    one line, on a pattern that matches nothing, a missing manifest, a shard the manifest does not
    list, a missing or wrongly sized local shard, or a holdout as large as the data."""
    if not path:
        raise DataError("no shard path given (data.path)")
    if os.path.isdir(path) or (path.endswith(".json") and os.path.isfile(path)):
        mpath = manifest or manifest_path_for(path)
        m = read_manifest(mpath)
        root = os.path.dirname(os.path.abspath(mpath))
        pairs = [(os.path.join(root, e["name"]), e) for e in m["shards"]]
    else:
        matched = expand_pattern(path)
        if not matched:
            raise DataError(f"shard pattern '{path}' matches no files")
        if manifest:
            mpath = manifest
        elif _is_remote(matched[0]):
            raise DataError(f"remote shards '{path}' need data.manifest: the manifest.json written with them")
        else:
            mpath = os.path.join(os.path.dirname(matched[0]), MANIFEST_NAME)
        m = read_manifest(mpath)
        by_name = {e["name"]: e for e in m["shards"]}
        found: dict[str, str] = {}
        for url in matched:
            entry = _manifest_entry(url, by_name)
            if entry is None:
                raise DataError(f"shard '{url}' is not listed in manifest '{mpath}'")
            found[entry["name"]] = url
        # Manifest order, whatever order the pattern lists them in.
        pairs = [(found[e["name"]], e) for e in m["shards"] if e["name"] in found]
    for url, entry in pairs:
        _check_local_shard(url, entry)
    shape = tuple(int(v) for v in m["shape"])
    if len(shape) != 3:
        raise DataError(f"manifest '{mpath}' has shape {m['shape']}, expected [C, H, W]")
    segments = [Segment(url, 0, int(e["count"])) for url, e in pairs if int(e["count"]) > 0]
    total = sum(len(seg) for seg in segments)
    if holdout < 0 or holdout >= total:
        raise DataError(f"data.holdout={holdout} must be less than the {total} samples of '{path}'")
    train = take_range(segments, 0, total - holdout)
    heldout = take_range(segments, total - holdout, total)
    # Identifies the data for resume checks: the shards' names, counts and checksums, and the holdout.
    digest = hashlib.sha256("\n".join(f"{e['name']} {e['count']} {e.get('sha256', '')}"
                                       for _, e in pairs).encode()).hexdigest()[:16]
    return ShardSet(mpath, train, heldout, shape, int(m.get("num_classes", 0)), list(m.get("classes", [])),
                    f"{digest}-h{holdout}")


def take_range(segments: Sequence[Segment], start: int, stop: int) -> list[Segment]:
    """The sub-segments covering samples ``[start, stop)`` of the concatenation of ``segments``."""
    out, pos = [], 0
    for s in segments:
        lo, hi = max(start, pos), min(stop, pos + len(s))
        if lo < hi:
            out.append(Segment(s.url, s.begin + lo - pos, s.begin + hi - pos))
        pos += len(s)
        if pos >= stop:
            break
    return out

