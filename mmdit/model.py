"""The MM-DiT of Stable Diffusion 3 / 3.5 and its configuration, read from the weights.

One class serves SD3 Medium, SD3.5 Medium (MMDiT-X) and SD3.5 Large / Large Turbo (docs/numerics.md §9.1).
Forward (SD3 paper §4, Fig. 2): patchify + position table -> image tokens; t and pooled text -> the vector that
modulates everything; text tokens through `context_embedder`; the joint blocks; final adaLN + linear; unpatchify.
It predicts the velocity v = noise - x0 (rectified flow, paper §2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor, nn

from .block import FinalLayer, JointBlock
from .embed import MLPEmbedder, PatchEmbed, cropped_pos_embed, timestep_frequencies
from .errors import InputError

if TYPE_CHECKING:
    from dense import RegionalAttention, ScoreEdit

    from .streaming import BlockStreamer

# Keys every SD3-family MM-DiT has (Stability layout, prefix stripped); their absence means "not SD3".
REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "t_embedder.mlp.0.weight",
    "y_embedder.mlp.0.weight",
    "context_embedder.weight",
    "joint_blocks.0.x_block.attn.qkv.weight",
    "final_layer.linear.weight",
)


class NotSD3Error(InputError):
    """The weights are not an SD3 / SD3.5 MM-DiT."""


def _shape(v: Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


@dataclass(frozen=True)
class MMDiTConfig:
    depth: int
    num_heads: int
    head_dim: int
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192
    context_dim: int = 4096  # T5-XXL width: the width of the prompt embeddings
    pooled_dim: int = 2048  # CLIP-L (768) + CLIP-G (1280)
    qk_norm: bool = True
    dual_attention_layers: tuple[int, ...] = ()

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def variant(self) -> str:
        """The released model this architecture is (Large and Large-Turbo share one architecture)."""
        if self.dual_attention_layers:
            return "sd3.5-medium"
        return "sd3.5-large" if self.qk_norm else "sd3-medium"

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor | Sequence[int]], num_heads: int | None = None) -> MMDiTConfig:
        """Everything from tensor names and shapes (Stability layout, `model.diffusion_model.` stripped).

        The head size is read from the QK-norm weight when there is one. SD3 Medium has no QK-norm; there the
        Stability convention holds (64-wide heads, as many heads as blocks, `mmditx.py`), unless `num_heads`
        says otherwise (tiny test models).
        """
        missing = [k for k in REQUIRED_KEYS if k not in sd]
        if missing:
            sample = ", ".join(sorted(sd)[:5]) or "no tensors at all"
            raise NotSD3Error(
                f"not an SD3 / SD3.5 MM-DiT checkpoint: it lacks {missing} (its first keys: {sample}). "
                "Give an SD3-family .safetensors file (e.g. sd3.5_large.safetensors) or a diffusers folder."
            )
        dim, in_channels, p, _ = _shape(sd["x_embedder.proj.weight"])
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
        depth = max(blocks) + 1
        qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in sd
        if qk_norm:
            head_dim = _shape(sd["joint_blocks.0.x_block.attn.ln_q.weight"])[0]
            heads = dim // head_dim
        else:
            heads = num_heads or depth
            head_dim = dim // heads
        if num_heads is not None and num_heads != heads:
            raise ValueError(f"num_heads={num_heads} contradicts the {head_dim}-wide QK-norm weights (D={dim})")
        if heads * head_dim != dim:
            raise InputError(f"width {dim} does not split into {heads} heads; pass num_heads explicitly")
        dual = tuple(sorted(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd))
        return cls(
            depth=depth,
            num_heads=heads,
            head_dim=head_dim,
            patch_size=p,
            in_channels=in_channels,
            out_channels=_shape(sd["final_layer.linear.weight"])[0] // (p * p),
            pos_embed_max_size=math.isqrt(_shape(sd["pos_embed"])[1]),
            context_dim=_shape(sd["context_embedder.weight"])[1],
            pooled_dim=_shape(sd["y_embedder.mlp.0.weight"])[1],
            qk_norm=qk_norm,
            dual_attention_layers=dual,
        )


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.dim
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        # A fixed sin-cos table, but stored in the checkpoint: load it rather than recompute it.
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size**2, d))
        self.t_embedder = MLPEmbedder(256, d)
        self.y_embedder = MLPEmbedder(cfg.pooled_dim, d)
        self.context_embedder = nn.Linear(cfg.context_dim, d)
        self.joint_blocks = nn.ModuleList(
            JointBlock(d, cfg.num_heads, cfg.qk_norm, dual=i in cfg.dual_attention_layers, last=i == cfg.depth - 1)
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels)
        # Set by `mmdit.streaming.offload_blocks`: the blocks then live in host memory and visit the device to run.
        self.streamer: BlockStreamer | None = None

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        pooled: Tensor,
        skip_layers: Sequence[int] = (),
        dense: ScoreEdit | RegionalAttention | None = None,
    ) -> Tensor:
        """Predict the velocity.

        x (B, C, H, W) latents; t (B,) = σ·1000 as float; context (B, S, context_dim); pooled (B, pooled_dim).
        `skip_layers`: blocks not run at all (skip-layer guidance). `dense`: the layout control of this call,
        DenseDiffusion's score edit or Regional Prompting's attention (whose context then holds the regional prompts
        after the base prompt's tokens: docs/layout-control.md).
        Returns (B, C_out, H, W).
        """
        p = self.config.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise InputError(f"latent size {H}x{W} is not a multiple of the patch size {p}")
        h, w = H // p, W // p
        tokens = self.x_embedder(x)  # (B, h*w, D)
        tokens = (tokens + cropped_pos_embed(self.pos_embed, h, w)).to(tokens.dtype)
        vec = self.t_embedder(timestep_frequencies(t).to(pooled.dtype)) + self.y_embedder(pooled)  # (B, D)
        context = self.context_embedder(context)  # (B, S, D)
        index = [i for i in range(len(self.joint_blocks)) if i not in skip_layers]
        blocks = [self.joint_blocks[i] for i in index]
        for i, block in zip(index, blocks if self.streamer is None else self.streamer.stream(blocks)):
            # a block's own layout attention: Regional Prompting masks only every `interval`-th block
            tokens, context = block(tokens, context, vec, dense.for_block(i) if dense is not None else None)
        out = self.final_layer(tokens, vec)  # (B, h*w, p*p*C)
        return rearrange(out, "B (h w) (p q C) -> B C (h p) (w q)", h=h, p=p, q=p)
