"""One Euler step of the rectified-flow ODE, with diffusers' precision.

Implements ``FlowMatchEulerDiscreteScheduler.step`` (docs/numerics.md §3) without the hidden step counter: the
caller passes the two noise levels. Stability's k-diffusion Euler (``sample_euler`` in ``sd3_impls.py``) is the
same update up to rounding.

The latent moves along ``dx/dσ = v`` from ``σ`` to ``σ_next < σ``: ``x_next = x + (σ_next − σ)·v``. On the
final step ``σ_next = 0``, so ``x_next = x − σ·v``, which is exactly the model's estimate of the clean latent.
"""

from __future__ import annotations

import torch
from torch import Tensor


def euler_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """Advance ``x`` (B, C, h, w) at noise level ``sigma`` to ``sigma_next`` using the velocity ``v``.

    Precision, bit for bit as diffusers:

    * the latent is upcast to float32 so small updates are not lost in a bf16/fp16 accumulator;
    * ``dt = σ_next − σ`` is a 0-dim float32 tensor; 0-dim tensors do not decide the result dtype, so
      ``dt·v`` is computed in v's dtype (dt is rounded to e.g. bf16 first) and only the sum with the latent
      is float32;
    * the result is cast back to v's dtype, which is how a float32 initial noise becomes a bf16 latent after
      the first step of a bf16 model.

    ``sigma``/``sigma_next`` are normally consecutive entries of :func:`samplers.schedule.sigmas` (0-dim float32
    tensors on x's device); Python floats are rounded to float32 first.
    """
    if x.shape != v.shape:
        raise ValueError(f"latent and velocity shapes differ: x {tuple(x.shape)} vs v {tuple(v.shape)}")
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    if sigma.ndim != 0 or sigma_next.ndim != 0:
        raise ValueError("sigma and sigma_next must be scalars (0-dim tensors or floats)")
    dt = sigma_next - sigma  # 0-dim float32, negative: σ decreases towards the image
    x_next = x.to(torch.float32) + dt * v  # fp32 island: the latent accumulates many small updates
    return x_next.to(v.dtype)
