"""Classifier-free guidance and skip-layer guidance on velocities.

Implements the guidance arithmetic of ``StableDiffusion3Pipeline.__call__`` (docs/numerics.md §4). Both are
linear in the model outputs, so doing them on velocities (diffusers) or on x0 predictions (Stability's
``CFGDenoiser`` / ``SkipLayerCFGDenoiser`` in ``sd3_impls.py``) is the same thing up to rounding.

* CFG (Ho & Salimans 2022): extrapolate from the unconditional (negative-prompt) prediction through the
  conditional one, ``v = v_u + g·(v_c − v_u)``. It costs a second model evaluation, done as one doubled batch,
  and is only applied when ``g > 1``: at ``g ≤ 1`` diffusers skips the negative pass entirely (Large Turbo).
* SLG (Stability's SD3.5-medium recipe): run the positive prompt once more with some transformer blocks
  skipped, and push away from that degraded prediction, ``v += (v_c − v_skip)·s``. Only on a few early steps,
  where global structure is decided.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mmdit.errors import InputError


def cfg(v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``v_u + g·(v_c − v_u)``, in the model's dtype (no upcast), like diffusers."""
    return v_uncond + scale * (v_cond - v_uncond)


def slg_active(step: int, steps: int, start: float, stop: float) -> bool:
    """Whether step ``step`` (0-based) of ``steps`` gets the skip-layer pass: ``steps·start < step < steps·stop``.

    Both inequalities are strict, so step 0 never qualifies; with the default window (0.01, 0.2) this is
    steps 1–7 of 40, 1–5 of 28 and 1 of 10.
    """
    return steps * start < step < steps * stop


def slg(v: Tensor, v_cond: Tensor, v_skip: Tensor, scale: float) -> Tensor:
    """Add skip-layer guidance ``(v_c − v_skip)·s`` to the already CFG-combined velocity ``v``."""
    return v + (v_cond - v_skip) * scale


# diffusers' `StableDiffusion3Pipeline.__call__` defaults (skip_layer_guidance_scale / _start / _stop), which
# SD3.5-medium's recipe uses: the one place they are stated (presets and loaders.pipeline.Settings read them).
SLG_SCALE = 2.8
SLG_START = 0.01
SLG_STOP = 0.2


@dataclass(frozen=True)
class Guidance:
    """How to combine model evaluations into one velocity per step.

    ``scale`` is the CFG scale g. SLG is configured by ``slg_layers`` (transformer block indices to skip in the
    extra pass; empty = no SLG), its scale and its step window as fractions of the run.
    """

    scale: float
    slg_layers: tuple[int, ...] = ()
    slg_scale: float = SLG_SCALE
    slg_start: float = SLG_START
    slg_stop: float = SLG_STOP

    def __post_init__(self) -> None:
        if not isinstance(self.slg_layers, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.slg_layers
        ):
            raise InputError(f"slg_layers must be a tuple of block indices >= 0, like (7, 8, 9): {self.slg_layers!r}")
        if not 0.0 <= self.slg_start <= self.slg_stop:
            raise InputError(f"need 0 <= slg_start <= slg_stop, got start={self.slg_start}, stop={self.slg_stop}")

    @property
    def cfg_on(self) -> bool:
        """CFG runs (and needs a negative prompt) only for scale > 1, as in diffusers."""
        return self.scale > 1

    @property
    def slg_on(self) -> bool:
        """SLG needs CFG (diffusers only applies it inside the CFG branch) and at least one layer to skip."""
        return self.cfg_on and len(self.slg_layers) > 0
