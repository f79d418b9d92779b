import numpy as np
import pytest

from ebmscale.buffer import LocalBuffer, ReplayBuffer
from ebmscale.buffer.client import resplit_states, split_capacity
from ebmscale.buffer.replay import decode, encode, starts_from_encoded


def test_reinit_fraction_is_binomial():
    buf = ReplayBuffer(1000, (2,), bounds=(5.0, 6.0), reinit_prob=0.05, seed=0)
    buf.data[:] = 0.0  # mark every stored chain, so re-initialised starts are recognisable
    rng = np.random.default_rng(1)
    n, total = 0, 0
    for _ in range(200):
        x, idx, labels, reinit = buf.sample(100, rng=rng)
        assert labels is None and len(idx) == 100
        fresh = (x >= 5.0).all(axis=1)
        assert np.array_equal(fresh, reinit)
        n += reinit.sum()
        total += 100
    frac = n / total
    se = np.sqrt(0.05 * 0.95 / total)
    assert abs(frac - 0.05) < 4 * se


def test_draws_are_uniform_over_slots():
    buf = ReplayBuffer(50, (1,), reinit_prob=0.0, seed=0)
    rng = np.random.default_rng(0)
    counts = np.zeros(50)
    for _ in range(400):
        _, idx, _, _ = buf.sample(100, rng=rng)
        counts += np.bincount(idx, minlength=50)
    expected = 400 * 100 / 50
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 49 + 5 * np.sqrt(2 * 49)  # chi-square with 49 dof, generous bound


def test_write_back_and_state_round_trip():
    buf = ReplayBuffer(64, (3, 2, 2), bounds=(-1.0, 1.0), reinit_prob=0.3, seed=7)
    x, idx, _, _ = buf.sample(16)
    buf.write(idx, np.full_like(x, 0.25))
    assert np.allclose(buf.data[idx], 0.25)
    state = buf.state_dict()
    a = buf.sample(10)
    other = ReplayBuffer(64, (3, 2, 2), bounds=(-1.0, 1.0), reinit_prob=0.3, seed=99)
    other.load_state_dict(state)
    b = other.sample(10)
    for u, v in zip(a, b):
        assert (u is None and v is None) or np.array_equal(u, v)


def test_class_conditional_partition_keeps_labels():
    buf = ReplayBuffer(100, (2,), num_classes=10, reinit_prob=0.0, seed=0)
    assert np.array_equal(np.bincount(buf.labels), np.full(10, 10))
    want = np.array([3, 3, 7, 0, 9] * 20)
    x, idx, labels, _ = buf.sample(len(want), labels=want)
    assert np.array_equal(labels, want) and np.array_equal(buf.labels[idx], want)
    _, idx2, labels2, _ = buf.sample(30)
    assert np.array_equal(labels2, buf.labels[idx2])
    with pytest.raises(ValueError):
        ReplayBuffer(10, (2,)).sample(3, labels=np.zeros(3, dtype=int))


@pytest.mark.parametrize("storage, tol", [("fp32", 0.0), ("fp16", 1e-3), ("uint8", 1.0 / 255)])
def test_storage_dtypes(storage, tol):
    buf = ReplayBuffer(32, (4,), bounds=(-1.0, 1.0), reinit_prob=0.0, storage=storage, seed=0)
    vals = np.linspace(-1, 1, 32 * 4, dtype=np.float32).reshape(32, 4)
    buf.write(np.arange(32), vals)
    x, idx, _, _ = buf.sample(32)
    assert x.dtype == np.float32
    assert np.abs(x - vals[idx]).max() <= tol + 1e-7
    assert buf.data.dtype == {"fp32": np.float32, "fp16": np.float16, "uint8": np.uint8}[storage]


@pytest.mark.parametrize("storage", ["fp32", "fp16", "uint8"])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_encoded_draw_decodes_to_exactly_the_plain_draw(storage, num_classes):
    """What the Ray shards send (storage dtype + float noise for fresh starts) decodes to the very
    starts, slots and labels of a local draw with the same generator; so do the starts a shard
    writes into a client's shared-memory mailbox (``sample_into``)."""
    a, b, c = (ReplayBuffer(60, (4,), bounds=(-1.0, 1.0), reinit_prob=0.3, storage=storage,
                            num_classes=num_classes, seed=7) for _ in range(3))
    labels = np.array([0, 2, 2, 1, 0] * 4) if num_classes else None
    x, idx, lab, reinit = a.sample(20, labels, np.random.default_rng(5))
    q, idx2, lab2, reinit2, noise = b.sample_encoded(20, labels, np.random.default_rng(5))
    assert q.dtype == b.data.dtype and noise.dtype == np.float32 and len(noise) == reinit.sum() > 0
    assert np.array_equal(starts_from_encoded(q, reinit2, noise, storage, (-1.0, 1.0)), x)
    assert np.array_equal(idx, idx2) and np.array_equal(reinit, reinit2)
    assert (lab is None and lab2 is None) or np.array_equal(lab, lab2)
    out = np.full((20, 4), np.nan, dtype=np.float32)
    idx3, reinit3 = c.sample_into(out, 20, labels, np.random.default_rng(5))
    assert np.array_equal(out, x) and np.array_equal(idx3, idx) and np.array_equal(reinit3, reinit)


