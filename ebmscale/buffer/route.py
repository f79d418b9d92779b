"""Which way a buffer client's chains travel to and from a shard, without Ray.

Three ways, chosen per call: a shard on the client's node through the client's shared-memory
mailboxes (:mod:`ebmscale.buffer.mailbox`), a shard on another node over a direct TCP link
(:mod:`ebmscale.buffer.link`), and by value through Ray where neither can be had (and for small
batches, which Ray inlines into the call). :class:`Routes` turns a draw or write-back into the
shard method and arguments to call, a draw's answer into float32 starts, and a call into one that
can be sent again by value (a shard that moved to another node, a link write-back the shard did
not get). The Ray calls stay in :mod:`ebmscale.buffer.ray_host`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ebmscale.buffer import link, mailbox
from ebmscale.buffer.replay import encode, starts_from_encoded


class Routes:
    """A client's routes to the shards: ``mail`` (:class:`~ebmscale.buffer.mailbox.ClientBoxes`),
    ``links`` (:class:`~ebmscale.buffer.link.ClientLinks`), ``local(k)``: shard ``k`` runs on
    this node; chains of ``shape`` stored as ``storage`` within ``bounds``."""

    def __init__(self, mail: mailbox.ClientBoxes, links: link.ClientLinks, local: Callable[[int], bool],
                 shape: tuple[int, ...], storage: str, bounds: tuple[float, float]):
        self.mail, self.links, self._local = mail, links, local
        self.shape, self.storage, self.bounds = tuple(shape), storage, tuple(bounds)
        self._payloads: dict[int, np.ndarray] = {}  # link write-backs in flight: their chains, to resend
        # By shard: (link, request id) of this client's last write-back over that link, which a
        # draw over the same link waits for at the shard; None when it went by value through Ray,
        # whose order the link cannot see (the draws go through Ray too until the next write-back
        # over the link, as they do after one over a link since replaced).
        self._after: dict[int, tuple[link.Link, int] | None] = {}

    def draw(self, k: int, args: tuple) -> tuple[str, tuple]:
        """The call for a draw ``args = (n, labels, seed)`` from shard ``k``."""
        box = self.mail.get(k, "draw", args[0])
        if box is not None:  # the shard writes the float32 starts into this node's shared memory
            return "sample_into", (*args, box.address)
        if self.links.get(k, args[0]) is None:
            return "sample", args
        req, now = self.links.request(k), self.links.links[k]
        last = self._after.get(k, (now, 0))
        if last is None or last[0] is not now:  # the encoded starts come over the link, the call through Ray
            return "sample_link", (*args, self.links.key, req)
        # Request and answer over the link alone: no Ray call (see ebmscale.buffer.link).
        n, labels, seed = args
        meta = {"op": "draw", "n": int(n), "seed": int(seed), "after": last[1], "labels": labels is not None}
        now.send(req, [] if labels is None else [np.asarray(labels, dtype=np.int64)], meta)
        return "link_draw", (*args, self.links.key, req)

    def starts(self, k: int, n: int, method: str, args: tuple, result: tuple,
               by_value: Callable[[], tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(float32 starts, slots, reinit mask) of shard ``k``'s ``result`` to the draw call
        ``method(*args)`` of ``n`` chains: in this client's mailbox (``sample_into``: a view, valid
        until the next draw from that shard), on the link (``sample_link``: the storage dtype;
        ``by_value()`` asks again by value if the link died before they came) or by value, in the
        storage dtype (``sample``); ``link_draw`` (no Ray call, ``result`` None): all of it on the
        link, or by value when it did not come."""
        if method == "link_draw" or (method == "sample_link" and len(result) == 2):
            # On the link: (chains, noise) after a Ray call that gave (slots, reinit mask), or all four.
            got = self.links.take(args[-1])
            if got is not None and len(got) == (4 if result is None else 2):
                q, noise = got[:2]
                idx, reinit = got[2:] if result is None else result
                return starts_from_encoded(q, reinit, noise, self.storage, self.bounds, reuse=True), idx, reinit
            result = by_value()  # the link died, or the shard could not serve it (Ray says why)
        elif method == "sample_link":  # answered by value (a restarted shard has no link)
            self.links.forget(args[-1])
        if len(result) == 2:
            idx, reinit = result
            return self.mail.boxes[(k, "draw")].view(n, self.shape), idx, reinit
        q, idx, reinit, noise = result
        return starts_from_encoded(q, reinit, noise, self.storage, self.bounds), idx, reinit

    def write(self, k: int, pos: np.ndarray, idx: np.ndarray, reinit: np.ndarray, steps: int, x: np.ndarray,
              box: mailbox.Mailbox | None) -> tuple[str, tuple]:
        """The call writing back chains ``x[pos]`` to slots ``idx`` of shard ``k``: through the
        free write mailbox ``box`` (float32; the shard encodes them), over the link, or by value."""
        if box is not None:
            np.take(x, pos, axis=0, out=box.view(len(pos), self.shape), mode="clip")
            return "write_from", (idx, box.address, reinit, steps)
        q = encode(x[pos], self.storage, self.bounds)
        if self.links.get(k, len(pos)) is None:
            self._after[k] = None
            return "write", (idx, q, reinit, steps)
        req = self.links.request(k)
        self._after[k] = (self.links.links[k], req)
        self._payloads[req] = q
        self.links.links[k].send(req, [q])
        return "write_link", (idx, reinit, steps, self.links.key, req)

    def landed(self, method: str, args: tuple) -> None:
        """Write-back ``method(*args)`` has landed (or was replaced by one by value). (A draw over
        the link is done once :meth:`starts` has taken its message.)"""
        if method == "write_link":
            self.links.forget(args[-1])
            self._payloads.pop(args[-1], None)

    def portable(self, k: int, method: str, args: tuple) -> tuple[str, tuple]:
        """A call to send again to shard ``k``'s re-created actor, or a link write-back the shard
        did not get: one through a mailbox goes by value when the shard is no longer on this
        node, one over a link by value."""
        if method in ("sample_link", "link_draw", "write_link"):
            self.links.forget(args[-1])
            if method != "write_link":
                return "sample", args[:3]
            idx, reinit, steps, _, req = args
            self._after[k] = None
            return "write", (idx, self._payloads.pop(req), reinit, steps)
        if method not in ("sample_into", "write_from") or self._local(k):
            return method, args
        if method == "sample_into":
            return "sample", args[:3]
        idx, address, reinit, steps = args
        chains = self.mail.by_key(address[0]).view(len(idx), self.shape)
        return "write", (idx, encode(chains, self.storage, self.bounds), reinit, steps)

    def close(self) -> None:
        self.mail.close()
        self.links.close()
