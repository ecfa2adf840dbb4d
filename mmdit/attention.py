"""Multi-head attention for the MM-DiT: fused qkv, per-head RMS QK-norm, and the one attention function.

SD3 (paper §4) runs ordinary softmax attention over the joined image and text tokens; SD3.5 adds RMSNorm of q
and k per head (paper §5.3.2). `attention` is where the scores live, and where layout control acts: DenseDiffusion
edits them, Regional Prompting masks a second pass (docs/layout-control.md).
Module names follow the Stability checkpoint (`attn.qkv`, `attn.ln_q`, ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .quantized import QuantizedLinear

if TYPE_CHECKING:  # the dense package is only needed when a layout is given
    from dense import RegionalAttention, ScoreEdit


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
    """One stream's projections: fused `qkv`, optional per-head `ln_q`/`ln_k`, and the output `proj` (absent in
    the last block's text stream, whose output nothing reads)."""

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
        kv = linear_rows(self.qkv, x, self.qkv.in_features)  # (B, L, 2D): the k and v rows of the fused weight
        k, v = rearrange(kv, "B L (K H Dh) -> K B H L Dh", K=2, H=self.num_heads)
        return (self.ln_k(k) if self.ln_k is not None else k), v

    def forward(self, x: Tensor, dense: ScoreEdit | RegionalAttention | None = None) -> Tensor:
        """Self-attention of one stream alone, (B, L, D) -> (B, L, D): MMDiT-X's image-only `attn2`."""
        q, k, v = self.qkv_heads(x)
        return self.proj(merge_heads(attention(q, k, v, dense)))


def linear_rows(layer: nn.Linear | QuantizedLinear, x: Tensor, start: int) -> Tensor:
    """`layer(x)[..., start:]` without computing the outputs before `start` (the k, v rows of a fused qkv)."""
    # float8 or GGUF: only these rows are dequantised
    weight = layer.matmul_weight(slice(start, None)) if isinstance(layer, QuantizedLinear) else layer.weight[start:]
    return F.linear(x, weight, None if layer.bias is None else layer.bias[start:])


def merge_heads(o: Tensor) -> Tensor:
    return rearrange(o, "B H L Dh -> B L (H Dh)")


def attention(q: Tensor, k: Tensor, v: Tensor, dense: ScoreEdit | RegionalAttention | None = None) -> Tensor:
    """softmax(q kᵀ / √Dh) v: q (B, H, Lq, Dh) over k, v (B, H, L, Dh) -> (B, H, Lq, Dh); Lq < L in the last block.

    `dense`: DenseDiffusion edits the positive rows' scores before the softmax (docs/densediffusion.md), or
    Regional Prompting runs its masked pass beside the plain one (`regional_attention`).
    """
    if dense is not None and dense.method == "regional":
        return regional_attention(q, k, v, dense)
    if dense is None or not dense.editing:
        out = F.scaled_dot_product_attention(q, k, v)
        if dense is not None:  # recording maps only: the probabilities are recomputed for them, aside
            for q0, q1, p in probabilities(q, k, dense):
                dense.record(p, q0, q1)
        return out
    B, Lq = q.shape[0], q.shape[2]
    r0, r1, _ = dense.rows.indices(B)
    out = torch.empty_like(q)
    for plain in (slice(0, r0), slice(r1, B)):  # the rows that are not modulated, if any
        if plain.start < plain.stop:
            out[plain] = F.scaled_dot_product_attention(q[plain], k[plain], v[plain])
    rows = slice(r0, r1)
    n = dense.explicit_queries(Lq)
    if n < Lq:  # text queries no rule of the preset touches
        out[rows, :, n:] = F.scaled_dot_product_attention(q[rows, :, n:], k[rows], v[rows])
    vr = v[rows]  # p @ v in the model's dtype, as the plain kernel does it; scores and softmax are float32
    for q0, q1, p in probabilities(q, k, dense):
        dense.record(p, q0, q1)
        out[rows, :, q0:q1] = p.to(vr.dtype) @ vr  # (b, H, chunk, Dh)
    return out


def probabilities(q: Tensor, k: Tensor, dense: ScoreEdit) -> Iterator[tuple[int, int, Tensor]]:
    """(q0, q1, p) per query chunk: p = softmax(modulated float32 scores), (b, H, q1-q0, L), for the batch rows
    `dense.rows` and the query rows `dense.explicit_queries` asks for."""
    rows = dense.rows
    n = dense.explicit_queries(q.shape[2])
    # 1/√Dh goes into q once; for Dh = 64 (every release) it is 1/8, a power of two, so this is exact.
    qr = q[rows, :, :n].float() * q.shape[-1] ** -0.5
    kt = k[rows].float().transpose(-1, -2)
    for q0 in range(0, n, dense.chunk_size):
        q1 = min(q0 + dense.chunk_size, n)
        s = qr[:, :, q0:q1] @ kt  # (b, H, chunk, L) scaled scores of queries q0..q1
        yield q0, q1, dense.edit(s, q0, q1).softmax(-1)


def regional_attention(q: Tensor, k: Tensor, v: Tensor, regional: RegionalAttention) -> Tensor:
    """Regional Prompting (docs/layout-control.md §2): q (B, H, Lq, Dh), k and v (B, H, L, Dh) over the sequence
    [image (N); base text (S); regional texts] -> (B, H, Lq, Dh).

    Every row's image and base text queries first take the plain attention over [image; base text], the very call
    of a run without a layout, hence its bits. The positive rows add a masked pass over every key: their image
    rows become (1 − β)·masked + β·plain, their regional text rows the masked pass's. The other rows' regional text
    (CFG's negative half repeats its own prompt there) is never attended to and gets 0. MMDiT-X's image-only
    `attn2` (L = N) stays plain, as in the SD3.5 port.
    """
    Lq, L = q.shape[2], k.shape[2]
    n, p = regional.n_img, regional.n_prefix
    if L == n:
        return F.scaled_dot_product_attention(q, k, v)
    out = torch.empty_like(q)
    m = min(Lq, p)  # the plain queries: image and base text (image only in the last block)
    out[:, :, :m] = F.scaled_dot_product_attention(q[:, :, :m], k[:, :, :p], v[:, :, :p])
    out[:, :, m:] = 0
    rows = regional.rows
    masked = F.scaled_dot_product_attention(q[rows], k[rows], v[rows], attn_mask=regional.mask[:Lq])  # (b, H, Lq, Dh)
    out[rows, :, :n] = regional.blend(masked[:, :, :n], out[rows, :, :n])
    out[rows, :, m:] = masked[:, :, m:]
    return out
