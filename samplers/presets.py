"""Default sampling settings for each released SD3 / SD3.5 variant (sources: docs/numerics.md §2, §4).

`PRESETS` are diffusers' (the model cards' steps and CFG, the hub schedulers' shift, Euler, and SD3.5-medium's
skip-layer guidance from diffusers' pipeline docstring): the default, because diffusers is the parity target.
`REFERENCE_PRESETS` (`--preset reference`) are Stability's reference script's (`CONFIGS` in `sd3_infer.py`,
DPM-Solver++(2M)), for "the image the model card shows".
"""

from __future__ import annotations

from dataclasses import dataclass

from samplers.guidance import SLG_SCALE, SLG_START, SLG_STOP, Guidance
from samplers.loop import DEFAULT_SAMPLER

IMAGE_SIZE = 1024  # the releases' image side in pixels (diffusers' default height and width)


@dataclass(frozen=True)
class Preset:
    steps: int
    cfg: float
    shift: float
    slg_layers: tuple[int, ...] = ()  # empty: no skip-layer guidance
    slg_scale: float = SLG_SCALE
    slg_start: float = SLG_START
    slg_stop: float = SLG_STOP
    max_sequence_length: int = 256  # T5 tokens of the prompt (diffusers' default; the built-in model uses fewer)
    sampler: str = DEFAULT_SAMPLER  # one of samplers.SAMPLERS

    @property
    def guidance(self) -> Guidance:
        return Guidance(self.cfg, self.slg_layers, self.slg_scale, self.slg_start, self.slg_stop)


PRESETS: dict[str, Preset] = {
    "sd3-medium": Preset(steps=28, cfg=7.0, shift=3.0),
    "sd3.5-medium": Preset(steps=40, cfg=4.5, shift=3.0, slg_layers=(7, 8, 9)),  # SLG scale and window: the defaults
    "sd3.5-large": Preset(steps=28, cfg=3.5, shift=3.0),
    # Distilled for 4 steps without guidance: cfg 0 switches CFG off, so there is one model call per step.
    "sd3.5-large-turbo": Preset(steps=4, cfg=0.0, shift=3.0),
}

# Stability's reference settings (sd3_infer.py CONFIGS), T5 length 256 as in diffusers (the reference uses 77).
REFERENCE_PRESETS: dict[str, Preset] = {
    "sd3-medium": Preset(steps=50, cfg=5.0, shift=1.0, sampler="dpmpp_2m"),
    "sd3.5-medium": Preset(steps=50, cfg=5.0, shift=3.0, sampler="dpmpp_2m"),
    "sd3.5-large": Preset(steps=40, cfg=4.5, shift=3.0, sampler="dpmpp_2m"),
    # The reference still evaluates the negative prompt at cfg 1; we skip it (the same velocity up to rounding).
    "sd3.5-large-turbo": Preset(steps=4, cfg=1.0, shift=3.0, sampler="euler"),
}
