"""Energy networks (pure nn.Modules) and the factory that builds one from ``ModelConfig``."""
from __future__ import annotations

from torch import nn

from ebmscale.models.common import apply_spectral_norm, count_parameters, make_activation

__all__ = ["build_model", "apply_spectral_norm", "count_parameters", "make_activation"]


def build_model(cfg, data_shape: tuple[int, ...]) -> nn.Module:
    """Build the energy network for ``cfg`` (a ``ModelConfig``) and samples of ``data_shape``
    (``(2,)`` for toy data, ``(C, H, W)`` for images)."""
    if cfg.arch == "mlp":
        from ebmscale.models.mlp import MLPEnergy
        return MLPEnergy(in_dim=data_shape[0], width=cfg.width, depth=cfg.depth, activation=cfg.activation,
                         leaky_slope=cfg.leaky_slope, spectral_norm=cfg.spectral_norm,
                         num_classes=cfg.num_classes if cfg.conditional else 0)
    if cfg.arch == "cnn":
        from ebmscale.models.convnet import ConvNetEnergy
        return ConvNetEnergy(in_channels=data_shape[0], resolution=data_shape[-1], width=cfg.width, depth=cfg.depth,
                             activation=cfg.activation, leaky_slope=cfg.leaky_slope, spectral_norm=cfg.spectral_norm,
                             num_classes=cfg.num_classes)
    if cfg.arch == "resnet":
        from ebmscale.models.resnet import SmallResNetEnergy
        return SmallResNetEnergy(in_channels=data_shape[0], resolution=data_shape[-1], width=cfg.width,
                                 blocks_per_stage=cfg.depth, activation=cfg.activation,
                                 leaky_slope=cfg.leaky_slope, spectral_norm=cfg.spectral_norm,
                                 num_classes=cfg.num_classes, conditional=cfg.conditional)
    if cfg.arch == "igebm":
        from ebmscale.models.igebm import build_igebm
        return build_igebm(cfg, data_shape)
    if cfg.arch == "wrn":
        from ebmscale.models.wrn import build_wrn
        return build_wrn(cfg, data_shape)
    raise ValueError(f"unknown model.arch '{cfg.arch}'")
