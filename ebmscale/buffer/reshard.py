"""Re-split per-rank replay-buffer states when a run resumes on a different number of ranks."""
from __future__ import annotations

from ebmscale.buffer.client import resplit_states, split_capacity


def reshard_buffer_states(states: list[dict], world: int, rank: int) -> dict:
    """The :class:`~ebmscale.buffer.replay.ReplayBuffer` state of new rank ``rank`` of ``world``
    from the saved states of all old ranks (in rank order).

    Every saved chain is kept: the old shards are pooled and dealt into ``world`` near-equal parts
    (:func:`~ebmscale.buffer.client.resplit_states`, the same dealing a Ray buffer uses when its
    shard count changes). A new rank's buffer therefore holds ``total / world`` chains (±1), which
    may differ from ``buffer.capacity``. Class-partitioned buffers stay partitioned: every new rank
    holds chains of every class (a class with fewer chains than its slots is dealt cyclically).
    The buffer's own RNG state is taken from old rank ``rank mod old_world``.
    """
    if not states:
        raise ValueError("no buffer states to re-shard")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    for s in states[1:]:
        if s["num_classes"] != states[0]["num_classes"]:
            raise ValueError(f"buffer shards disagree on num_classes: {states[0]['num_classes']} vs {s['num_classes']}")
    total = sum(len(s["data"]) for s in states)
    if total < world:
        raise ValueError(f"{total} buffer chains cannot be split across {world} ranks")
    return resplit_states(states, split_capacity(total, world), int(states[0]["num_classes"]))[rank]