def test_encoded_write_is_stored_as_is():
    buf = ReplayBuffer(8, (3,), bounds=(-1.0, 1.0), reinit_prob=0.0, storage="uint8", seed=0)
    x = np.array([[-1.0, 0.0, 1.0]] * 2, dtype=np.float32)
    q = encode(x, "uint8", (-1.0, 1.0))
    buf.write(np.array([0, 1]), q)  # what a Ray client sends: encoded once, a quarter of the bytes
    assert np.array_equal(buf.data[:2], q) and np.abs(decode(q, "uint8", (-1.0, 1.0)) - x).max() <= 1 / 255 + 1e-6


def test_local_client_is_the_plain_buffer():
    a, b = ReplayBuffer(32, (2,), seed=3), ReplayBuffer(32, (2,), seed=3)
    client = LocalBuffer(b)
    assert client.is_global is False and client.counters() == {}
    x, idx, _, _ = a.sample(5, rng=np.random.default_rng(1))
    y, handle = client.draw(5, None, np.random.default_rng(1))
    assert np.array_equal(x, y) and np.array_equal(idx, handle[0])
    client.write_back(handle, np.full_like(y, 0.5))
    assert np.allclose(b.data[handle[0]], 0.5) and client.data is b.data


@pytest.mark.parametrize("num_classes", [0, 3])
def test_resplit_deals_every_chain_into_new_shards(num_classes):
    shards = [ReplayBuffer(c, (2,), num_classes=num_classes, seed=k) for k, c in enumerate((7, 7, 6))]
    for k, s in enumerate(shards):  # mark every chain: (shard, slot)
        s.data[:, 0], s.data[:, 1] = k, np.arange(len(s.data))
    states = [s.state_dict() for s in shards]
    caps = split_capacity(20, 2)
    assert caps == [10, 10]
    out = resplit_states(states, caps, num_classes)
    assert [len(s["data"]) for s in out] == caps
    old = {(int(a), int(b)) for s in shards for a, b in s.data}
    new = [(int(a), int(b)) for s in out for a, b in s["data"]]
    assert set(new) == old and len(new) == len(old)  # same total: each chain exactly once
    if num_classes:
        label_of = {(k, i): int(lab) for k, s in enumerate(shards) for i, lab in enumerate(s.labels)}
        for s in out:
            assert [label_of[(int(a), int(b))] for a, b in s["data"]] == list(s["labels"])
    # Into fewer slots (truncated) and more slots (cycled); a fresh buffer loads the result.
    for total in (9, 40):
        dealt = resplit_states(states, [total], num_classes)[0]
        target = ReplayBuffer(total, (2,), num_classes=num_classes, seed=0)
        target.load_state_dict(dealt)
        assert len(target.data) == total


def test_local_client_loads_a_global_state():
    shards = [ReplayBuffer(8, (2,), seed=k) for k in range(2)]
    client = LocalBuffer(ReplayBuffer(16, (2,), seed=9))
    client.load_state_dict({"backend": "ray", "num_shards": 2, "shards": [s.state_dict() for s in shards]})
    assert np.array_equal(client.data, np.concatenate([s.data for s in shards]))
    with pytest.raises(ValueError, match="rank 0"):
        client.load_state_dict({"backend": "ray", "num_shards": 2, "shards": None})


def test_peek_reads_distinct_stored_chains_without_changing_state():
    b = ReplayBuffer(20, (3,), (-1.0, 1.0), reinit_prob=1.0, seed=0)  # a draw would re-init everything
    before = b.state_dict()
    x = b.peek(8, np.random.default_rng(1))
    assert x.dtype == np.float32 and len({tuple(r) for r in x.tolist()}) == 8
    stored = {tuple(r) for r in b.data.tolist()}
    assert all(tuple(r) in stored for r in x.tolist())
    after = b.state_dict()
    assert np.array_equal(before["data"], after["data"]) and before["rng"] == after["rng"]
    assert len(b.peek(50, np.random.default_rng(2))) == 20
