"""The built-in model: a tiny, randomly initialised SD3.5-Medium-shaped model, laid out like the official release.

It exists so that every command runs on a fresh machine with no download and no access token: the whole
pipeline (tokenizers, three text encoders, MM-DiT with dual attention and QK-norm, VAE) runs for real, only on
random weights, so its images look like coloured noise. Files, as Stability ships SD3.5:

    builtin-v1/sd3.5_tiny.safetensors          MM-DiT (model.diffusion_model.*) + VAE (first_stage_model.*)
    builtin-v1/text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors
    builtin-v1/tokenizer/, tokenizer_2/, tokenizer_3/   (trained by the project on a built-in text)

Widths are tiny, but every head is 64 wide, as in the released models, so the same shape-based config
inference loads it with no extra information. It is written once into a cache folder (`$SD3_MINIMAL_CACHE`,
else `$XDG_CACHE_HOME/sd3-minimal`, else `~/.cache/sd3-minimal`) and reused.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mmdit.clip import CLIPConfig, CLIPTextModel
from mmdit.model import MMDiT, MMDiTConfig
from mmdit.t5 import T5Config, T5Encoder
from mmdit.vae import VAE, VAEConfig
from samplers import Preset

from .builtin_tokenizers import CLIP_VOCAB_SIZE, T5_VOCAB_SIZE, write_builtin_tokenizers

VERSION = "builtin-v1"  # bump when anything below changes, so caches are rebuilt
FILE_NAME = "sd3.5_tiny.safetensors"
SEED = 20240612

T5_WIDTH = 256  # the prompt embeddings' width (4096 in the real model)
TRANSFORMER = MMDiTConfig(
    depth=4, num_heads=2, head_dim=64, pos_embed_max_size=32, context_dim=T5_WIDTH, pooled_dim=64 + 128,
    qk_norm=True, dual_attention_layers=(0, 1),
)
VAE_CONFIG = VAEConfig(base_channels=32, channel_multipliers=(1, 2, 2, 2), num_res_blocks=1, norm_groups=32)
CLIP_L = CLIPConfig(vocab_size=CLIP_VOCAB_SIZE, width=64, num_layers=3, num_heads=1, mlp_width=256,
                    max_positions=77, projection_dim=64, activation="quick_gelu")
CLIP_G = CLIPConfig(vocab_size=CLIP_VOCAB_SIZE, width=128, num_layers=3, num_heads=2, mlp_width=512,
                    max_positions=77, projection_dim=128, activation="gelu")
T5 = T5Config(vocab_size=T5_VOCAB_SIZE, d_model=T5_WIDTH, d_ff=512, num_layers=2, num_heads=4, d_kv=64, num_buckets=32)

# The SD3.5-Medium recipe scaled to 4 blocks: fewer steps, SLG on a middle block.
PRESET = Preset(steps=10, cfg=4.5, shift=3.0, slg_layers=(2,), slg_scale=2.8, slg_start=0.01, slg_stop=0.2)
SIZE = 128  # default image side in pixels (8x8 latent patches)


def cache_root() -> Path:
    if os.environ.get("SD3_MINIMAL_CACHE"):
        return Path(os.environ["SD3_MINIMAL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sd3-minimal"


def sincos_table(grid: int, dim: int) -> Tensor:
    """(1, grid², dim) 2-D sin-cos positions: first half of the channels encode the column, second the row."""
    pos = torch.arange(grid, dtype=torch.float64)
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    axis = torch.outer(pos, freqs)  # (grid, dim/4)
    axis = torch.cat([axis.sin(), axis.cos()], dim=-1)  # (grid, dim/2)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([axis[cols.flatten()], axis[rows.flatten()]], dim=-1)
    return table[None].float()


def _randomize(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw every parameter: matrices ~ N(0, 1/fan_in), biases small, norm weights near 1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    return module


def _state(module: nn.Module, prefix: str = "", dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    return {prefix + k: v.to(dtype).contiguous() for k, v in module.state_dict().items()}


def write_builtin(folder: Path) -> None:
    """Write the whole built-in model into `folder` (which must be empty or absent)."""
    g = torch.Generator().manual_seed(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    mmdit = _randomize(MMDiT(TRANSFORMER), g)
    mmdit.pos_embed.copy_(sincos_table(TRANSFORMER.pos_embed_max_size, TRANSFORMER.dim))
    vae = _randomize(VAE(VAE_CONFIG), g)
    save_file({**_state(mmdit, "model.diffusion_model."), **_state(vae, "first_stage_model.")}, str(folder / FILE_NAME))
    encoders = folder / "text_encoders"
    encoders.mkdir(exist_ok=True)
    clip_l = _state(_randomize(CLIPTextModel(CLIP_L), g))
    del clip_l["text_projection.weight"]  # as in Stability's clip_l.safetensors: SD3 uses CLIP-L unprojected
    save_file(clip_l, str(encoders / "clip_l.safetensors"))
    save_file(_state(_randomize(CLIPTextModel(CLIP_G), g)), str(encoders / "clip_g.safetensors"))
    save_file(_state(_randomize(T5Encoder(T5), g), dtype=torch.float16), str(encoders / "t5xxl_fp16.safetensors"))
    write_builtin_tokenizers(folder)


def builtin_model(cache: Path | None = None) -> Path:
    """The built-in single file, written on first use. Safe when two processes race: each builds in a
    private temporary folder and the first rename wins."""
    root = Path(cache) if cache is not None else cache_root()
    final = root / VERSION
    if (final / FILE_NAME).is_file():
        return final / FILE_NAME
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        write_builtin(work)
        try:
            work.rename(final)
        except OSError:  # someone else finished first
            pass
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return final / FILE_NAME
