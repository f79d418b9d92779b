"""The replay buffer of persistent Langevin chains, as a plain NumPy class.

No torch and no Ray here, so the same class can be unit-tested alone and hosted unchanged inside
Ray actors (which then need not import torch). The trainer converts to and from tensors.
"""
from __future__ import annotations

import numpy as np

from ebmscale.buffer import health

STORAGE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "uint8": np.uint8}


def encode(x: np.ndarray, storage: str, bounds: tuple[float, float]) -> np.ndarray:
    """Chains (float) -> the storage dtype. 'uint8' quantises ``bounds`` to 256 levels (IGEBM);
    an array already in uint8 is taken as encoded, so a caller may encode before sending."""
    lo, hi = bounds
    if storage == "uint8":
        if x.dtype == np.uint8:
            return x
        y = np.clip(x, lo, hi)  # one temporary, then in place: the same numbers as the plain expression
        y -= lo
        y *= 255.0 / (hi - lo)
        return np.rint(y, out=y).astype(np.uint8)
    return x.astype(STORAGE_DTYPES[storage], copy=False)


def decode(q: np.ndarray, storage: str, bounds: tuple[float, float], out: np.ndarray | None = None) -> np.ndarray:
    """Stored chains -> float32 (the inverse of :func:`encode` up to quantisation); into ``out``
    (float32, q's shape) when given, with the same numbers."""
    lo, hi = bounds
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    if storage == "uint8":
        np.multiply(q, np.float32((hi - lo) / 255.0), out=out, dtype=np.float32)
        np.add(out, np.float32(lo), out=out)
    else:
        np.copyto(out, q, casting="same_kind")
    return out


def starts_from_encoded(q: np.ndarray, reinit: np.ndarray, noise: np.ndarray, storage: str,
                        bounds: tuple[float, float], reuse: bool = False) -> np.ndarray:
    """Chain starts (float32) from an encoded draw: the stored chains decoded, with the
    re-initialised positions replaced by their noise (see :meth:`ReplayBuffer.sample_encoded`).
    ``reuse``: ``q`` is the caller's to overwrite, so float32 chains become the starts in place."""
    x = q if reuse and q.dtype == np.float32 and q.flags.writeable else decode(q, storage, bounds)
    if len(noise):
        x[reinit] = noise
    return x


