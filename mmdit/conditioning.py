"""What the MM-DiT is conditioned on: the token sequence and the pooled vector.

SD3 conditions every step on two tensors built from the three text encoders (diffusers' `encode_prompt`,
docs/numerics.md §7): a sequence of CLIP tokens followed by the T5 tokens, all 4096 wide, and a 2048-wide
pooled vector (CLIP-L ‖ CLIP-G). They always travel together, so they are one value.

The CLIP part is as long as the CLIP tokenizers pad to, their `model_max_length` (diffusers'
`StableDiffusion3Pipeline.tokenizer_max_length`): 77 in every released model, so it is not fixed here;
`loaders.text.clip_length` reads it and this module takes whatever length the encoders were run at.
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

    * context = [CLIP-L ‖ CLIP-G] penultimate states on the channel axis (both cast to CLIP-L's dtype),
      zero-padded on the right to `context_dim` channels, then the T5 tokens appended on the token axis:
      (B, L_clip, 768 + 1280) -> (B, L_clip, context_dim) -> (B, L_clip + t5_length, context_dim), where L_clip
      is the length the CLIPs were run at (77 in every released model). If the CLIP channels
      are wider than `context_dim` (only in tiny test models) they are cropped, as F.pad with a negative pad does.
    * Without T5 (`t5` None) its place is taken by zeros (B, t5_length, context_dim) in CLIP-L's dtype
      (diffusers >= 0.36; older versions used 77 tokens there).
    * pooled = CLIP-L pooled ‖ CLIP-G pooled: (B, 768 + 1280).
    Mixed dtypes are promoted by concatenation exactly as in diffusers (which never casts the pooled
    vectors or the T5 tokens).
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
