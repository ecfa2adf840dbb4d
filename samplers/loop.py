"""The text-to-image sampling loop: noise in, clean latent out.

Implements the denoising loop of diffusers' ``StableDiffusion3Pipeline.__call__`` (docs/numerics.md §4) as a
pure function: the model is any callable, the schedule is a tensor, and nothing is counted behind the
caller's back, so the same arguments always give the same result. Initial noise follows docs/numerics.md §5.

Per step i, with B images:

1. CFG on: the model sees the doubled batch ``[x, x]`` against ``[negative, positive]`` conditioning (negative
   first), at time ``t_i = σ_i·1000`` for every row; the two halves are combined with :func:`cfg`.
   CFG off: one pass over ``x`` with the positive conditioning.
2. SLG on and inside its step window: one more pass over the positive rows only, with some blocks skipped.
3. :func:`euler_step` from σ_i to σ_{i+1} (``sampler="euler"``, diffusers' scheduler), or a DPM-Solver++(2M) step
   on the data prediction x̂0 = x − σ_i·v (``"dpmpp_2m"``, Stability's reference sampler; samplers/dpmpp.py).
4. Inpainting: the part of the latent outside the mask is put back to the init image's latent, noised to
   σ_{i+1} (:class:`Inpaint`).

Image-to-image starts later in the same schedule (``first_step``, from :func:`samplers.schedule.first_step`), on
the init image's latent noised to σ_first (:func:`samplers.schedule.noised`), as diffusers'
``StableDiffusion3Img2ImgPipeline`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mmdit.conditioning import Conditioning
from mmdit.errors import InputError
from samplers.dpmpp import denoised, dpmpp_2m_step
from samplers.euler import euler_step
from samplers.guidance import Guidance, cfg, slg, slg_active
from samplers.schedule import noised, timesteps

SAMPLERS = ("euler", "dpmpp_2m")
DEFAULT_SAMPLER = "euler"  # diffusers' scheduler; "dpmpp_2m" is Stability's reference sampler


@dataclass(frozen=True)
class Inpaint:
    """What inpainting keeps: outside the mask, the latent is the init image's, at the current noise level.

    After every step, diffusers' ``StableDiffusion3InpaintPipeline`` replaces the latent by
    ``(1 − mask)·noised(image, σ_{i+1}) + mask·x`` (the image un-noised after the last step), so only the masked
    region (mask 1) is generated; the noise is the same draw that started the run.
    """

    image: Tensor  # (B, C, h, w) the init image's latent
    mask: Tensor  # (B, 1, h, w) 1 where the image is repainted, 0 where it is kept
    noise: Tensor  # (B, C, h, w)

    def blend(self, x: Tensor, sigma_next: Tensor, last: bool) -> Tensor:
        kept = self.image if last else noised(self.image, self.noise, sigma_next)
        return (1 - self.mask) * kept + self.mask * x


@dataclass(frozen=True)
class ModelCall:
    """What the denoiser is asked to do, besides x, t and the conditioning.

    Denoisers that treat prompts specially (DenseDiffusion's attention modulation) need to know which rows
    of the batch carry the positive prompt and where in the run they are.
    """

    step: int  # index into the schedule: this call evaluates the model at σ_step
    positive: slice  # batch rows with the positive prompt: the second half under CFG, all rows otherwise
    skip_layers: tuple[int, ...] = ()  # transformer blocks to bypass (the SLG pass only)


# (x (B, C, h, w), t (B,) = σ·1000 float32, conditioning with batch B, call) -> velocity (B, C, h, w)
Denoiser = Callable[[Tensor, Tensor, Conditioning, ModelCall], Tensor]


def sample(
    denoise: Denoiser,
    noise: Tensor,
    sigmas: Tensor,
    positive: Conditioning,
    negative: Conditioning | None,
    guidance: Guidance,
    *,
    callback: Callable[[int, Tensor], None] | None = None,
    sampler: str = DEFAULT_SAMPLER,
    first_step: int = 0,
    inpaint: Inpaint | None = None,
) -> Tensor:
    """Integrate from ``noise`` (B, C, h, w) at ``σ_0 = 1`` down the schedule ``sigmas`` (N+1,) to a clean latent.

    Image-to-image: ``noise`` is the init image's latent noised to ``σ_first_step`` and the run starts at step
    ``first_step`` (steps keep their indices, so SLG windows and DenseDiffusion schedules are those of the
    whole run). ``inpaint`` keeps the unmasked part of the image after every step.

    ``positive``/``negative`` hold one row per image (batch B); ``negative`` is only used, and then required,
    when ``guidance.cfg_on``. ``callback(i, x)`` is called after step i with the new latent. Returns the
    final latent in the model's output dtype (see :func:`euler_step`); decode it with the VAE.

    Because σ_0 = 1, the starting point ``x_1 = (1 − 1)·x0 + 1·noise`` is the noise itself, unscaled. Give it
    in the model's dtype (``initial_noise(..., dtype=model_dtype)``): diffusers draws the latents in the
    dtype of the prompt embeddings, and the first model call sees them as they are.
    """
    batch = noise.shape[0]
    _check_inputs(noise, sigmas, positive, negative, guidance)
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    sigmas = sigmas.to(device=noise.device, dtype=torch.float32)  # diffusers keeps σ on the model's device
    times = timesteps(sigmas)  # (N,)
    steps = times.shape[0]

    if guidance.cfg_on:
        assert negative is not None  # checked above
        # Concatenated once, outside the loop: rows [0, B) negative, rows [B, 2B) positive.
        cond = Conditioning(
            context=torch.cat([negative.context, positive.context]),  # (2B, S, D)
            pooled=torch.cat([negative.pooled, positive.pooled]),  # (2B, P)
        )
        rows = slice(batch, 2 * batch)
    else:
        cond = positive
        rows = slice(0, batch)

    if not 0 <= first_step < steps:
        raise InputError(f"first_step must be in [0, {steps}), got {first_step}")
    x, x0_prev = noise, None
    for i in range(first_step, steps):
        t = times[i]  # 0-dim: one time for the whole batch
        x_in = torch.cat([x, x]) if guidance.cfg_on else x  # (2B or B, C, h, w)
        v = denoise(x_in, t.expand(x_in.shape[0]), cond, ModelCall(step=i, positive=rows))

        if guidance.cfg_on:
            v_uncond, v_cond = v.chunk(2)  # (B, C, h, w) each
            v = cfg(v_uncond, v_cond, guidance.scale)
            if guidance.slg_on and slg_active(i, steps, guidance.slg_start, guidance.slg_stop):
                # Positive prompt only, on the un-doubled latent, with the chosen blocks bypassed.
                call = ModelCall(step=i, positive=slice(0, batch), skip_layers=guidance.slg_layers)
                v_skip = denoise(x, t.expand(batch), positive, call)
                v = slg(v, v_cond, v_skip, guidance.slg_scale)

        if sampler == "euler":
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        else:
            x0 = denoised(x, v, sigmas[i])
            x = dpmpp_2m_step(x, x0, x0_prev, sigmas[i - 1] if x0_prev is not None else None, sigmas[i],
                              sigmas[i + 1]).to(v.dtype)
            x0_prev = x0
        if inpaint is not None:
            x = inpaint.blend(x, sigmas[i + 1], last=i == steps - 1)
        if callback is not None:
            callback(i, x)
    return x


def initial_noise(
    batch: int,
    height: int,
    width: int,
    seed: int,
    channels: int = 16,
    dtype: torch.dtype = torch.float32,
    *,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Seeded Gaussian noise (B, C, H/8, W/8) for images of ``height`` × ``width`` pixels.

    The same draw as diffusers with ``generator=torch.Generator("cpu").manual_seed(seed)``: one float32 draw on
    the CPU for the whole batch (so image 0 of a batch equals a single-image draw with the same seed), then
    cast and moved. Drawing on the CPU makes a seed give the same image on every device.
    """
    if batch < 1:
        raise InputError(f"batch must be at least 1, got {batch}")
    for name, size in (("height", height), ("width", width)):
        if size < 8 or size % 8:
            raise InputError(f"{name} must be a positive multiple of 8 pixels (16 for SD3's 2×2 patches), got {size}")
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, channels, height // 8, width // 8)  # the VAE downsamples 8×
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def _check_inputs(
    noise: Tensor, sigmas: Tensor, positive: Conditioning, negative: Conditioning | None, guidance: Guidance
) -> None:
    if noise.ndim != 4:
        raise InputError(f"noise must be a latent batch (B, C, h, w), got shape {tuple(noise.shape)}")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise InputError(
            f"sigmas must be a 1-D schedule of N+1 >= 2 values, got shape {tuple(sigmas.shape)}; "
            "build one with samplers.sigmas(steps, shift)"
        )
    batch = noise.shape[0]
    if positive.context.shape[0] != batch or positive.pooled.shape[0] != batch:
        raise InputError(
            f"positive conditioning has batch {positive.context.shape[0]} (pooled {positive.pooled.shape[0]}) "
            f"but the noise has batch {batch}; repeat the conditioning once per image"
        )
    if not guidance.cfg_on:
        return
    if negative is None:
        raise InputError(
            f"guidance scale {guidance.scale} > 1 turns classifier-free guidance on, which needs a negative "
            "Conditioning (encode the negative prompt, or the empty prompt ''); or use a scale <= 1"
        )
    if negative.context.shape != positive.context.shape or negative.pooled.shape != positive.pooled.shape:
        raise InputError(
            f"negative conditioning shapes context {tuple(negative.context.shape)}, pooled "
            f"{tuple(negative.pooled.shape)} must equal the positive ones {tuple(positive.context.shape)}, "
            f"{tuple(positive.pooled.shape)} (same batch and token count) to be batched together for CFG"
        )
