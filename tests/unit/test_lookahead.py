"""The trainer's one-batch lookahead (ebmscale.data.lookahead): same batches, and a checkpoint
taken while a batch is pending resumes with that batch."""
import numpy as np
import torch

from ebmscale.data.lookahead import Lookahead
from ebmscale.data.memory import ArrayStream


def _stream():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    return ArrayStream(x, np.arange(20) % 3, batch_size=4, seed=1)


def test_peeking_changes_neither_the_batches_nor_the_checkpointed_position():
    ref, la = _stream(), Lookahead(_stream())
    seq = [next(ref) for _ in range(6)]
    got = []
    for i in range(6):
        if i % 2 == 0:
            peeked = la.peek()
            assert la.peek() is peeked  # peeking twice reads nothing more
            state = la.state_dict()
            resumed = Lookahead(_stream())
            resumed.load_state_dict(state)
            assert torch.equal(next(resumed)[0], peeked[0])  # the pending batch is not lost
        got.append(next(la))
    for (x, y), (x2, y2) in zip(seq, got):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert la.epoch == ref.epoch and la.state_dict() == ref.state_dict()
