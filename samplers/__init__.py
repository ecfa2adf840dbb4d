"""Rectified-flow sampling for SD3 / SD3.5 (pure functions): schedule, guidance, Euler and DPM-Solver++(2M) steps,
the loop."""

from __future__ import annotations

from samplers.dpmpp import denoised, dpmpp_2m_step
from samplers.euler import euler_step
from samplers.guidance import SLG_SCALE, SLG_START, SLG_STOP, Guidance, cfg, slg, slg_active
from samplers.presets import IMAGE_SIZE, PRESETS, REFERENCE_PRESETS, Preset
from samplers.loop import DEFAULT_SAMPLER, SAMPLERS, Denoiser, Inpaint, ModelCall, initial_noise, sample
from samplers.schedule import DEFAULT_STRENGTH, first_step, noised, shifted, sigmas, timesteps, unshifted

__all__ = [
    "DEFAULT_SAMPLER",
    "DEFAULT_STRENGTH",
    "IMAGE_SIZE",
    "PRESETS",
    "REFERENCE_PRESETS",
    "SAMPLERS",
    "SLG_SCALE",
    "SLG_START",
    "SLG_STOP",
    "Denoiser",
    "Guidance",
    "Inpaint",
    "ModelCall",
    "Preset",
    "cfg",
    "denoised",
    "dpmpp_2m_step",
    "euler_step",
    "first_step",
    "initial_noise",
    "noised",
    "sample",
    "shifted",
    "sigmas",
    "slg",
    "slg_active",
    "timesteps",
    "unshifted",
]
