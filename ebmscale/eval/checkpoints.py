"""Evaluation entry points that start from a checkpoint (model rebuilt from its saved config)."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ebmscale.checkpoint import load_weights, run_dir_of
from ebmscale.config import TOY_DATASETS, Config, ConfigError, from_dict
from ebmscale.models import build_model


def load_energy_model(path: str, prefer_ema: bool = True) -> tuple[Config, nn.Module, dict]:
    """(config, model in eval mode with EMA weights when present, ``{"config", "step", "model",
    "ema"}``) from a checkpoint step directory, a run directory (its newest complete checkpoint)
    or an ``ebmscale export`` file (``.safetensors``)."""
    state = load_weights(path)
    cfg = from_dict(state["config"])
    from ebmscale.data import data_shape

    model = build_model(cfg.model, data_shape(cfg))
    weights = state["ema"] if prefer_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    return cfg, model.eval().requires_grad_(False), state


def toy_nll_from_checkpoint(path: str, grid: int = 512, out_dir: str | None = None, kde: dict | None = None
                            ) -> dict:
    """Exact test NLL (quadrature log Z) of a 2-D checkpoint beside the true NLL and a KDE whose
    bandwidth is chosen on a validation split; writes ``eval_toy_nll.json`` and
    the density plots. ``kde``: a precomputed ``ebmscale.eval.toy.kde_nll`` result for this
    checkpoint's data (it depends on the data only), so evaluating many runs pays for it once."""
    from ebmscale.data import toy_splits
    from ebmscale.data.toy import get_toy
    from ebmscale.eval.toy import evaluate_toy

    cfg, model, state = load_energy_model(path)
    if cfg.data.dataset not in TOY_DATASETS:
        raise ConfigError(f"eval toy-nll needs a 2-D toy checkpoint; '{path}' was trained on '{cfg.data.dataset}'")
    out_dir = out_dir or run_dir_of(path)
    os.makedirs(out_dir, exist_ok=True)
    splits = toy_splits(cfg)

    def energy_fn(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    result = evaluate_toy(energy_fn, get_toy(cfg.data.dataset), splits, out_dir=out_dir,
                          n_grid=grid, kde=kde)
    result = {"dataset": cfg.data.dataset, "step": int(state["step"]), **result}
    with open(os.path.join(out_dir, "eval_toy_nll.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result