class ReplayBuffer:
    """A fixed-capacity store of chain states, pre-filled with uniform noise over ``bounds``.

    * ``sample(n)`` draws slots uniformly; each start is independently replaced by fresh uniform
      noise with probability ``reinit_prob`` (IGEBM/JEM: 5%). Returns the slot indices so the
      caller can write the evolved chains back to the same slots (``write``).
    * Class-conditional chains (``num_classes`` > 0): the capacity is split into equal per-class
      parts (JEM's partition) and every slot carries its label; ``sample(n, labels=y)`` draws,
      for each requested label, a slot from that label's part. Unlabelled draws return the slot
      labels alongside.
    * ``storage``: 'fp32', 'fp16', or 'uint8' (IGEBM: the data range quantised to 256 levels).
    * ``state_dict()`` holds contents, labels, chain ages and the RNG state, so a resumed run draws
      exactly what an uninterrupted one would.
    * health: ``age`` counts the sampler steps each slot's chain has run since it was last noise
      (``write(..., reinit, steps)``), and ``health()`` returns the counts of
      :mod:`ebmscale.buffer.health`.
    """

    def __init__(self, capacity: int, shape: tuple[int, ...], bounds: tuple[float, float] = (0.0, 1.0),
                 reinit_prob: float = 0.05, storage: str = "fp32", num_classes: int = 0, seed: int = 0):
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"unknown buffer storage '{storage}' (known: {', '.join(STORAGE_DTYPES)})")
        if num_classes and capacity < num_classes:
            raise ValueError(f"buffer capacity {capacity} is smaller than num_classes {num_classes}")
        self.capacity, self.shape = int(capacity), tuple(int(s) for s in shape)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.reinit_prob, self.storage, self.num_classes = float(reinit_prob), storage, int(num_classes)
        self.rng = np.random.default_rng(seed)
        if self.num_classes:
            # Equal parts per class (the remainder slots go to the first classes).
            self.labels = (np.arange(self.capacity) % self.num_classes).astype(np.int64)
            self._slots_of = [np.flatnonzero(self.labels == c) for c in range(self.num_classes)]
        else:
            self.labels = None
        self.data = self._encode(self.noise(self.capacity, self.rng))
        self.age = np.zeros(self.capacity, dtype=np.int64)
        self.starts = self.reinits = 0  # chains written back / of them restarted from noise, since health()

    # ------------------------------------------------------------------ encoding
    def _encode(self, x: np.ndarray) -> np.ndarray:
        return encode(x, self.storage, self.bounds)

    def _decode(self, q: np.ndarray) -> np.ndarray:
        return decode(q, self.storage, self.bounds)

    def noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.bounds
        return (rng.random((n, *self.shape), dtype=np.float32) * (hi - lo) + lo).astype(np.float32)

    # ------------------------------------------------------------------ draw / write back
    def sample(self, n: int, labels: np.ndarray | None = None, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """Draw ``n`` chain starts: ``(x float32 [n, *shape], slot indices, labels or None,
        reinit mask)``. Re-initialised starts still own their slot, so the write-back replaces
        that slot's chain with the new one."""
        q, idx, out_labels, reinit, noise = self.sample_encoded(n, labels, rng)
        return starts_from_encoded(q, reinit, noise, self.storage, self.bounds), idx, out_labels, reinit

    def sample_encoded(self, n: int, labels: np.ndarray | None = None, rng: np.random.Generator | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """:meth:`sample` before decoding, for a host that sends the draw elsewhere (the Ray shards):
        ``(stored chains in the storage dtype, slot indices, labels or None, reinit mask, float32
        noise for the re-initialised starts)``; :func:`starts_from_encoded` turns it into exactly
        what :meth:`sample` returns. uint8 storage thus crosses the wire at a quarter of float32."""
        idx, reinit, noise = self._pick(n, labels, self.rng if rng is None else rng)
        out_labels = None if self.labels is None else self.labels[idx].copy()
        return self.data[idx], idx, out_labels, reinit, noise

    def sample_into(self, out: np.ndarray, n: int, labels: np.ndarray | None = None,
                    rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`sample` written into ``out`` (float32, ``[n, *shape]``, e.g. shared memory):
        the same starts from the same ``rng``, without an intermediate array. Returns (slot
        indices, reinit mask)."""
        idx, reinit, noise = self._pick(n, labels, self.rng if rng is None else rng)
        if self.storage == "fp32":
            np.take(self.data, idx, axis=0, out=out, mode="clip")  # valid slots; "raise" would buffer `out`
        else:
            decode(self.data[idx], self.storage, self.bounds, out=out)
        if len(noise):
            out[reinit] = noise
        return idx, reinit

    def _pick(self, n: int, labels: np.ndarray | None, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A draw's slots, reinit mask and fresh noise, from ``rng`` in a fixed order."""
        if labels is not None:
            idx = self._slots_for(labels, lambda slots, k: slots[rng.integers(0, len(slots), size=k)])
        else:
            idx = rng.integers(0, self.capacity, size=n).astype(np.int64)
        reinit = rng.random(len(idx)) < self.reinit_prob
        # Fresh starts are float noise, never quantised (the same numbers as a local draw).
        noise = self.noise(int(reinit.sum()), rng) if reinit.any() else np.empty((0, *self.shape), np.float32)
        return idx, reinit, noise

    def peek(self, n: int, rng: np.random.Generator, labels: np.ndarray | None = None) -> np.ndarray:
        """``min(n, capacity)`` stored chains (distinct slots, float32) without re-initialisation
        or any change of state: what evaluation samples from ("init from the buffer"). With
        ``labels``, one chain per label from that class's part (distinct slots while the part
        holds enough, then repeated ones), in the order of ``labels``."""
        if labels is None:
            idx = np.sort(rng.choice(self.capacity, size=min(int(n), self.capacity), replace=False))
            return self._decode(self.data[idx])
        idx = self._slots_for(labels, lambda slots, k: rng.choice(slots, size=k, replace=k > len(slots)))
        return self._decode(self.data[idx])

    def _slots_for(self, labels: np.ndarray, pick) -> np.ndarray:
        """One slot per label from that label's part of the buffer: ``pick(slots of the class,
        count)`` chooses them, class by class in increasing order (the order the RNG is used in)."""
        if not self.num_classes:
            raise ValueError("labels given to an unlabelled replay buffer")
        labels = np.asarray(labels, dtype=np.int64)
        idx = np.empty(len(labels), dtype=np.int64)
        for c in np.unique(labels):
            where = np.flatnonzero(labels == c)
            idx[where] = pick(self._slots_of[int(c)], len(where))
        return idx

    def write(self, idx: np.ndarray, x: np.ndarray, reinit: np.ndarray | None = None, steps: int = 0) -> None:
        """Store evolved chains back into their slots (float chains, or already :func:`encode`-d).
        ``reinit``: the draw's mask of starts that were fresh noise (their age restarts at 0);
        ``steps``: sampler steps the chains ran since the draw (added to their age)."""
        x = np.asarray(x)
        if x.dtype != np.uint8:
            x = x.astype(np.float32, copy=False)
        idx = np.asarray(idx, dtype=np.int64)
        self.data[idx] = self._encode(x)
        if reinit is not None and len(reinit):
            reinit = np.asarray(reinit, dtype=bool)
            self.age[idx[reinit]] = 0
            self.reinits += int(reinit.sum())
        self.age[idx] += int(steps)
        self.starts += len(idx)

    def health(self, subsample: int = health.DIVERSITY_SUBSAMPLE) -> dict:
        """Counts for :mod:`ebmscale.buffer.health` (age, restarts since the last call, diversity of
        a fixed subsample, per-class fill); resets the restart counters."""
        out = health.raw_stats(self.data, self.age, self.labels, self.num_classes, self.starts, self.reinits,
                               self._decode, subsample)
        self.starts = self.reinits = 0
        return out

    def __len__(self) -> int:
        return self.capacity

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Contents, labels, RNG state and settings (NumPy arrays and plain Python values)."""
        return {"data": self.data.copy(), "labels": None if self.labels is None else self.labels.copy(),
                "age": self.age.copy(), "rng": self.rng.bit_generator.state, "storage": self.storage,
                "bounds": list(self.bounds),
                "reinit_prob": self.reinit_prob, "num_classes": self.num_classes}

    def load_state_dict(self, state: dict) -> None:
        data = np.asarray(state["data"])
        if data.shape[1:] != self.shape:
            raise ValueError(f"buffer state holds chains of shape {data.shape[1:]}, expected {self.shape}")
        if state["storage"] != self.storage:
            data = self._encode(decode(data, state["storage"], tuple(state["bounds"])))
        self.data = data.astype(STORAGE_DTYPES[self.storage], copy=True)
        self.capacity = len(self.data)
        # Checkpoints from before chain ages were kept: every chain counts as fresh.
        age = state.get("age")
        self.age = (np.asarray(age, dtype=np.int64).copy() if age is not None and len(age) == self.capacity
                    else np.zeros(self.capacity, dtype=np.int64))
        if state.get("labels") is not None:
            self.labels = np.asarray(state["labels"], dtype=np.int64).copy()
            self._slots_of = [np.flatnonzero(self.labels == c) for c in range(self.num_classes)]
        self.rng.bit_generator.state = state["rng"]
