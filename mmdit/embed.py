"""The MM-DiT's inputs turned into tokens and into the conditioning vector.

* Patches: a p×p, stride-p convolution (DiT, Peebles & Xie 2023, §3.2 "patchify") plus a fixed 2-D sin-cos
  position table that is *stored in the checkpoint* as a square M×M grid and cropped at its centre to the
  image's patch grid (Stability `mmditx.py: PatchEmbed`, `cropped_pos_embed`).
* Timestep: the sinusoidal frequency embedding of t = σ·1000 (256 channels, cos first) through an MLP.
* Pooled text: the 2048-wide CLIP-L ‖ CLIP-G vector through an MLP.
The timestep and pooled embeddings are summed into the vector that drives every adaLN modulation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """`x_embedder.proj`: (B, C, H, W) latents -> (B, (H/p)(W/p), D) tokens, row-major over the patch grid."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        # contiguous, or the residual stream would keep the conv's (B, D, N) memory order (docs/numerics.md §9.2)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, D, h, w) -> (B, h*w, D)


def cropped_pos_embed(table: Tensor, h: int, w: int) -> Tensor:
    """The centre h×w window of the stored (1, M*M, D) position table, as (1, h*w, D).

    The window starts at ((M-h)//2, (M-w)//2): centred, and one patch towards the top/left when M-h is odd.
    """
    m = math.isqrt(table.shape[1])
    if h > m or w > m:
        raise ValueError(
            f"a {h}x{w} patch grid does not fit the model's {m}x{m} position table; "
            f"the largest image this model supports is {m * 16}x{m * 16} pixels"
        )
    top, left = (m - h) // 2, (m - w) // 2
    grid = table.reshape(1, m, m, table.shape[-1])
    return grid[:, top : top + h, left : left + w].reshape(1, h * w, table.shape[-1])


def timestep_frequencies(t: Tensor, channels: int = 256, max_period: float = 10000.0) -> Tensor:
    """(B,) times -> (B, channels) = [cos(t·f_j), sin(t·f_j)], f_j = max_period^(-j / (channels/2)), float32."""
    half = channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """`mlp`: Linear -> SiLU -> Linear. Used for the timestep (`t_embedder`) and pooled text (`y_embedder`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)
