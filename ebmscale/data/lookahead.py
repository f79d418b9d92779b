"""One batch of lookahead over a training stream, so that the trainer can learn the next batch's
labels one step early (to prefetch its class-conditional buffer draw) without changing what the
stream yields or what a checkpoint records."""
from __future__ import annotations

from typing import Any

from ebmscale.data import Stream


class Lookahead:
    """Wraps a :class:`~ebmscale.data.Stream` (other attributes pass through) and is one.
    :meth:`peek` returns the next batch without consuming it; ``__next__`` then returns that same
    batch. :meth:`state_dict` is always the position of the next batch ``__next__`` will
    return, taken before a peeked batch was read, so a checkpoint written while a batch is pending
    resumes with that batch: the sequence of batches is the stream's, peeked or not."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self._pending: Any = None
        self._state: dict | None = None

    def peek(self) -> Any:
        if self._pending is None:
            self._state = self.stream.state_dict()
            self._pending = next(self.stream)
        return self._pending

    def __iter__(self) -> "Lookahead":
        return self

    def __next__(self) -> Any:
        if self._pending is not None:
            batch, self._pending, self._state = self._pending, None, None
            return batch
        return next(self.stream)

    def state_dict(self) -> dict:
        return self._state if self._pending is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._pending, self._state = None, None
        self.stream.load_state_dict(state)

    @property
    def skipped(self) -> int:
        return self.stream.skipped

    @property
    def worker_restarts(self) -> int:
        return self.stream.worker_restarts

    def __getattr__(self, name: str) -> Any:  # close, stats, shards, ...
        return getattr(self.stream, name)
