"""Tiny, randomly initialised reference models built with diffusers, shared by the core tests.

Every parameter is re-drawn (norm weights around 1, biases non-zero) so a comparison cannot pass on
defaults: a swapped shift/scale or a missing norm weight shows up as a large difference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from loaders.builtin import CLIP_VOCAB_SIZE, MODEL_DIR, T5_VOCAB_SIZE
from tests import random_weights


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    return random_weights.randomize_(module, torch.Generator().manual_seed(seed)).eval()


def builtin_tokenizers(root: Path, clip_length: int = 77) -> Path:
    """The built-in model's tokenizer folders (tokenizer/, tokenizer_2/, tokenizer_3/) copied under `root`, both
    CLIP tokenizers' model_max_length set to `clip_length` (the shipped files say 16; 77 as released). The files
    are byte for byte those `scripts/builtin/tokenizers.py` writes for that length. Returns `root`."""
    root = Path(root)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(MODEL_DIR / name, root / name)
    for name in ("tokenizer", "tokenizer_2"):
        path = root / name / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8")) | {"model_max_length": clip_length}
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return root


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


def tiny_text_pipeline(root, clip_length: int = 77):
    """A tiny StableDiffusion3Pipeline with all three text encoders, saved in both official layouts.

    root/diffusers: `save_pretrained`. root/single: model.safetensors (MM-DiT + VAE), text_encoders/ and the
    tokenizer folders beside it, as Stability's SD3.5 repos ship them. Returns the in-memory pipeline.
    Tokenizers are the project's built-in ones (offline); the reference loads them with transformers.
    `clip_length`: the CLIP tokenizers' model_max_length and the CLIP encoders' positions (77 as released).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5TokenizerFast

    root = Path(root)
    toks = builtin_tokenizers(root / "tokenizers", clip_length)

    def clip(width, heads, act, seed):
        torch.manual_seed(seed)
        cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=3, num_attention_heads=heads, max_position_embeddings=clip_length,
                             hidden_act=act, projection_dim=width, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        return randomize_(CLIPTextModelWithProjection(cfg), seed)

    clip_l, clip_g = clip(64, 1, "quick_gelu", 11), clip(128, 2, "gelu", 12)
    with torch.no_grad():  # SD3's CLIP-L projection is the identity (docs/numerics.md §8.1)
        clip_l.text_projection.weight.copy_(torch.eye(64))
    torch.manual_seed(13)
    t5 = randomize_(T5EncoderModel(T5Config(vocab_size=T5_VOCAB_SIZE, d_model=256, d_kv=64, d_ff=128, num_layers=2,
                                            num_heads=4, relative_attention_num_buckets=32,
                                            relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                                            dropout_rate=0.0)), 13)
    transformer = diffusers_transformer("sd3.5-medium", joint_attention_dim=256, pooled_projection_dim=64 + 128)
    vae = diffusers_vae()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=CLIPTokenizer.from_pretrained(toks / "tokenizer"),
        text_encoder_2=clip_g, tokenizer_2=CLIPTokenizer.from_pretrained(toks / "tokenizer_2"),
        text_encoder_3=t5, tokenizer_3=T5TokenizerFast.from_pretrained(toks / "tokenizer_3"),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "diffusers")
    single = root / "single"
    (single / "text_encoders").mkdir(parents=True)
    write_single_file(single / "model.safetensors", transformer.state_dict(), vae.state_dict())
    l_sd = {k: v for k, v in clip_l.state_dict().items() if k != "text_projection.weight"}  # as Stability ships it
    save_file({k: v.contiguous() for k, v in l_sd.items()}, str(single / "text_encoders" / "clip_l.safetensors"))
    save_file({k: v.contiguous() for k, v in clip_g.state_dict().items()}, str(single / "text_encoders" / "clip_g.safetensors"))
    t5_sd = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5_sd, str(single / "text_encoders" / "t5xxl_fp16.safetensors"))
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(toks / name, single / name)
    return pipe
