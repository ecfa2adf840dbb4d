"""The MM-DiT joint block: an image stream and a text stream that share one attention (SD3 paper §4, Fig. 2b).

Each stream keeps its own adaLN-Zero modulation, qkv, output projection and MLP (DiT §3.2); the attention runs
once over the image tokens followed by the text tokens. SD3.5-Medium's MMDiT-X image stream adds an image-only
attention `attn2`, and the last block's text stream only gives keys and values (docs/numerics.md §9.3-§9.6).
Module names are the Stability checkpoint's: `joint_blocks.{i}.x_block.adaLN_modulation.1`, `...attn.qkv`, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SelfAttention, attention, merge_heads

if TYPE_CHECKING:  # the dense package is only needed when a layout is given
    from dense import RegionalAttention, ScoreEdit


@dataclass(frozen=True)
class Modulation:
    """One sub-layer's adaLN vectors, each (B, D): it reads LayerNorm(x)·(1 + scale) + shift, and its output
    joins the residual stream times `gate` (None where nothing reads the output)."""

    shift: Tensor
    scale: Tensor
    gate: Tensor | None = None


@dataclass(frozen=True)
class StreamModulation:
    """A stream's modulations, cut from its adaLN output in checkpoint order: attn, mlp, attn2."""

    attn: Modulation
    mlp: Modulation | None  # None in the last block's text stream
    attn2: Modulation | None  # MMDiT-X image stream only


def layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)  # no affine: the modulation plays that role


def modulate(x: Tensor, m: Modulation) -> Tensor:
    # (B, L, D) by (B, D). Shift added in place, not addcmul: the same bits as diffusers (docs/numerics.md §9.9).
    return (x * (1 + m.scale[:, None])).add_(m.shift[:, None])


def gated_residual(x: Tensor, gate: Tensor, out: Tensor) -> Tensor:
    """x + gate·out, bit for bit, in the memory of the sub-layer's fresh output `out` (docs/numerics.md §9.9)."""
    return out.mul_(gate[:, None]).add_(x)


def clamp_fp16(x: Tensor) -> Tensor:
    """A float16 residual stream held at ±65504 instead of inf; the identity otherwise (docs/numerics.md §9.8)."""
    return x.clamp(-65504.0, 65504.0) if x.dtype == torch.float16 else x


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # GELU in place on fc1's fresh (B, L, 4D) output: the same bits as F.gelu (docs/numerics.md §9.9).
        return self.fc2(torch.ops.aten.gelu_(self.fc1(x), approximate="tanh"))


class StreamBlock(nn.Module):
    """One stream's weights (Stability `DismantledBlock`): `x_block` or `context_block` of a joint block.

    `dual`: MMDiT-X's image-only attention `attn2`. `pre_only`: the last block's text stream, with a (shift,
    scale) modulation and `qkv` only (no output projection, no MLP).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, *, dual: bool = False, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 9 if dual else 6) * dim))
        self.attn = SelfAttention(dim, num_heads, qk_norm, has_proj=not pre_only)
        self.attn2 = SelfAttention(dim, num_heads, qk_norm) if dual else None
        self.mlp = None if pre_only else MLP(dim)

    def modulation(self, vec: Tensor) -> StreamModulation:
        """vec (B, D) -> the stream's shift, scale and gate vectors, each (B, D) (docs/numerics.md §9.3)."""
        v = self.adaLN_modulation(vec)
        if self.pre_only:
            return StreamModulation(Modulation(*v.chunk(2, dim=-1)), mlp=None, attn2=None)
        v = v.chunk(6 if self.attn2 is None else 9, dim=-1)
        attn2 = None if self.attn2 is None else Modulation(*v[6:9])
        return StreamModulation(Modulation(*v[0:3]), Modulation(*v[3:6]), attn2)


class JointBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, dual: bool, last: bool):
        super().__init__()
        self.context_block = StreamBlock(dim, num_heads, qk_norm, pre_only=last)
        self.x_block = StreamBlock(dim, num_heads, qk_norm, dual=dual)

    def forward(
        self, x: Tensor, context: Tensor, vec: Tensor, dense: ScoreEdit | RegionalAttention | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D) image tokens, context (B, S, D) text tokens, vec (B, D) -> updated (x, context);
        context is None after the last block."""
        x_block, context_block = self.x_block, self.context_block
        x_mod, context_mod = x_block.modulation(vec), context_block.modulation(vec)

        # 1. Modulate both streams and project them to heads, each (B, H, L, Dh).
        x_normed = layer_norm(x)  # MMDiT-X's attn2 reads it too
        x_q, x_k, x_v = x_block.attn.qkv_heads(modulate(x_normed, x_mod.attn))
        context_in = modulate(layer_norm(context), context_mod.attn)
        # The last block's text stream only gives keys and values: nothing reads its rows (docs/numerics.md §9.6).
        if context_block.pre_only:
            q = x_q  # (B, H, N, Dh)
            context_k, context_v = context_block.attn.kv_heads(context_in)
        else:
            context_q, context_k, context_v = context_block.attn.qkv_heads(context_in)
            q = torch.cat([x_q, context_q], dim=2)  # (B, H, N+S, Dh)

        # 2. Joint attention, image tokens first: diffusers' order, hence its softmax sums (docs/numerics.md §9.4).
        k = torch.cat([x_k, context_k], dim=2)  # (B, H, N+S, Dh)
        v = torch.cat([x_v, context_v], dim=2)
        out = attention(q, k, v, dense)  # (B, H, N+S, Dh); (B, H, N, Dh) in the last block
        n = x.shape[1]

        # 3. Image stream: gated residuals of the joint attention, MMDiT-X's image-only attention, and the MLP.
        # Each float16 sum is clamped to ±65504 (docs/numerics.md §9.8).
        x = clamp_fp16(gated_residual(x, x_mod.attn.gate, x_block.attn.proj(merge_heads(out[:, :, :n]))))
        if x_block.attn2 is not None:
            x = clamp_fp16(gated_residual(x, x_mod.attn2.gate, x_block.attn2(modulate(x_normed, x_mod.attn2), dense)))
        x = clamp_fp16(gated_residual(x, x_mod.mlp.gate, x_block.mlp(modulate(layer_norm(x), x_mod.mlp))))
        if context_block.pre_only:
            return x, None

        # 4. Text stream: the same, without attn2.
        context = clamp_fp16(gated_residual(context, context_mod.attn.gate,
                                            context_block.attn.proj(merge_heads(out[:, :, n:]))))
        context = clamp_fp16(gated_residual(context, context_mod.mlp.gate,
                                            context_block.mlp(modulate(layer_norm(context), context_mod.mlp))))
        return x, context


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on the image tokens, then a linear map to p·p·C values per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        m = Modulation(*self.adaLN_modulation(vec).chunk(2, dim=-1))
        return self.linear(modulate(layer_norm(x), m))  # (B, N, p*p*C)
