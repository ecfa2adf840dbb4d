"""Rectified-flow sampling for SD3 / SD3.5: schedule, guidance, Euler steps and the loop (pure functions)."""

from __future__ import annotations

from samplers.euler import euler_step
from samplers.guidance import Guidance, cfg, slg, slg_active
from samplers.presets import PRESETS, Preset
from samplers.loop import Denoiser, ModelCall, initial_noise, sample
from samplers.schedule import shifted, sigmas, timesteps, unshifted

__all__ = [
    "PRESETS",
    "Denoiser",
    "Guidance",
    "ModelCall",
    "Preset",
    "cfg",
    "euler_step",
    "initial_noise",
    "sample",
    "shifted",
    "sigmas",
    "slg",
    "slg_active",
    "timesteps",
    "unshifted",
]
