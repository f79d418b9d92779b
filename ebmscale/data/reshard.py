"""The data position of a run resumed on a different number of ranks.

A rank's sample order is a function of (seed, epoch, rank, world): changing the world size
re-partitions every epoch, so a position inside an epoch has no counterpart in the new layout.
The mapping is therefore at epoch granularity: the new ranks start at the beginning of the epoch
after the furthest one any old rank had begun (or at that epoch itself when no old rank had read
from it yet). Samples of the interrupted epoch not yet read are skipped; nothing is read twice
within an epoch, and the following epochs are complete.
"""
from __future__ import annotations

from ebmscale.utils import even_share

# The keys that hold a position inside an epoch (ArrayStream: position; ShardStream: chunk, offset).
_POSITION_KEYS = ("position", "chunk", "offset")


def remap_stream_state(old_states: list[dict], fresh: dict) -> dict:
    """The state a new rank's stream loads, from the saved states of all old ranks and the new
    stream's own ``state_dict()`` (which carries its rank and world size).

    Counters (``samples``, ``skipped``) keep their totals across the new ranks. Settings that
    define the sample order (seed, shards, workers...) come from the old states, so the stream's
    ``load_state_dict`` still refuses a changed one.
    """
    if not old_states:
        raise ValueError("no data stream states to remap")
    last = max(int(s["epoch"]) for s in old_states)
    begun = any(int(s.get(k, 0)) > 0 for s in old_states if int(s["epoch"]) == last for k in _POSITION_KEYS)
    new = dict(old_states[0])
    for key in ("rank", "world"):
        if key in fresh:
            new[key] = fresh[key]
    new["epoch"] = last + 1 if begun else last
    for key in _POSITION_KEYS:
        if key in new:
            new[key] = 0
    world, rank = int(fresh.get("world", 1)), int(fresh.get("rank", 0))
    for key in ("samples", "skipped"):
        if key in new:
            total = sum(int(s.get(key, 0)) for s in old_states)
            new[key] = even_share(total, world, rank)[1]
    return new
