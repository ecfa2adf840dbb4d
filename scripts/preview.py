"""A look at SD3 latents without the VAE: one fixed linear map from the 16 latent channels to RGB.

Each latent pixel z (16 numbers) becomes rgb = Wᵀz + b, then [-1, 1] -> [0, 255]. No network runs, so it costs
nothing per sampling step; it shows colours and layout at 1/8 of the image's resolution, not detail.

The 16x3 matrix W and the bias b are the numbers ComfyUI publishes for SD3 latents (comfy/latent_formats.py, class
`SD3`, `latent_rgb_factors` and `latent_rgb_factors_bias`; comfyanonymous/ComfyUI, checked at commit 040a3243).
ComfyUI applies them to the latents its sampler works on, which are the MM-DiT's latents here: the VAE's latent
after `(z - shift_factor) * scaling_factor` (mmdit/vae.py). They were fitted to real SD3 VAE latents, so on the
built-in random model the colours mean nothing; the map is the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (16, 3): row c is latent channel c's contribution to (R, G, B).
LATENT_RGB_FACTORS = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)
LATENT_RGB_BIAS = (0.2394, 0.2135, 0.1925)


def latent_to_rgb(latents: Tensor) -> Tensor:
    """(B, 16, h, w) MM-DiT latents -> (B, 3, h, w) float32 RGB, roughly in [-1, 1] (not clamped)."""
    if latents.ndim != 4 or latents.shape[1] != len(LATENT_RGB_FACTORS):
        raise ValueError(
            f"expected SD3 latents of shape (B, {len(LATENT_RGB_FACTORS)}, h, w), got {tuple(latents.shape)}")
    weight = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32, device=latents.device)  # (16, 3)
    bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32, device=latents.device)  # (3,)
    rgb = torch.einsum("bchw,cr->brhw", latents.float(), weight)  # (B, 3, h, w)
    return rgb + bias[None, :, None, None]


def latent_preview(latents: Tensor, scale: int = 1) -> Tensor:
    """(B, 16, h, w) latents -> (B, h·scale, w·scale, 3) uint8 preview images (nearest-neighbour enlarged)."""
    rgb = ((latent_to_rgb(latents) + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1], like the decoded image
    if scale > 1:
        rgb = rgb.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
