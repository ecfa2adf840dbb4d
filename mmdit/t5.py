"""The T5 v1.1 encoder (google/t5-v1_1-xxl) that gives SD3 its long, 4096-wide token sequence.

The numerics of transformers' `T5EncoderModel`, its float16 rules included (docs/numerics.md §8.2; Raffel et al.
2020, §2.1). Module names are the checkpoint's (`encoder.block.{i}.layer.0.SelfAttention.q`, ...).

    h = shared[ids]                                    # no scaling, no absolute positions
    h = h + o(softmax(q k^T + bias) v)    on RMS(h)    # no 1/sqrt(d); bias: relative-position table of block 0
    h = h + wo(gelu_tanh(wi_0 x) * wi_1 x) on x = RMS(h)
    out = RMS(h)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fp8 import compute_dtype


@dataclass(frozen=True)
class T5Config:
    vocab_size: int  # 32128
    d_model: int  # D: 4096
    d_ff: int  # 10240
    num_layers: int  # 24
    num_heads: int  # H: 64
    d_kv: int  # Dh: 64 (q/k/v width is H * Dh, which need not equal D)
    num_buckets: int  # 32
    max_distance: int = 128  # not visible in the weights; 128 in every released T5
    eps: float = 1e-6

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, Tensor] | Mapping[str, tuple[int, ...]],
        num_heads: int | None = None,
        *,
        max_distance: int = 128,
    ) -> T5Config:
        """Infer the config from tensor shapes (tensors or plain shape tuples) of our state dict.

        The head count is read from the relative-attention table (num_buckets, H); `num_heads`, if given, must
        agree with it. `max_distance` leaves no trace in the weights (config.json has it).
        """
        shape = {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for k, v in sd.items()}
        table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        if "shared.weight" not in shape or table not in shape:
            raise ValueError(f"not a T5 encoder state dict (no shared.weight / {table})")
        if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in shape:
            raise ValueError("not a T5 v1.1 encoder: no gated feed-forward (DenseReluDense.wi_0); v1.0 is unsupported")
        vocab_size, d_model = shape["shared.weight"]
        num_buckets, heads = shape[table]
        if num_heads is not None and num_heads != heads:
            raise ValueError(f"num_heads={num_heads} disagrees with the relative-attention table, which has {heads}")
        inner = shape["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        if inner % heads:
            raise ValueError(f"T5 attention width {inner} cannot be split into {heads} heads")
        prefix = "encoder.block."
        return cls(
            vocab_size=vocab_size,
            d_model=d_model,
            d_ff=shape["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
            num_layers=len({k[len(prefix) :].split(".")[0] for k in shape if k.startswith(prefix)}),
            num_heads=heads,
            d_kv=inner // heads,
            num_buckets=num_buckets,
            max_distance=max_distance,
        )


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> Tensor:
    """(L, L) bucket index of key position j relative to query position i, for a bidirectional encoder.

    Half the buckets are for keys after the query (j > i), half for keys at or before it. Within a half, the
    first max_exact = num_buckets / 4 distances get a bucket each; larger distances share log-spaced buckets
    reaching the last one at `max_distance`, beyond which everything saturates.
    """
    pos = torch.arange(length, dtype=torch.long, device=device)
    rel = pos[None, :] - pos[:, None]  # (L, L): key - query
    half = num_buckets // 2
    max_exact = half // 2
    buckets = (rel > 0).long() * half
    dist = rel.abs()
    # float32 log, truncated toward zero: the exact recipe the model was trained with. clamp(min=1) only keeps
    # log(0) out of the (unused) far branch.
    far = max_exact + (
        torch.log(dist.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    far = far.clamp(max=half - 1)
    return buckets + torch.where(dist < max_exact, dist, far)


def clamp_fp16(h: Tensor) -> Tensor:
    """Keep a float16 residual stream finite, as transformers does (docs/numerics.md §8.2); other dtypes pass."""
    if h.dtype != torch.float16:
        return h
    top = torch.finfo(torch.float16).max
    # Decided on device (no host sync): only when an inf is already present do we back off by 1000.
    limit = torch.where(torch.isinf(h).any(), top - 1000, top)
    return h.clamp(-limit, limit)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation, written out op by op (as T5's "gelu_new"), so float16 rounds alike."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5LayerNorm(nn.Module):
    """RMSNorm with T5's precision rules: float32 statistics, output in the weight's half dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, h: Tensor) -> Tensor:
        ms = h.float().pow(2).mean(-1, keepdim=True)  # (B, L, 1) mean square, float32
        h = h * torch.rsqrt(ms + self.eps)  # float32 (promoted)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return self.weight * h


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, *, has_position_table: bool) -> None:
        super().__init__()
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_position_table:  # block 0 only
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def position_bias(self, length: int) -> Tensor:
        """(1, H, L, L) additive attention bias, shared by all blocks."""
        buckets = relative_position_buckets(
            length, self.cfg.num_buckets, self.cfg.max_distance, device=self.relative_attention_bias.weight.device
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (L, L, H) -> (1, H, L, L)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        B, L, _ = x.shape
        H, Dh = self.cfg.num_heads, self.cfg.d_kv
        q, k, v = (p(x).view(B, L, H, Dh).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, H, L, Dh)
        # scale=1: T5 has no 1/sqrt(Dh) (its init absorbs it). The bias is the only mask.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, H, L, Dh)
        return self.o(out.transpose(1, 2).reshape(B, L, H * Dh))


class T5GatedFeedForward(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        g = gelu_tanh(self.wi_0(x)) * self.wi_1(x)  # (B, L, d_ff)
        # wo may be float32 while the rest is float16 (docs/numerics.md §8.2): feed it its own dtype.
        return self.wo(g.to(compute_dtype(self.wo)))  # (B, L, D)


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, *, has_position_table: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_position_table=has_position_table)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        return h + self.SelfAttention(self.layer_norm(h), bias)


class T5FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5GatedFeedForward(cfg)  # the checkpoint's name, though v1.1 uses no ReLU
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.DenseReluDense(self.layer_norm(h))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, *, has_position_table: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            [T5SelfAttentionLayer(cfg, has_position_table=has_position_table), T5FeedForwardLayer(cfg)]
        )

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        h = clamp_fp16(self.layer[0](h, bias))
        return clamp_fp16(self.layer[1](h))


class T5Stack(nn.Module):
    """The part under the `encoder.` prefix of the checkpoint keys."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, has_position_table=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)


class T5Encoder(nn.Module):
    """`forward(ids)` -> last hidden state (B, L, D), as transformers' `T5EncoderModel(ids)[0]`."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Encode (B, L) token ids (SD3: L = max_sequence_length, 256 by default, at most 512)."""
        h = self.shared(input_ids)  # (B, L, D)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1])  # (1, H, L, L)
        for block in self.encoder.block:
            h = block(h, bias)
        return self.encoder.final_layer_norm(h)  # (B, L, D)
