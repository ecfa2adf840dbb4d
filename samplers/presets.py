"""Default sampling settings for each released SD3 / SD3.5 variant.

Sources (docs/numerics.md §2, §4): the schedule shift is the hub scheduler config (3.0 for all four
models); steps and CFG scale are the model cards' diffusers usage; the SLG recipe for SD3.5-medium is the one
diffusers' pipeline docstring gives (layers 7, 8, 9, scale 2.8, window 0.01–0.2).

Stability's reference script (the ``CONFIGS`` table of ``sd3_infer.py``) ships other defaults, and samples with
DPM-Solver++(2M): those are ``REFERENCE_PRESETS`` (``--preset reference``), for "the image the model card shows";
the default stays diffusers' (Euler), because diffusers is our parity target. Reference values: SD3-medium shift
1.0 / 50 steps / cfg 5.0; SD3.5-medium 50 steps / cfg 5.0 with SLG off by default; SD3.5-large 40 steps /
cfg 4.5; Large Turbo 4 steps, Euler, cfg 1.0 (the reference still evaluates the negative prompt; with cfg ≤ 1
we skip it, which gives the same velocity up to rounding). ComfyUI's SLG node defaults to scale 3.0 and stop 0.15.
"""

from __future__ import annotations

from dataclasses import dataclass

from samplers.guidance import Guidance


@dataclass(frozen=True)
class Preset:
    steps: int
    cfg: float
    shift: float
    slg_layers: tuple[int, ...] = ()  # empty: no skip-layer guidance
    slg_scale: float = 2.8
    slg_start: float = 0.01
    slg_stop: float = 0.2
    max_sequence_length: int = 256  # T5 tokens of the prompt (diffusers' default; the built-in model uses fewer)
    sampler: str = "euler"  # one of samplers.SAMPLERS

    @property
    def guidance(self) -> Guidance:
        return Guidance(self.cfg, self.slg_layers, self.slg_scale, self.slg_start, self.slg_stop)


PRESETS: dict[str, Preset] = {
    "sd3-medium": Preset(steps=28, cfg=7.0, shift=3.0),
    "sd3.5-medium": Preset(
        steps=40, cfg=4.5, shift=3.0, slg_layers=(7, 8, 9), slg_scale=2.8, slg_start=0.01, slg_stop=0.2
    ),
    "sd3.5-large": Preset(steps=28, cfg=3.5, shift=3.0),
    # Distilled for 4 steps without guidance: cfg 0 switches CFG off, so there is one model call per step.
    "sd3.5-large-turbo": Preset(steps=4, cfg=0.0, shift=3.0),
}

# Stability's reference settings (sd3_infer.py CONFIGS), T5 length 256 as in diffusers (the reference uses 77).
REFERENCE_PRESETS: dict[str, Preset] = {
    "sd3-medium": Preset(steps=50, cfg=5.0, shift=1.0, sampler="dpmpp_2m"),
    "sd3.5-medium": Preset(steps=50, cfg=5.0, shift=3.0, sampler="dpmpp_2m"),
    "sd3.5-large": Preset(steps=40, cfg=4.5, shift=3.0, sampler="dpmpp_2m"),
    "sd3.5-large-turbo": Preset(steps=4, cfg=1.0, shift=3.0, sampler="euler"),
}
