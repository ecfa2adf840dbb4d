"""Tiny, randomly initialised reference models built with diffusers, shared by the core tests.

Every parameter is re-drawn (norm weights around 1, biases non-zero) so a comparison cannot pass on
defaults: a swapped shift/scale or a missing norm weight shows up as a large difference.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # norm weights
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return module.eval()


# Tiny configurations of each released architecture (diffusers constructor arguments).
TINY = {
    "sd3-medium": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, qk_norm=None, dual_attention_layers=()),
    "sd3.5-medium": dict(num_layers=3, num_attention_heads=2, attention_head_dim=16, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "sd3.5-large": dict(num_layers=2, num_attention_heads=4, attention_head_dim=8, qk_norm="rms_norm", dual_attention_layers=()),
}


def diffusers_transformer(variant: str, *, seed: int = 0, joint_attention_dim: int = 64, pooled_projection_dim: int = 48,
                          pos_embed_max_size: int = 16, **overrides):
    from diffusers import SD3Transformer2DModel

    args = dict(TINY[variant])
    args.update(overrides)
    heads, head_dim = args["num_attention_heads"], args["attention_head_dim"]
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16,
        caption_projection_dim=heads * head_dim, joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=pos_embed_max_size, **args,
    )
    return randomize_(model, seed)


def diffusers_vae(seed: int = 0, block_out_channels=(32, 32, 32, 32)):
    """A tiny 16-channel AutoencoderKL with SD3's latent constants; 32 groups, as in the real VAE, because a
    Stability single file carries no config to say otherwise."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels), block_out_channels=block_out_channels,
        layers_per_block=1, latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609, sample_size=64,
    )
    return randomize_(vae, seed + 1)


def write_single_file(path, transformer_sd: dict, vae_sd: dict, extra: dict | None = None) -> None:
    """Diffusers state dicts -> one Stability-layout .safetensors file (our key maps)."""
    from safetensors.torch import save_file

    from loaders.transformer_keys import transformer_from_diffusers
    from loaders.vae_keys import vae_from_diffusers

    tensors = {f"model.diffusion_model.{k}": v for k, v in transformer_from_diffusers(transformer_sd).items()}
    tensors.update({f"first_stage_model.{k}": v for k, v in vae_from_diffusers(vae_sd).items()})
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
