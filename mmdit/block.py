"""The MM-DiT joint block: two streams (image `x_block`, text `context_block`) that share one attention.

SD3 paper §4, Fig. 2b: each stream keeps its own weights (adaLN modulation, qkv, output projection, MLP), but
the attention runs once over the concatenated tokens, so image and text read each other both ways. Every
sub-layer is adaLN-Zero modulated by the conditioning vector (DiT §3.2): LayerNorm without affine, then
x·(1 + scale) + shift, and the sub-layer's output is multiplied by a gate before it joins the residual.

Variants, each a small class or one flag rather than a bag of options:
* `StreamBlock`: the ordinary stream (6 modulation vectors: shift, scale, gate for attention and for MLP).
  With `dual=True` it is SD3.5-Medium's MMDiT-X image stream: a second, image-only self-attention `attn2` with
  its own 3 vectors, fed from the same LayerNorm output (Stability `mmditx.py`, `x_block_self_attn`).
* `PreOnlyBlock`: the text stream of the last block, which only contributes q, k, v (nothing reads its output).
Names follow the Stability checkpoint: `joint_blocks.{i}.x_block.adaLN_modulation.1`, `...attn.qkv`, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SelfAttention, attention, merge_heads

if TYPE_CHECKING:  # the dense package is only needed when a layout is given
    from dense import ScoreEdit


def layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)  # no affine: the modulation plays that role


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    # (B, L, D) by (B, D) per sample. The shift is added in place: one new (B, L, D) tensor instead of two, and
    # the same two roundings as `x * (1 + scale) + shift` (torch.addcmul would fuse them into one, changing bits).
    return (x * (1 + scale[:, None])).add_(shift[:, None])


def gated_residual(x: Tensor, gate: Tensor, out: Tensor) -> Tensor:
    """x + gate·out for a sub-layer's fresh output `out` (B, L, D), computed in `out`'s memory.

    Bit for bit `x + gate[:, None] * out` (the same product, then the same sum; addition commutes exactly), but
    without two new (B, L, D) tensors: on a CPU a fresh large tensor costs its page faults, which at SD3.5-Large
    width take as long as the arithmetic (docs/numerics.md §9.9).
    """
    return clamp_fp16(out.mul_(gate[:, None]).add_(x))


def clamp_fp16(x: Tensor) -> Tensor:
    """A float16 residual stream that passed ±65504 is held there instead of becoming inf, which the next
    LayerNorm would turn into NaN for the whole token (docs/numerics.md §9.8). Any other dtype is returned as it
    is, and finite float16 values are unchanged, so no result without an overflow changes by a bit."""
    return x.clamp(-65504.0, 65504.0) if x.dtype == torch.float16 else x


@dataclass(frozen=True)
class Modulation:
    """One sub-layer's adaLN-Zero vectors, each (B, D)."""

    shift: Tensor
    scale: Tensor
    gate: Tensor


@dataclass(frozen=True)
class Prepared:
    """What a stream hands to the joint attention, and what it keeps for after it."""

    qkv: tuple[Tensor, Tensor, Tensor]  # each (B, H, L, Dh)
    mods: tuple[Modulation, ...]  # attention, MLP[, image-only attention]
    normed: Tensor  # LayerNorm(x), (B, L, D): the dual block feeds it to attn2 too


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # GELU in place on fc1's fresh (B, L, 4D) output: the widest tensor of the block is not allocated twice
        # (the same kernel as F.gelu, so the same bits; under autograd torch keeps the input it needs).
        return self.fc2(torch.ops.aten.gelu_(self.fc1(x), approximate="tanh"))


class StreamBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, dual: bool = False):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (9 if dual else 6) * dim))
        self.attn = SelfAttention(dim, num_heads, qk_norm)
        self.attn2 = SelfAttention(dim, num_heads, qk_norm) if dual else None
        self.mlp = MLP(dim)

    def pre_attention(self, x: Tensor, vec: Tensor) -> Prepared:
        chunks = self.adaLN_modulation(vec).chunk(9 if self.attn2 is not None else 6, dim=-1)
        mods = tuple(Modulation(*chunks[i : i + 3]) for i in range(0, len(chunks), 3))
        normed = layer_norm(x)
        return Prepared(self.attn.qkv_heads(modulate(normed, mods[0].shift, mods[0].scale)), mods, normed)

    def post_attention(self, x: Tensor, attn_out: Tensor, prep: Prepared, dense: ScoreEdit | None) -> Tensor:
        """attn_out: this stream's rows of the joint attention output, (B, L, D)."""
        msa, mlp = prep.mods[0], prep.mods[1]
        x = gated_residual(x, msa.gate, self.attn.proj(attn_out))
        if self.attn2 is not None:  # MMDiT-X: image-only attention, added after the joint one
            msa2 = prep.mods[2]
            q, k, v = self.attn2.qkv_heads(modulate(prep.normed, msa2.shift, msa2.scale))
            x = gated_residual(x, msa2.gate, self.attn2.proj(merge_heads(attention(q, k, v, dense))))
        return gated_residual(x, mlp.gate, self.mlp(modulate(layer_norm(x), mlp.shift, mlp.scale)))


class PreOnlyBlock(nn.Module):
    """The last block's text stream: modulation (shift, scale), then keys and values for the image tokens.

    Nothing reads this stream's attention output, so its queries are not computed at all (the checkpoint still
    holds their weights, in the fused `qkv`). diffusers and the Stability reference compute the text rows of
    the attention and throw them away; skipping them changes no result and saves that work.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.attn = SelfAttention(dim, num_heads, qk_norm, has_proj=False)

    def keys_values(self, c: Tensor, vec: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.attn.kv_heads(modulate(layer_norm(c), shift, scale))  # each (B, H, S, Dh)


class JointBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, dual: bool, last: bool):
        super().__init__()
        self.context_block = PreOnlyBlock(dim, num_heads, qk_norm) if last else StreamBlock(dim, num_heads, qk_norm)
        self.x_block = StreamBlock(dim, num_heads, qk_norm, dual=dual)

    def forward(
        self, x: Tensor, c: Tensor, vec: Tensor, dense: ScoreEdit | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D) image tokens, c (B, S, D) text tokens, vec (B, D) -> updated (x, c); c is None after the last block."""
        px = self.x_block.pre_attention(x, vec)
        if isinstance(self.context_block, PreOnlyBlock):  # the last block: only the image tokens ask
            kc, vc = self.context_block.keys_values(c, vec)
            q, (kx, vx) = px.qkv[0], px.qkv[1:]
            k, v = torch.cat([kx, kc], dim=2), torch.cat([vx, vc], dim=2)  # (B, H, N+S, Dh); q (B, H, N, Dh)
            return self.x_block.post_attention(x, merge_heads(attention(q, k, v, dense)), px, dense), None
        pc = self.context_block.pre_attention(c, vec)
        # Image tokens first, then text: diffusers' order, so the softmax sums run in the same order.
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(px.qkv, pc.qkv))  # (B, H, N+S, Dh)
        out = attention(q, k, v, dense)  # (B, H, N+S, Dh)
        # Split by token before merging heads, so each stream's projection gets a contiguous (B, L, D) matrix.
        n = x.shape[1]
        x = self.x_block.post_attention(x, merge_heads(out[:, :, :n]), px, dense)
        return x, self.context_block.post_attention(c, merge_heads(out[:, :, n:]), pc, None)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on the image tokens, then a linear map to p·p·C values per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))  # (B, N, p*p*C)
