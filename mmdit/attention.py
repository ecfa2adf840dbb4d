"""Multi-head attention for the MM-DiT: fused qkv, per-head RMS QK-norm, and the one attention function.

SD3 paper (Esser et al. 2024, "Scaling Rectified Flow Transformers", §4) joins image and text tokens into one
sequence and runs ordinary softmax attention over it; SD3.5 adds RMS normalisation of q and k per head (the
paper's §5.3.2 "QK-normalization") to keep the attention logits bounded at scale.

`attention(q, k, v)` is where the scores live. The plain path is one call to
`F.scaled_dot_product_attention`. With a DenseDiffusion `dense` value (dense-spec.md §5) the rows of the
positive prompt are recomputed with explicit scores, query chunk by query chunk, and the modulation is applied to
those scores before the softmax. Module names follow the Stability checkpoint (`attn.qkv`, `attn.ln_q`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

if TYPE_CHECKING:  # the dense package is only needed when a layout is given
    from dense import DenseAttention


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last axis (one head's Dh channels), statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)  # fp32 island: squares of bf16 values overflow easily
        y = x * torch.rsqrt(var + self.eps)  # promoted to float32
        return (y.to(self.weight.dtype) * self.weight).to(x.dtype)


class SelfAttention(nn.Module):
    """The projections of one stream: fused `qkv`, optional per-head `ln_q`/`ln_k`, optional output `proj`.

    The last context block is "pre-only": its text tokens still send queries, keys and values into the joint
    attention, but their outputs are thrown away, so it has no `proj` (has_proj=False).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, has_proj: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q = RMSNorm(dim // num_heads) if qk_norm else None
        self.ln_k = RMSNorm(dim // num_heads) if qk_norm else None
        self.proj = nn.Linear(dim, dim) if has_proj else None

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> q, k, v each (B, H, L, Dh), with q and k normalised per head."""
        q, k, v = rearrange(self.qkv(x), "B L (K H Dh) -> K B H L Dh", K=3, H=self.num_heads)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v

    def kv_heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, D) -> k, v each (B, H, L, Dh): for tokens that are only attended to, never attend."""
        dim = self.qkv.in_features
        kv = F.linear(x, self.qkv.weight[dim:], self.qkv.bias[dim:])  # the k and v rows of the fused weight
        k, v = rearrange(kv, "B L (K H Dh) -> K B H L Dh", K=2, H=self.num_heads)
        return (self.ln_k(k) if self.ln_k is not None else k), v


def merge_heads(o: Tensor) -> Tensor:
    return rearrange(o, "B H L Dh -> B L (H Dh)")


def attention(q: Tensor, k: Tensor, v: Tensor, dense: DenseAttention | None = None) -> Tensor:
    """softmax(q kᵀ / √Dh) v: q (B, H, Lq, Dh) attends over k, v (B, H, L, Dh); the result is (B, H, Lq, Dh).

    Lq = L, except in the last block, where only the image tokens (the first Lq) ask.

    With `dense`, the batch rows `dense.rows` (the positive prompt) are recomputed with explicit float32
    scores so DenseDiffusion can modulate them (dense-spec.md §5). Queries go `dense.chunk_size` at a time,
    so the extra memory is (rows, H, chunk, L), never the full L × L of every head. The other rows keep the
    plain result, computed by the same kernel on the same batch as without a layout, so they are bit for bit
    what the plain path gives (spec §6).
    """
    out = F.scaled_dot_product_attention(q, k, v)
    if dense is None:
        return out
    rows = dense.rows
    qr, kt, vr = q[rows].float(), k[rows].float().transpose(-1, -2), v[rows].float()
    scale = q.shape[-1] ** -0.5
    for q0 in range(0, q.shape[2], dense.chunk_size):
        q1 = min(q0 + dense.chunk_size, q.shape[2])
        s = (qr[:, :, q0:q1] @ kt) * scale  # (b, H, chunk, L) scaled scores of queries q0..q1
        s = dense.modulate(s, q0, q1)
        p = s.softmax(-1)
        dense.record(p, q0, q1)
        out[rows, :, q0:q1] = (p @ vr).to(out.dtype)
    return out
