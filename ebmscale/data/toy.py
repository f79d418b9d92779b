"""Built-in 2-D toy densities with exact sampling and exact log-density.

Each density is a :class:`ToyDensity` with

* ``name`` -- its registry name (``TOY_NAMES``),
* ``bounds`` -- ``(lo, hi)``: the square box ``[lo, hi]^2`` holds all but < 1e-6 of the mass, so
  midpoint quadrature over it (the exact 2-D evaluation in :mod:`ebmscale.eval.toy`) sees the
  whole density,
* ``sample(n, generator)`` -- ``float32 (n, 2)`` exact i.i.d. draws that use only ``generator``
  for randomness (same generator state -> same points),
* ``log_prob(x)`` -- the exact log density in float64, shape ``(n,)``.

The four densities (parameters are class attributes, so they are documented in one place):

``8gaussians``    FFJORD's mixture of 8 equally weighted isotropic Gaussians; centres at radius
                  4/sqrt(2) in the directions k*45 degrees, std 0.5/sqrt(2). Bounds [-5, 5].
``rings``         angle uniform, radius from an equal mixture of N(1, 0.2^2), N(2, 0.2^2),
                  N(3, 0.2^2) truncated to r > 0 (renormalised analytically);
                  p(x) = p_r(|x|) / (2 pi |x|). Bounds [-4, 4].
``checkerboard``  uniform on the 8 black 2x2 squares of a 4x4 board on [-4, 4]^2 (square (i, j)
                  counted from the lower left corner is black when i + j is even, as in
                  FFJORD); log p = -log 32 on the closed black squares and -inf elsewhere.
                  Bounds [-4, 4].
``moons``         scikit-learn's two moons scaled by 2 and centred (arcs of radius 2 about
                  (-1, -0.5) for t in [0, pi] and about (1, 0.5) for t in [pi, 2 pi]), equal
                  weights, plus isotropic Gaussian noise of std 0.2. The log density is an
                  integral over the arc angle, computed by Gauss-Legendre quadrature in the log
                  domain (accurate to ~1e-11 in log p over the box; see :class:`Moons`).
                  Bounds [-4, 4].

``make_splits`` draws the fixed train/val/test sets from independent generator streams.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ebmscale.utils import hash_seed

__all__ = ["ToyDensity", "TOY_NAMES", "get_toy", "make_splits", "split_generator"]

_LOG_2PI = math.log(2.0 * math.pi)


class ToyDensity:
    """A 2-D density with exact sampling and exact log-density (see the module docstring)."""

    name: str = ""
    bounds: tuple[float, float] = (-4.0, 4.0)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact i.i.d. draws as float32 ``(n, 2)`` on ``generator``'s device."""
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log density of the points ``x`` (any float dtype, ``(n, 2)``) as float64 ``(n,)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, bounds={self.bounds})"


def _as_points64(x: torch.Tensor) -> torch.Tensor:
    # Everything is computed in float64 so that the "exact" density is exact to ~1e-15, not to
    # float32's 1e-7, whatever dtype the caller's points have.
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"expected points of shape (n, 2), got {tuple(x.shape)}")
    return x.to(torch.float64)


def _randn(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, d, generator=g, dtype=torch.float64, device=g.device)


def _rand(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64, device=g.device)


class EightGaussians(ToyDensity):
    """FFJORD's ``8gaussians``: centres ``(4/sqrt 2)(cos k pi/4, sin k pi/4)``, std ``0.5/sqrt 2``."""

    name = "8gaussians"
    radius = 4.0 / math.sqrt(2.0)
    std = 0.5 / math.sqrt(2.0)
    # The nearest box edge is (5 - 2.83)/0.354 = 6.1 stds from a centre: mass outside ~1e-9.
    bounds = (-5.0, 5.0)

    def centres(self, device: torch.device | str = "cpu") -> torch.Tensor:
        ang = torch.arange(8, dtype=torch.float64, device=device) * (math.pi / 4.0)
        return self.radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(0, 8, (n,), generator=generator, device=generator.device)
        x = self.centres(generator.device)[k] + self.std * _randn(n, 2, generator)
        return x.to(torch.float32)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_points64(x)
        d2 = ((x[:, None, :] - self.centres(x.device)[None]) ** 2).sum(-1)  # (n, 8)
        s2 = self.std ** 2
        return torch.logsumexp(-d2 / (2.0 * s2), dim=1) - math.log(2.0 * math.pi * s2) - math.log(8.0)


