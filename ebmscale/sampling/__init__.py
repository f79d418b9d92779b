"""Samplers: pure functions of (energy function, initial chains, settings, generator)."""
from ebmscale.sampling.langevin import LangevinSettings, langevin, sampling_mode, uniform_noise

__all__ = ["LangevinSettings", "langevin", "sampling_mode", "uniform_noise"]
