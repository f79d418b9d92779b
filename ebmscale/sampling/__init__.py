"""Samplers: pure functions of (energy function, initial chains, settings, generator)."""
from ebmscale.sampling.langevin import (InputGradScaler, LangevinSettings, NoiseFn, checkpoint_units, langevin,
                                         sampling_mode, uniform_noise)

__all__ = ["InputGradScaler", "LangevinSettings", "NoiseFn", "checkpoint_units", "langevin", "sampling_mode",
           "uniform_noise"]