class Rings(ToyDensity):
    """Concentric rings: uniform angle, radius from an equal mixture of ``N(r_k, 0.2^2)``,
    ``r_k in (1, 2, 3)``, truncated to ``r > 0``.

    The truncation removes ``(1/3) sum_k Phi(-r_k/0.2)`` ~ 1e-7 of the radial mass (almost all of
    it from the inner ring); sampling redraws radii <= 0 (exact truncation) and ``log_prob``
    divides by the kept mass, so the density integrates to exactly one. The polar change of
    variables gives ``p(x) = p_r(|x|) / (2 pi |x|)``; at the origin itself this is +inf (an
    integrable 1/|x| singularity of weight ~1e-6 there), which no draw hits with positive
    probability.
    """

    name = "rings"
    radii = (1.0, 2.0, 3.0)
    std = 0.2
    # The outer ring reaches the box edge at 5 stds: mass outside [-4, 4]^2 < (1/3) P(N > 5) ~ 1e-7.
    bounds = (-4.0, 4.0)

    def log_norm(self) -> float:
        """log of the radial mass kept by the truncation to r > 0 (slightly below 0)."""
        kept = sum(0.5 * math.erfc(-r / (self.std * math.sqrt(2.0))) for r in self.radii) / len(self.radii)
        return math.log(kept)

    def log_prob_radius(self, r: torch.Tensor) -> torch.Tensor:
        """log p_r(r) of the truncated radial mixture (float64; -inf for r < 0)."""
        r = torch.as_tensor(r, dtype=torch.float64)
        mu = torch.tensor(self.radii, dtype=torch.float64, device=r.device)
        z = (r[:, None] - mu[None]) / self.std
        lp = (torch.logsumexp(-0.5 * z * z, dim=1) - 0.5 * _LOG_2PI - math.log(self.std)
              - math.log(len(self.radii)) - self.log_norm())
        return torch.where(r >= 0, lp, torch.full_like(lp, -math.inf))

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        mu = torch.tensor(self.radii, dtype=torch.float64, device=generator.device)
        k = torch.randint(0, len(self.radii), (n,), generator=generator, device=generator.device)
        r = mu[k] + self.std * _randn(n, 1, generator)[:, 0]
        # Exact truncation by rejection: redraw the (about 1e-7 of) radii that fall at or below 0.
        bad = r <= 0
        while bool(bad.any()):
            m = int(bad.sum())
            kk = torch.randint(0, len(self.radii), (m,), generator=generator, device=generator.device)
            r[bad] = mu[kk] + self.std * _randn(m, 1, generator)[:, 0]
            bad = r <= 0
        theta = 2.0 * math.pi * _rand(n, generator)
        return (r[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)).to(torch.float32)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_points64(x)
        r = torch.linalg.vector_norm(x, dim=1)
        return self.log_prob_radius(r) - _LOG_2PI - torch.log(r)


