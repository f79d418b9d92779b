"""An in-memory, endless, resumable batch stream over arrays (used for the 2-D toy sets, whose
training set is a fixed exact sample, and for small arrays in tests)."""
from __future__ import annotations

import numpy as np
import torch


class ArrayStream:
    """Endless shuffled batches from ``x`` (and optional labels ``y``) for one rank.

    Every epoch is a permutation drawn from ``(seed, epoch)`` -- identical on every rank -- and
    rank ``r`` of ``world`` takes the slice ``perm[r::world]``, so ranks see disjoint samples and
    together each sample once per epoch. ``state_dict`` records (epoch, position), so a resumed
    run continues the stream instead of replaying it.
    """

    def __init__(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | None, batch_size: int,
                 seed: int = 0, rank: int = 0, world: int = 1):
        self.x = torch.as_tensor(x)
        self.y = None if y is None else torch.as_tensor(y)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        if len(self.x) // world < batch_size:
            raise ValueError(f"dataset of {len(self.x)} samples is too small for {world} rank(s) x batch {batch_size}")
        self.epoch, self.position = 0, 0
        # The Stream protocol's counters: arrays in memory hold no unreadable samples, and no workers.
        self.skipped, self.worker_restarts = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        perm = rng.permutation(len(self.x))[self.rank::self.world]
        # Equal length on every rank, so all ranks agree on when an epoch ends.
        return torch.from_numpy(perm[: len(self.x) // self.world])

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.position + self.batch_size > len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.x[idx], (None if self.y is None else self.y[idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
