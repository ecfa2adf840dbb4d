"""The built-in model: a tiny SD3.5-Medium-shaped model trained on a world of coloured shapes, shipped in place.

It exists so that every command runs on a fresh machine with no download and no access token, and draws
something a person can check: 128x128 scenes of one to three circles, squares and triangles in red, green,
blue and yellow on grey, from captions such as "a red circle and a blue square". The files are committed, laid
out as Stability ships SD3.5, and read where they are by the ordinary loaders:

    builtin-model/sd3.5_tiny.safetensors         MM-DiT (model.diffusion_model.*, float16) + VAE (first_stage_model.*)
    builtin-model/text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors
    builtin-model/tokenizer/, tokenizer_2/, tokenizer_3/   (trained by the project on a built-in text)

Widths are tiny, but every head is 64 wide, as in the released models, so the same shape-based config
inference loads it with no extra information. How it is trained (`python -m scripts.builtin.train`, its world
and detector in scripts/builtin/shapes.py) and what it can do: docs/builtin-model.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from mmdit.clip import CLIPConfig
from mmdit.conditioning import CLIP_TOKENS
from mmdit.errors import MissingInputError
from mmdit.model import MMDiTConfig
from mmdit.t5 import T5Config
from mmdit.vae import VAEConfig
from samplers import Preset

MODEL_DIR = Path(__file__).resolve().parent / "builtin-model"
FILE_NAME = "sd3.5_tiny.safetensors"

# The built-in tokenizers' vocabularies (trained by scripts/builtin/tokenizers.py): CLIP 512 byte-level symbols,
# 486 merges and 2 specials; T5 512 SentencePiece pieces and the 100 <extra_id_k> added on load.
CLIP_VOCAB_SIZE = 1000
T5_VOCAB_SIZE = 612
T5_WIDTH = 256  # the prompt embeddings' width (4096 in the real model)
TRANSFORMER = MMDiTConfig(
    depth=6, num_heads=2, head_dim=64, pos_embed_max_size=16, context_dim=T5_WIDTH, pooled_dim=64 + 128,
    qk_norm=True, dual_attention_layers=(0, 1, 2),
)
VAE_CONFIG = VAEConfig(base_channels=32, channel_multipliers=(1, 2, 2, 2), num_res_blocks=1, norm_groups=32)


def clip_configs(max_positions: int = CLIP_TOKENS) -> tuple[CLIPConfig, CLIPConfig]:
    """CLIP-L's and CLIP-G's configs with `max_positions` positions (77 by default, as released).

    The training script draws the CLIPs at 77 positions and keeps the first `--clip-length` (16 in the shipped
    model, whose tokenizers say that model_max_length: `write_builtin_tokenizers(root, clip_length)` in
    scripts/builtin/tokenizers.py); the world's captions take at most 13 CLIP tokens, so the MM-DiT attends over 16
    CLIP tokens instead of 77.
    """
    clip_l = CLIPConfig(vocab_size=CLIP_VOCAB_SIZE, width=64, num_layers=3, num_heads=1, mlp_width=256,
                        max_positions=max_positions, projection_dim=64, activation="quick_gelu")
    clip_g = CLIPConfig(vocab_size=CLIP_VOCAB_SIZE, width=128, num_layers=3, num_heads=2, mlp_width=512,
                        max_positions=max_positions, projection_dim=128, activation="gelu")
    return clip_l, clip_g


T5 = T5Config(vocab_size=T5_VOCAB_SIZE, d_model=T5_WIDTH, d_ff=512, num_layers=2, num_heads=4, d_kv=64, num_buckets=32)

# Tuned on the trained model (docs/builtin-model.md); 16 T5 tokens hold the longest caption of its world.
PRESET = Preset(steps=20, cfg=4.5, shift=3.0, max_sequence_length=16)
SIZE = 128  # the only image size it was trained at (8x8 latent patches)


def builtin_model() -> Path:
    """The built-in single file, read in place (committed with the code; nothing is built or downloaded)."""
    path = MODEL_DIR / FILE_NAME
    if not path.is_file():
        raise MissingInputError(
            f"the built-in model is missing: {path} does not exist. It ships with the repository; restore it "
            "with `git checkout loaders/builtin-model`, or retrain it with `python -m scripts.builtin.train`"
        )
    return path


def position_table(dim: int = TRANSFORMER.dim, grid: int = TRANSFORMER.pos_embed_max_size) -> Tensor:
    """The built-in model's stored positions: the centre grid×grid of a 2grid×2grid sin-cos table.

    Training starts from this table and keeps it fixed (SD3's is fixed too). Its values are those a 32×32
    table has at the centre, so a 128-pixel image's 8×8 patches (cropped from the centre, as SD3 crops) get
    the positions they would get from a table of twice the size.
    """
    big = sincos_table(2 * grid, dim).reshape(2 * grid, 2 * grid, dim)
    return big[grid // 2 : grid // 2 + grid, grid // 2 : grid // 2 + grid].reshape(1, grid * grid, dim)


def sincos_table(grid: int, dim: int) -> Tensor:
    """(1, grid², dim) 2-D sin-cos positions: first half of the channels encode the column, second the row."""
    pos = torch.arange(grid, dtype=torch.float64)
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    axis = torch.outer(pos, freqs)  # (grid, dim/4)
    axis = torch.cat([axis.sin(), axis.cos()], dim=-1)  # (grid, dim/2)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([axis[cols.flatten()], axis[rows.flatten()]], dim=-1)
    return table[None].float()
