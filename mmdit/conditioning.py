"""What the MM-DiT is conditioned on: the token sequence and the pooled vector, built from the text encoders.

A sequence of CLIP tokens followed by T5 tokens, all 4096 wide, and a 2048-wide pooled vector (CLIP-L ‖ CLIP-G),
as diffusers' `encode_prompt` builds them (docs/numerics.md §7). They always travel together, so they are one value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdit.clip import CLIPOutput

# The CLIP length of every released SD3 / SD3.5 model (their tokenizers' model_max_length), and the fallback
# for a tokenizer whose config does not say; a model's own length comes from its tokenizers.
CLIP_TOKENS = 77


@dataclass(frozen=True)
class Conditioning:
    context: Tensor  # (B, S, 4096): S = L_clip CLIP tokens (77 in released models) + L_t5 T5 tokens
    pooled: Tensor  # (B, 2048): CLIP-L pooled ‖ CLIP-G pooled


def assemble(
    clip_l: CLIPOutput, clip_g: CLIPOutput, t5: Tensor | None, *, t5_length: int, context_dim: int
) -> Conditioning:
    """SD3's conditioning from the encoders' outputs, as diffusers' `encode_prompt` builds it (docs/numerics.md §7).

    * context: [CLIP-L ‖ CLIP-G] penultimate states on the channel axis (in CLIP-L's dtype), zero-padded (or, in
      tiny test models, cropped) to `context_dim` channels, then the T5 tokens, or zeros in their place without
      T5: (B, L_clip + t5_length, context_dim), where L_clip is the length the CLIPs ran at (77 when released).
    * pooled: CLIP-L pooled ‖ CLIP-G pooled, (B, 768 + 1280).
    Mixed dtypes are promoted by concatenation exactly as in diffusers.
    """
    B = clip_l.penultimate.shape[0]
    if clip_g.penultimate.shape[0] != B or clip_l.penultimate.shape[1] != clip_g.penultimate.shape[1]:
        raise ValueError(
            f"CLIP-L and CLIP-G sequences differ: {tuple(clip_l.penultimate.shape)} vs "
            f"{tuple(clip_g.penultimate.shape)}; encode the same batch of prompts, both padded to the same CLIP "
            "length (77 in every released model)"
        )
    dtype, device = clip_l.penultimate.dtype, clip_l.penultimate.device
    if t5 is None:
        t5 = torch.zeros(B, t5_length, context_dim, dtype=dtype, device=device)
    elif t5.shape[0] != B or t5.shape[1] != t5_length or t5.shape[2] != context_dim:
        raise ValueError(
            f"T5 tokens have shape {tuple(t5.shape)}, expected ({B}, t5_length={t5_length}, context_dim={context_dim})"
        )
    clip = torch.cat([clip_l.penultimate, clip_g.penultimate.to(dtype)], dim=-1)  # (B, L_clip, 768 + 1280)
    clip = F.pad(clip, (0, context_dim - clip.shape[-1]))  # (B, L_clip, context_dim): zeros, or a crop if negative
    context = torch.cat([clip, t5], dim=-2)  # (B, L_clip + t5_length, context_dim): CLIP first
    pooled = torch.cat([clip_l.pooled, clip_g.pooled], dim=-1)  # (B, 768 + 1280)
    return Conditioning(context=context, pooled=pooled)


def repeat_for_images(c: Conditioning, n: int) -> Conditioning:
    """Each prompt's rows n times in a row (prompt0 x n, prompt1 x n, ...), diffusers' num_images_per_prompt order."""
    if n < 1:
        raise ValueError(f"images per prompt must be at least 1, got {n}")
    return Conditioning(context=c.context.repeat_interleave(n, dim=0), pooled=c.pooled.repeat_interleave(n, dim=0))
