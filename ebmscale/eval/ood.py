"""Out-of-distribution detection with energy models (JEM, Grathwohl et al. 2020, section 5.2).

Three scores, each larger for inputs the model believes in-distribution:

* ``log_px``       log p(x) up to the constant log Z: ``-E(x)`` (JEM: logsumexp_y f(x)[y]);
* ``max_softmax``  max_y p(y|x), the classifier baseline (needs class logits);
* ``neg_grad_norm`` ``-||d log p(x) / dx||_2``, JEM's "approximate mass" score: data sit in
  flat, wide modes of log p.

``auroc`` compares the scores on in-distribution test images with those on an OOD set: the
probability that a random in-distribution image scores higher than a random OOD one (ties
count half), i.e. the Mann-Whitney U statistic over n_in * n_out.

OOD sets (uint8 NCHW like the in-distribution test set): Fashion-MNIST (resized/recoloured to
the model's shape when needed), and always uniform noise, constant images (one random value
per channel) and the test images flipped horizontally and vertically.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SCORES = ("log_px", "max_softmax", "neg_grad_norm")
SYNTHETIC_OOD = ("uniform", "constant", "flip_h", "flip_v")


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve for 'in-distribution' = higher score; ties count half."""
    from scipy.stats import rankdata

    a = np.asarray(scores_in, np.float64).ravel()
    b = np.asarray(scores_out, np.float64).ravel()
    if len(a) == 0 or len(b) == 0:
        raise ValueError("auroc needs scores on both sets")
    ranks = rankdata(np.concatenate([a, b]))  # average ranks handle ties
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2.0
    return float(u / (len(a) * len(b)))


def ood_scores(model: torch.nn.Module, x: torch.Tensor, with_classifier: bool = True) -> dict[str, torch.Tensor]:
    """The scores of a batch of model inputs ``x`` (float, model range) as float64 CPU tensors.
    ``max_softmax`` only when ``with_classifier`` (the model has ``logits``)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        energy = model(x)
        (grad,) = torch.autograd.grad(energy.float().sum(), x)
    out = {"log_px": (-energy).detach().double().cpu(),
           "neg_grad_norm": -grad.flatten(1).norm(dim=1).double().cpu()}
    if with_classifier:
        with torch.no_grad():
            out["max_softmax"] = torch.softmax(model.logits(x.detach()).float(), 1).amax(1).double().cpu()
    return out


def adapt_images(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 NHWC/NCHW images -> uint8 NCHW of ``shape`` (C, H, W): channels repeated or averaged,
    bilinear resize. Lets e.g. Fashion-MNIST be scored by a CIFAR model."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dim() == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    t = t.float()
    c, h, w = shape
    if t.shape[1] != c:
        t = t.mean(1, keepdim=True).expand(-1, c, -1, -1) if c in (1, 3) else t
    if tuple(t.shape[-2:]) != (h, w):
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8).contiguous().numpy()


def synthetic_ood(name: str, x_test: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uint8 NCHW images of a synthetic OOD set built for test images ``x_test`` (NCHW)."""
    shape = x_test.shape[1:]
    if name == "uniform":
        return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    if name == "constant":
        values = rng.integers(0, 256, size=(n, shape[0], 1, 1), dtype=np.uint8)
        return np.broadcast_to(values, (n, *shape)).copy()
    if name == "flip_h":
        return np.ascontiguousarray(x_test[:n, :, :, ::-1])
    if name == "flip_v":
        return np.ascontiguousarray(x_test[:n, :, ::-1, :])
    raise ValueError(f"unknown synthetic OOD set '{name}' (known: {', '.join(SYNTHETIC_OOD)})")