class Checkerboard(ToyDensity):
    """Uniform on the 8 black 2x2 squares of a 4x4 board on ``[-4, 4]^2``.

    Square ``(i, j)`` (column i, row j, from the lower left) is black when ``i + j`` is even,
    the same pattern as FFJORD's checkerboard scaled by 2. ``log_prob`` is ``-log 32`` on the
    *closed* black squares and ``-inf`` elsewhere: -inf is the true value of an impossible point
    and keeps every NLL honest (an out-of-support test point makes it infinite rather than
    merely large). Closed squares matter only on the measure-zero grid lines, but they keep a
    float32-rounded draw (which may land exactly on its square's far edge) inside the support.
    """

    name = "checkerboard"
    bounds = (-4.0, 4.0)  # the support is exactly the box
    side = 2.0

    def squares(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Lower-left corners of the 8 black squares, float64 ``(8, 2)``."""
        ij = [(i, j) for j in range(4) for i in range(4) if (i + j) % 2 == 0]
        return torch.tensor(ij, dtype=torch.float64, device=device) * self.side + self.bounds[0]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(0, 8, (n,), generator=generator, device=generator.device)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64, device=generator.device)
        return (self.squares(generator.device)[k] + self.side * u).to(torch.float32)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_points64(x)
        lo = self.squares(x.device)[None]  # (1, 8, 2)
        inside = ((x[:, None, :] >= lo) & (x[:, None, :] <= lo + self.side)).all(-1).any(-1)
        area = 8 * self.side ** 2
        return torch.where(inside, torch.full_like(x[:, 0], -math.log(area)),
                           torch.full_like(x[:, 0], -math.inf))


@lru_cache(maxsize=8)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import roots_legendre

    return roots_legendre(n)


def _logsumexp_rows(a: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 (overwriting ``a``) that clamps terms more than 100 below each row's
    maximum: they change the sum by < 1e-40 relative, and keeping exp() off its underflow path
    makes it several times faster on CPU."""
    m = a.amax(dim=1, keepdim=True)
    return torch.log(a.sub_(m).clamp_min_(-100.0).exp_().sum(dim=1)) + m[:, 0]


class Moons(ToyDensity):
    """scikit-learn's two moons, scaled by 2 and centred, with Gaussian noise of std 0.2.

    sklearn's arcs are ``(cos t, sin t)`` and ``(1 - cos t, 0.5 - sin t)``, ``t ~ U(0, pi)``; the
    map ``x -> 2 (x - (0.5, 0.25))`` turns them into arcs of radius ``R = 2`` about
    ``c_0 = (-1, -0.5)`` (angles ``[0, pi]``) and about ``c_1 = (1, 0.5)`` (angles ``[pi, 2 pi]``),
    filling ``[-3, 3] x [-1.5, 1.5]``. Each moon has weight 1/2 (drawn per point, not fixed halves,
    so the draws are i.i.d.). sklearn's ``noise=0.1`` becomes std ``0.2`` in these units.

    Exact density: ``p(x) = 1/2 sum_c 1/pi int N(x; c_c + R e(theta), s^2 I) dtheta``. With
    ``rho = |x - c_c|`` and ``phi`` its angle, ``|x - c - R e(theta)|^2 = (rho - R)^2 +
    4 R rho sin^2((theta - phi) / 2)``, so the integrand is ``exp(-(rho-R)^2 / 2s^2)`` times a
    factor in (0, 1]. The 1-D integral over the arc angle is done by ``n_quad``-point
    Gauss-Legendre quadrature in the log domain (logsumexp over nodes: no underflow far from the
    arcs). With 192 nodes its error is ~1e-11 in log p everywhere in the box (checked against
    scipy's adaptive quadrature and 1024 nodes; 96 nodes already reach that). A 2000-point
    midpoint rule is far worse (up to 3e-3 in log p): beyond the arc ends the integrand is a
    steep exponential cut off at the end point, which the midpoint rule resolves poorly.
    """

    name = "moons"
    scale = 2.0
    shift = (0.5, 0.25)  # centre of sklearn's picture, subtracted before scaling
    std = 0.2
    radius = 2.0
    # The arc tips sit at |x| = 3 on the x-axis; the box edge is 5 noise stds away: mass outside ~1e-7.
    bounds = (-4.0, 4.0)
    n_quad = 192

    def centres(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Centres of the two arcs (outer moon, inner moon), float64 ``(2, 2)``."""
        s, (a, b) = self.scale, self.shift
        return torch.tensor([[s * (0.0 - a), s * (0.0 - b)], [s * (1.0 - a), s * (0.5 - b)]],
                            dtype=torch.float64, device=device)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        g = generator
        c = torch.randint(0, 2, (n,), generator=g, device=g.device)
        t = math.pi * _rand(n, g)
        cos_t, sin_t = torch.cos(t), torch.sin(t)
        outer = torch.stack([cos_t, sin_t], dim=1)
        inner = torch.stack([1.0 - cos_t, 0.5 - sin_t], dim=1)
        base = torch.where((c == 0)[:, None], outer, inner)
        shift = torch.tensor(self.shift, dtype=torch.float64, device=g.device)
        x = self.scale * (base - shift) + self.std * _randn(n, 2, g)
        return x.to(torch.float32)

    def log_prob(self, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        x = _as_points64(x)
        nodes, weights = _gauss_legendre(self.n_quad)
        # Map the Legendre nodes from [-1, 1] to theta in [0, pi]; (1/pi) * (pi/2) * w = w/2 is the
        # normalised weight of the uniform average over the arc.
        theta0 = torch.as_tensor((nodes + 1.0) * (math.pi / 2.0), dtype=torch.float64, device=x.device)
        logw = torch.as_tensor(np.log(weights / 2.0), dtype=torch.float64, device=x.device)
        centres = self.centres(x.device)
        R, s2 = self.radius, self.std ** 2
        out = []
        # Chunks keep the (points x nodes) matrices near 8192 x 192 x 8 B = 12 MB.
        for xs in x.split(chunk):
            comps = []
            for c in range(2):
                d = xs - centres[c]
                rho = torch.linalg.vector_norm(d, dim=1)
                theta = theta0 + c * math.pi  # arc c spans angles [c*pi, (c+1)*pi]
                # rho - d.e(theta) = rho (1 - cos(theta - phi)) >= 0: one matmul instead of a
                # trig call per (point, node); its rounding (~1e-16 * rho) is harmless here.
                dot = d @ torch.stack([torch.cos(theta), torch.sin(theta)], dim=0)  # (m, nodes)
                gap = (rho[:, None] - dot).clamp_min(0.0)
                log_int = _logsumexp_rows(logw[None] - (R / s2) * gap)
                comps.append(-(rho - R) ** 2 / (2.0 * s2) + log_int)
            lp = torch.logsumexp(torch.stack(comps, dim=1), dim=1) - math.log(2.0)
            out.append(lp - math.log(2.0 * math.pi * s2))
        return torch.cat(out) if out else x.new_zeros(0)


_REGISTRY: dict[str, type[ToyDensity]] = {
    cls.name: cls for cls in (EightGaussians, Rings, Checkerboard, Moons)
}
TOY_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_toy(name: str) -> ToyDensity:
    """The toy density registered as ``name`` (one of ``TOY_NAMES``)."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown toy density '{name}'; known: {', '.join(TOY_NAMES)}") from None


# Distinct constants per split so the three streams never coincide; the split's stream does not
# depend on the sizes of the others, so changing `train` leaves val/test unchanged.
_SPLIT_STREAM = {"train": 0x7261696E, "val": 0x76616C, "test": 0x74657374}


def split_generator(name: str, split: str, seed: int) -> torch.Generator:
    """The CPU generator of one split of one density, from NumPy's SeedSequence hash of
    ``(seed, density, split)`` -- independent, well-mixed streams for nearby seeds."""
    name_key = int.from_bytes(name.encode(), "little") % (2 ** 63)
    # SeedSequence takes non-negative integers only; masking keeps negative seeds usable.
    entropy = [int(seed) & (2 ** 64 - 1), name_key, _SPLIT_STREAM[split]]
    h = hash_seed(*entropy)
    g = torch.Generator(device="cpu")
    g.manual_seed((h & 0xFFFFFFFF) << 31 | (h >> 32) >> 1)
    return g


_SPLIT_BLOCK = 4096


def _sample_nested(density: ToyDensity, n: int, generator: torch.Generator) -> torch.Tensor:
    # Fixed-size blocks from one stream, so a larger split extends a smaller one (nested training
    # sets for data-scaling studies) instead of being a different sample.
    blocks, have = [], 0
    while have < n:
        blocks.append(density.sample(_SPLIT_BLOCK, generator))
        have += _SPLIT_BLOCK
    return torch.cat(blocks)[:n] if blocks else torch.zeros(0, 2)


def make_splits(name: str, train: int, val: int, test: int, seed: int) -> dict[str, torch.Tensor]:
    """Fixed exact samples ``{'train', 'val', 'test'}`` (float32 ``(n, 2)`` each) of density ``name``.

    Each split comes from its own generator stream derived from ``(seed, name, split)``, so the
    splits are independent i.i.d. samples (disjoint with probability one) and each is reproducible
    on its own: the val and test sets are the same for every training-set size, and a split of
    size n is the first n points of any larger one (draws come in blocks of 4096).
    """
    density = get_toy(name)
    sizes = {"train": train, "val": val, "test": test}
    for k, v in sizes.items():
        if int(v) < 0:
            raise ValueError(f"make_splits: {k} size must be >= 0, got {v}")
    return {k: _sample_nested(density, int(v), split_generator(name, k, seed)) for k, v in sizes.items()}
