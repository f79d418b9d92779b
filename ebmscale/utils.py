"""Small helpers every layer may use (NumPy only, no torch: the Ray buffer actors import them too):
atomic file writes, even splits of N items over P parts, seeds hashed from integers."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """A temporary path beside ``path`` to write to (``suffix`` for writers that insist on an
    extension, e.g. ``np.savez``). On success it is fsynced and renamed over ``path``, so a reader
    sees the old file or the whole new one, never a part; on failure it is removed."""
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def even_share(n: int, parts: int, i: int) -> tuple[int, int]:
    """``(start, count)`` of part ``i`` when ``n`` items are cut into ``parts`` contiguous parts
    as evenly as possible, the first ``n % parts`` parts one longer; the parts tile [0, n)."""
    q, r = divmod(int(n), int(parts))
    return i * q + min(i, r), q + (1 if i < r else 0)


def hash_seed(*parts: int) -> int:
    """An unsigned 64-bit seed hashed from non-negative integers by NumPy's SeedSequence:
    independent, well-mixed streams for nearby inputs. (Its low and high 32-bit halves are
    ``SeedSequence(parts).generate_state(2, np.uint32)``.)"""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])
