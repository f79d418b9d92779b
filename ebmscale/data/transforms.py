"""Device-side conversion of uint8 batches into model inputs (and back, for saving images)."""
from __future__ import annotations

import torch


def data_bounds(range_name: str) -> tuple[float, float]:
    """(low, high) of the pixel range a model sees: 'unit' = [0, 1], 'symmetric' = [-1, 1]."""
    return (0.0, 1.0) if range_name == "unit" else (-1.0, 1.0)


def to_model_input(x: torch.Tensor, range_name: str, *, flip: bool = False, noise_std: float = 0.0,
                   noise_std_max: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 NCHW (already on the device) -> float32 in the configured range, with optional random
    horizontal flip and Gaussian input noise drawn from ``generator`` (per-rank stream). With
    ``noise_std_max`` > ``noise_std`` each example's noise std is drawn log-uniformly between the
    two (several noise scales, as for score-based estimators of image energies)."""
    lo, hi = data_bounds(range_name)
    out = x.to(torch.float32) * ((hi - lo) / 255.0) + lo
    if flip:
        mask = torch.rand(out.shape[0], device=out.device, generator=generator) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    if noise_std > 0:
        std: torch.Tensor | float = noise_std
        if noise_std_max > noise_std:
            u = torch.rand(out.shape[0], device=out.device, generator=generator)
            std = (noise_std * (noise_std_max / noise_std) ** u).view(-1, *([1] * (out.dim() - 1)))
        out = out + std * torch.randn(out.shape, device=out.device, generator=generator)
    return out


def to_uint8(x: torch.Tensor, range_name: str) -> torch.Tensor:
    """Model-range floats -> uint8 (clamped), e.g. to save sample grids."""
    lo, hi = data_bounds(range_name)
    return ((x.detach().float().clamp(lo, hi) - lo) * (255.0 / (hi - lo))).round().to(torch.uint8)


def save_image_grid(images, path: str, nrow: int = 8) -> None:
    """Save uint8 images (NCHW, tensor or array) as one PNG grid, 2 pixels between tiles."""
    from torchvision.utils import save_image

    save_image(torch.as_tensor(images).float() / 255.0, path, nrow=nrow, padding=2)
