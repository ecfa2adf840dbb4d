"""Text-to-image, put together: settings, the denoiser, sampling, decoding.

This is the top of the library (scripts -> loaders -> mmdit / samplers / dense). It only composes: the
networks are in `mmdit`, the loop in `samplers`, the layout control in `dense`. Each function takes what it
needs already loaded, so the caller decides when a component is loaded and freed (the CLI loads them one stage
at a time so that peak memory is about the largest component).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmdit.conditioning import Conditioning
from mmdit.model import MMDiT
from mmdit.vae import VAE, decode, to_uint8
from samplers import Denoiser, Guidance, ModelCall, Preset, initial_noise, sample, sigmas

if TYPE_CHECKING:
    from dense import DensePlan


@dataclass(frozen=True)
class Settings:
    """Everything besides the prompt and the weights that decides the image."""

    steps: int
    cfg: float
    shift: float
    seed: int = 0
    height: int = 1024
    width: int = 1024
    slg_layers: tuple[int, ...] = ()
    slg_scale: float = 2.8
    slg_start: float = 0.01
    slg_stop: float = 0.2

    @classmethod
    def from_preset(cls, preset: Preset, **overrides) -> Settings:
        """The preset's values, with every override that is not None taking precedence."""
        values = {k: getattr(preset, k) for k in ("steps", "cfg", "shift", "slg_layers", "slg_scale", "slg_start", "slg_stop")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def guidance(self) -> Guidance:
        return Guidance(self.cfg, self.slg_layers, self.slg_scale, self.slg_start, self.slg_stop)

    def to_dict(self) -> dict:
        return {**asdict(self), "slg_layers": list(self.slg_layers)}


def denoiser(model: MMDiT, dense: DensePlan | None = None) -> Denoiser:
    """The MM-DiT as the sampler calls it; with a layout, each call gets its DenseDiffusion attention."""

    def denoise(x: Tensor, t: Tensor, cond: Conditioning, call: ModelCall) -> Tensor:
        attention = None
        if dense is not None:
            attention = dense.for_call(call.step, call.positive, skip_layers=call.skip_layers)
        return model(x, t, cond.context, cond.pooled, skip_layers=call.skip_layers, dense=attention)

    return denoise


def generate_latents(
    model: MMDiT,
    positive: Conditioning,
    negative: Conditioning | None,
    settings: Settings,
    *,
    callback: Callable[[int, Tensor], None] | None = None,
    dense: DensePlan | None = None,
) -> Tensor:
    """Final latents (B, C, H/8, W/8) for the B rows of `positive`, in the model's dtype and device.

    The noise is drawn once for the whole batch from a CPU generator seeded with `settings.seed`, as
    diffusers does with one generator, so the same seed gives the same image.
    """
    param = next(model.parameters())
    noise = initial_noise(
        positive.context.shape[0], settings.height, settings.width, settings.seed,
        channels=model.config.in_channels, dtype=param.dtype, device=param.device,
    )
    cast = lambda c: None if c is None else Conditioning(c.context.to(param), c.pooled.to(param))  # noqa: E731
    schedule = sigmas(settings.steps, settings.shift)
    return sample(denoiser(model, dense), noise, schedule, cast(positive), cast(negative), settings.guidance,
                  callback=callback)


def decode_images(vae: VAE, latents: Tensor) -> Tensor:
    """Latents -> (B, H, W, 3) uint8 images, rounded as diffusers' image processor rounds."""
    return to_uint8(decode(vae, latents.to(next(vae.parameters()).device)))
