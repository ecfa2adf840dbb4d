"""DPM-Solver++(2M), the sampler of Stability's reference code for SD3 / SD3.5, on rectified-flow sigmas.

Lu et al. 2022, "DPM-Solver++" (arXiv 2211.01095), Algorithm 2 ("2M": second order, multistep), in the form of
k-diffusion's ``sample_dpmpp_2m``, which Stability's ``sd3_impls.py`` and ComfyUI's ``dpmpp_2m`` both use as it
is. It works on the data prediction x̂0; for a flow model that predicts the velocity v = noise − x0 at
x_σ = (1 − σ)·x0 + σ·noise, the prediction is x̂0 = x − σ·v (ComfyUI's ``ModelSamplingDiscreteFlow``,
``calculate_denoised``).

With λ = −log σ and h = λ_next − λ, one step is

    x_next = (σ_next / σ)·x − expm1(−h)·D

where D is x̂0 (first step, and the step that lands on σ = 0, which therefore returns x̂0 itself), or, on every
other step, the extrapolation D = (1 + 1/(2r))·x̂0 − (1/(2r))·x̂0_prev with r = h_prev / h. Note that λ here is
the log-sigma of k-diffusion, not the flow's half-log-SNR log((1 − σ)/σ): this is the reference's sampler, not
diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def denoised(x: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """The flow model's data prediction x̂0 = x − σ·v, in float32 (the reference's samplers work in float32)."""
    return x.to(torch.float32) - sigma.to(torch.float32) * v.to(torch.float32)


def _lam(sigma: Tensor) -> Tensor:
    return sigma.log().neg()  # λ = −log σ (+inf at σ = 0)


def dpmpp_2m_step(x: Tensor, x0: Tensor, x0_prev: Tensor | None, sigma_prev: Tensor | None, sigma: Tensor,
                  sigma_next: Tensor) -> Tensor:
    """One DPM-Solver++(2M) step from σ to σ_next (0-dim float32 tensors), given this step's x̂0 and, after the
    first step, the previous step's x̂0 and σ. Returns x_next in float32."""
    lam, lam_next = _lam(sigma), _lam(sigma_next)
    h = lam_next - lam
    ratio = (-lam_next).exp() / (-lam).exp()  # σ_next / σ, written as the reference computes it
    d = x0
    if x0_prev is not None and sigma_prev is not None and sigma_next != 0:
        r = (lam - _lam(sigma_prev)) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    return ratio * x.to(torch.float32) - (-h).expm1() * d
