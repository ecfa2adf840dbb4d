"""The rectified-flow noise schedule SD3 samples with.

Implements the default path of diffusers' ``FlowMatchEulerDiscreteScheduler`` (``__init__`` + ``set_timesteps``;
docs/numerics.md §2); it is also Stability's ``SD3Inferencer.get_sigmas`` (``sd3_infer.py``) up to the
float64 arithmetic, and ComfyUI's "normal" scheduler.

Rectified flow in three lines (Esser et al. 2024, "Scaling Rectified Flow Transformers", §2):

* a noisy latent at noise level σ ∈ [0, 1] is the straight line ``x_σ = (1 − σ)·x0 + σ·noise``;
* the model predicts the velocity of that line, ``v = dx_σ/dσ = noise − x0``;
* sampling walks the line backwards from pure noise (σ = 1) to the image (σ = 0), one Euler step per σ gap.

SD3 spends more steps at high noise than a uniform grid would, by *shifting* each σ:
``shifted(σ) = a·σ / (1 + (a − 1)·σ)`` with ``a = 3`` for every released SD3/SD3.5 model. The shift fixes both
ends (0 ↦ 0, 1 ↦ 1) and pushes everything in between towards 1.

Why the low end is shifted twice: the scheduler first builds a 1000-entry training table
``shifted(k/1000), k = 1..1000`` and takes ``sigma_min`` from it, so ``sigma_min = shifted(0.001)`` ≈ 0.002994.
``set_timesteps`` then spaces N values linearly between ``1000·sigma_max`` and ``1000·sigma_min`` and shifts them
*again*. σ = 1 is a fixed point of the shift, so the top is unaffected, but the last non-zero σ becomes
``shifted(shifted(0.001))`` ≈ 0.008929 (for a = 3), not 0.002994. This is an accident inherited from the
reference code, yet every SD3 pipeline reproduces it, so a faithful engine must too (docs/numerics.md §2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmdit.errors import InputError

# The models were trained on t = σ·1000 with t ∈ {1, …, 1000}.
NUM_TRAIN_TIMESTEPS = 1000


def shifted(sigma: Tensor | float, shift: float) -> Tensor | float:
    """The SD3 time shift ``a·σ / (1 + (a − 1)·σ)``, evaluated in the dtype of ``sigma``.

    The operation order (multiply, then divide by the shifted denominator) matches diffusers, which matters
    for bit-exact float32/float64 results.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshifted(sigma: Tensor | float, shift: float) -> Tensor | float:
    """Inverse of :func:`shifted`: the uniform-grid time ``u`` with ``shifted(u) = σ``.

    Solving ``σ = a·u / (1 + (a − 1)·u)`` for ``u`` gives ``u = σ / (a − (a − 1)·σ)``. DenseDiffusion's
    modulation schedule is defined on this un-shifted time, so it does not depend on the model's shift.
    """
    return sigma / (shift - (shift - 1) * sigma)


def sigmas(steps: int, shift: float) -> Tensor:
    """The N+1 noise levels of an N-step sampling run: float32, ``σ_0 = 1`` down to ``σ_N = 0``.

    Equal (``torch.equal``) to ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``'s
    ``scheduler.sigmas``. Step ``i`` moves the latent from ``σ_i`` to ``σ_{i+1}``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not shift > 0:
        raise InputError(f"shift must be a positive number (SD3/SD3.5 use 3.0), got {shift!r}")

    # The end points come from the float32 training table (t = 1000 and t = 1), shifted once, then read back
    # as Python floats, exactly as the scheduler's constructor does.
    table_ends = torch.tensor([NUM_TRAIN_TIMESTEPS, 1], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    sigma_max, sigma_min = (float(s) for s in shifted(table_ends, shift))

    # numpy.linspace in float64, written out: start + i·step, with the last point set exactly to the end.
    # (torch.linspace fills its second half backwards from the end, so its float64 values can differ in the
    # last bit; following numpy keeps even the float64 intermediates identical to diffusers'.)
    start, stop = sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS
    t = torch.arange(steps, dtype=torch.float64)
    if steps > 1:
        t = t * ((stop - start) / (steps - 1)) + start
        t[-1] = stop
    else:
        t = t + start  # a single step starts at pure noise

    # Second shift (see the module docstring), still in float64; only the result is rounded to float32.
    s = shifted(t / NUM_TRAIN_TIMESTEPS, shift).to(torch.float32)  # (N,)
    return torch.cat([s, s.new_zeros(1)])  # (N+1,) the last step lands on the clean image


def timesteps(sigmas: Tensor) -> Tensor:
    """The model's time input for each step: ``σ_i·1000`` in float32 for i < N (the final 0 is never fed).

    Equal to the scheduler's ``timesteps``: fractional values such as 987.3806, never rounded to integers.
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise InputError(f"sigmas must be a 1-D schedule of N+1 >= 2 values, got shape {tuple(sigmas.shape)}")
    return sigmas[:-1] * NUM_TRAIN_TIMESTEPS  # (N,)


DEFAULT_STRENGTH = 0.6  # image to image: diffusers' default for its img2img and inpainting pipelines


def first_step(steps: int, strength: float) -> int:
    """Where image-to-image starts in an N-step schedule: diffusers' ``get_timesteps``,
    ``int(max(N − min(N·strength, N), 0))``, so strength 1 starts at pure noise (step 0) and smaller strengths
    skip the first steps; the run then has N − first_step steps."""
    if not 0 < strength <= 1:
        raise InputError(f"strength must be in (0, 1], got {strength} (1: ignore the init image's content, "
                         "small: stay close to it)")
    return int(max(steps - min(steps * strength, steps), 0))  # < steps for any strength > 0: one step at least


def noised(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The forward process ``σ·noise + (1 − σ)·x0`` at one noise level (diffusers' ``scale_noise``, same order of
    operations, σ cast to x0's dtype as it does)."""
    sigma = sigma.to(device=x0.device, dtype=x0.dtype)
    return sigma * noise + (1.0 - sigma) * x0
