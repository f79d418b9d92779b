"""Samplers: pure functions of (energy function, initial chains, settings, generator)."""
from ebmscale.sampling.langevin import (InputGradScaler, LangevinSettings, NoiseFn, checkpoint_units, langevin,
                                         sampling_mode, uniform_noise)
from ebmscale.sampling.mala import acceptance_rate, energy_and_grad, mala

__all__ = ["acceptance_rate", "energy_and_grad", "mala", "InputGradScaler", "LangevinSettings", "NoiseFn", "checkpoint_units", "langevin", "sampling_mode",
           "uniform_noise"]
