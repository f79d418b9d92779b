"""Re-split per-rank replay-buffer states when a run resumes on a different number of ranks."""
from __future__ import annotations

import numpy as np


def reshard_buffer_states(states: list[dict], world: int, rank: int) -> dict:
    """The :class:`~ebmscale.buffer.replay.ReplayBuffer` state of new rank ``rank`` of ``world``
    from the saved states of all old ranks (in rank order).

    Every saved chain is kept and none is invented: the old shards are concatenated in rank order
    and dealt out round-robin (chain ``i`` goes to new rank ``i mod world``). Class-partitioned
    buffers are dealt per class, so every new rank holds chains of every class. A new rank's
    buffer therefore holds ``total / world`` chains (±1), which may differ from
    ``buffer.capacity``; the buffer's own RNG state is taken from old rank ``rank mod old_world``.
    """
    if not states:
        raise ValueError("no buffer states to re-shard")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    first = states[0]
    for s in states[1:]:
        for key in ("storage", "num_classes"):
            if s[key] != first[key]:
                raise ValueError(f"buffer shards disagree on {key}: {first[key]!r} vs {s[key]!r}")
    data = np.concatenate([np.asarray(s["data"]) for s in states])
    labels = None if first.get("labels") is None else np.concatenate([np.asarray(s["labels"]) for s in states])
    if labels is None:
        idx = np.arange(len(data))[rank::world]
    else:
        parts = []
        for c in np.unique(labels):
            slots = np.flatnonzero(labels == c)
            if len(slots) < world:
                raise ValueError(f"class {int(c)} has {len(slots)} buffer chains, fewer than the {world} new ranks")
            parts.append(slots[rank::world])
        idx = np.sort(np.concatenate(parts))
    if len(idx) == 0:
        raise ValueError(f"{len(data)} buffer chains cannot be split across {world} ranks")
    out = dict(first)
    out.update(data=data[idx].copy(), labels=None if labels is None else labels[idx].copy(),
               rng=states[rank % len(states)]["rng"])
    return out
