"""Linear layers whose weights stay in GGUF's block formats, dequantised one layer at a time as they run.

GGUF (the file format of llama.cpp / ggml) stores a weight row by row, each row cut into blocks of 32 values
(256 for the "K" types) that share a scale, and sometimes a minimum, in float16:

| type | bits a weight | a block | a value is |
|---|---|---|---|
| Q8_0 | 8.5 | 32: float16 d, 32 int8 q | d·q |
| Q4_0 / Q5_0 | 4.5 / 5.5 | 32: d, 4- / 5-bit q | d·(q - 8) / d·(q - 16) |
| Q4_1 / Q5_1 | 5 / 6 | 32: d, m, 4- / 5-bit q | d·q + m |
| Q2_K ... Q6_K | 2.6 ... 6.6 | 256: d (and dmin), 16 or 8 sub-blocks with 4-8-bit scales | (d·sc)·q (- dmin·m) |
| IQ4_NL / IQ4_XS | 4.5 / 4.25 | 32 / 256: d (and 6-bit sub-scales), 4-bit indices into a fixed table | d·table[q] |
| F32 / F16 / BF16 | 32 / 16 / 16 | one value | the value |

Each type's `dequantize_blocks` here (a `dequantize_*` function, or `scaled_*` for the d·q types) turns its
blocks into float32 exactly as the format's own reference, `gguf.quants.dequantize` of the `gguf` package,
does: the same products and sums in the same order, so the same bits (tests/test_gguf.py checks every type).
Most products are exact in float32 (a float16 scale times a small integer); where one is not (Q6_K's
(d·sc)·q), the order is the reference's.

`GGUFLinear.dequantized` decodes its weight on the layer's device, in chunks of rows, and rounds once to the
compute dtype, so the layer's numbers are those of an `nn.Linear` holding `gguf.quants.dequantize(W)` in that
dtype. On a CPU `forward` decodes into memory that all layers of a model reuse (`Workspace`; docs/gguf.md).
The layer shares the float8 layer's structure (`mmdit.quantized.QuantizedLinear`); LoRA updates are added
after dequantisation (`matmul_weight`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantized import QuantizedLinear

QK_K = 256  # values in a block of the K and IQ4_XS types
# IQ4_NL's and IQ4_XS's 16 levels (ggml's `kvalues_iq4nl`)
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# Values dequantised at a time on a CPU: a chunk's float32 temporaries are 16 MiB rather than a whole weight's,
# and a layer takes a few chunks, so its threads meet at few barriers (on a busy machine more of them cost more
# than the arithmetic; docs/gguf.md).
CPU_CHUNK = 1 << 22


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The float16 at byte `start` of every block, as float32 (n, 1)."""
    return blocks[:, start : start + 2].view(torch.float16).float()


def _shifted(x: Tensor, shifts: tuple[int, ...], dim: int) -> Tensor:
    """`x >> s` for each s, stacked at `dim` (a new axis): the packed fields of each byte, in order."""
    s = torch.tensor(shifts, dtype=x.dtype, device=x.device)
    shape = [1] * (x.ndim + 1)
    shape[dim] = len(shifts)
    return x.unsqueeze(dim) >> s.view(shape)


def _nibbles(b: Tensor, start: int = 0) -> Tensor:
    """The 4-bit values of bytes `b[:, start:]` (n, k) -> (n, 2k): the k low nibbles, then the k high ones.
    (Masked and shifted over all of `b`, then cut: two contiguous passes are cheaper than strided ones.)"""
    return torch.cat(((b & 0x0F)[:, start:], (b >> 4)[:, start:]), dim=1)


def _bits(qh: Tensor) -> Tensor:
    """(n, k) bytes -> (n, 8k): bit j of the little-endian bit string, for j = 0 .. 8k - 1."""
    return (_shifted(qh, tuple(range(8)), 2) & 1).reshape(qh.shape[0], -1)


def _levels(index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """IQ4's 4-bit indices -> their levels."""
    return torch.tensor(IQ4_LEVELS, dtype=dtype, device=index.device)[index.int()]


# The types whose value is d·q, a float16 scale times a small integer: `scaled_*` gives (q int8, d float16).
# In float32 the product is exact; in float16 it is rounded once, so computing it in float16 gives the
# reference's value rounded to float16, with half the memory traffic (`dequantize`).


def scaled_q8_0(b: Tensor) -> tuple[Tensor, Tensor]:
    return b[:, 2:].view(torch.int8), b[:, :2].view(torch.float16)


def scaled_q4_0(b: Tensor) -> tuple[Tensor, Tensor]:
    return _nibbles(b, 2).view(torch.int8) - 8, b[:, :2].view(torch.float16)


def scaled_q5_0(b: Tensor) -> tuple[Tensor, Tensor]:
    q = _nibbles(b, 6) | (_bits(b[:, 2:6]) << 4)
    return q.view(torch.int8) - 16, b[:, :2].view(torch.float16)


def scaled_iq4_nl(b: Tensor) -> tuple[Tensor, Tensor]:
    return _levels(_nibbles(b, 2), torch.int8), b[:, :2].view(torch.float16)


def _from_scaled(scaled: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Callable[[Tensor], Tensor]:
    def dequantize_blocks(b: Tensor) -> Tensor:
        q, d = scaled(b)
        return q.float().mul_(d.float())

    return dequantize_blocks


def dequantize_q4_1(b: Tensor) -> Tensor:
    return _nibbles(b, 4).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def dequantize_q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b, 8) | (_bits(b[:, 4:8]) << 4)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _k_scale_min(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit minima (ggml's `get_scale_min_k4`)."""
    d, m, md = s.view(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def dequantize_q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4).float()).view(n, 16, 1)
    q = (_shifted(b[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 2) & 3).view(n, 16, 16).float()
    return (dl * q).sub_(ml).view(n, QK_K)


def dequantize_q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    s = b[:, 96:108]
    low = _shifted(s[:, :8], (0, 4), 1).reshape(n, 16) & 0x0F
    high = _shifted(s[:, 8:], (0, 2, 4, 6), 1).reshape(n, 16) & 3
    sc = ((low | (high << 4)).view(torch.int8) - 32).float()
    dl = (_f16(b, 108) * sc).view(n, 16, 1)
    ql = (_shifted(b[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 2) & 3).view(n, 16, 16)
    qh = (_shifted(b[:, :32].reshape(n, 1, 32), tuple(range(8)), 2) & 1).view(n, 16, 16) ^ 1  # set bit: no offset
    q = (ql.view(torch.int8) - (qh << 2).view(torch.int8)).float()
    return (dl * q).view(n, QK_K)


def dequantize_q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).view(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).view(n, 8, 1)
    q = (_shifted(b[:, 16:].reshape(n, 4, 32), (0, 4), 2) & 0x0F).view(n, 8, 32).float()
    return (d * q).sub_(dm).view(n, QK_K)


def dequantize_q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).view(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).view(n, 8, 1)
    ql = (_shifted(b[:, 48:].reshape(n, 4, 32), (0, 4), 2) & 0x0F).view(n, 8, 32)
    qh = (_shifted(b[:, 16:48].reshape(n, 1, 32), tuple(range(8)), 2) & 1).view(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (d * q).sub_(dm).view(n, QK_K)


def dequantize_q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    ql = (_shifted(b[:, :128].reshape(n, 2, 64), (0, 4), 2) & 0x0F).view(n, 8, 32)
    qh = (_shifted(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 2) & 3).view(n, 8, 32)
    q = ((ql | (qh << 4)).view(torch.int8) - 32).view(n, 16, 16).float()
    return (d * q).view(n, QK_K)  # (d·sc)·q: this product can round, so the reference's order


def dequantize_iq4_xs(b: Tensor) -> Tensor:
    n = b.shape[0]
    low = _shifted(b[:, 4:8], (0, 4), 2).reshape(n, 8) & 0x0F
    high16 = b[:, 2].int() | (b[:, 3].int() << 8)  # a little-endian uint16: two bits per sub-block
    high = ((_shifted(high16, tuple(range(0, 16, 2)), 1)) & 3).to(torch.uint8)
    dl = (_f16(b, 0) * ((low | (high << 4)).view(torch.int8) - 32).float()).view(n, 8, 1)
    q = _levels(_nibbles(b[:, 8:].reshape(n * 8, 16))).view(n, 8, 32)
    return (dl * q).view(n, QK_K)


@dataclass(frozen=True)
class BlockType:
    """One GGUF tensor type: ggml's number and name, values a block, bytes a block, and how blocks (n, bytes)
    become float32 values (n, values). The float types have no blocks: `float_dtype` is how torch holds them."""

    name: str
    ggml_type: int  # ggml's `enum ggml_type` value
    block_size: int
    type_size: int
    dequantize_blocks: Callable[[Tensor], Tensor] | None = None
    float_dtype: torch.dtype | None = None
    scaled: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None  # for the d·q types (see `scaled_q8_0`)

    def row_bytes(self, values: int) -> int:
        return values // self.block_size * self.type_size

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


BLOCK_TYPES = {t.name: t for t in (
    BlockType("F32", 0, 1, 4, float_dtype=torch.float32),
    BlockType("F16", 1, 1, 2, float_dtype=torch.float16),
    BlockType("BF16", 30, 1, 2, float_dtype=torch.bfloat16),
    BlockType("Q4_0", 2, 32, 18, _from_scaled(scaled_q4_0), scaled=scaled_q4_0),
    BlockType("Q4_1", 3, 32, 20, dequantize_q4_1),
    BlockType("Q5_0", 6, 32, 22, _from_scaled(scaled_q5_0), scaled=scaled_q5_0),
    BlockType("Q5_1", 7, 32, 24, dequantize_q5_1),
    BlockType("Q8_0", 8, 32, 34, _from_scaled(scaled_q8_0), scaled=scaled_q8_0),
    BlockType("Q2_K", 10, QK_K, 84, dequantize_q2_k),
    BlockType("Q3_K", 11, QK_K, 110, dequantize_q3_k),
    BlockType("Q4_K", 12, QK_K, 144, dequantize_q4_k),
    BlockType("Q5_K", 13, QK_K, 176, dequantize_q5_k),
    BlockType("Q6_K", 14, QK_K, 210, dequantize_q6_k),
    BlockType("IQ4_NL", 20, 32, 18, _from_scaled(scaled_iq4_nl), scaled=scaled_iq4_nl),
    BlockType("IQ4_XS", 23, QK_K, 136, dequantize_iq4_xs),
)}


def dequantize(data: Tensor, block: BlockType, dtype: torch.dtype = torch.float32, *, chunk: int | None = None,
               out: Tensor | None = None) -> Tensor:
    """A tensor as GGUF stores it -> its values in `dtype`, shape (..., values a row).

    `data`: the float tensor itself for F32 / F16 / BF16, else uint8 (..., bytes a row). The values are computed
    in float32 and rounded once to `dtype`, `chunk` rows at a time (None: `CPU_CHUNK` values at a time on a CPU,
    all rows elsewhere). `out`: memory for the result (as many elements), else a new tensor.
    """
    values = data.shape[-1] if block.float_dtype else data.shape[-1] // block.type_size * block.block_size
    shape = (*data.shape[:-1], values)
    if block.float_dtype is not None:
        return data.to(dtype) if out is None or data.dtype == dtype else out.view(shape).copy_(data)
    rows = data.reshape(-1, data.shape[-1])
    if chunk is None:
        chunk = max(1, CPU_CHUNK // values) if data.device.type == "cpu" else rows.shape[0]
    if out is None and chunk >= rows.shape[0] and dtype == torch.float32:
        return block.dequantize_blocks(rows.reshape(-1, block.type_size)).view(shape)
    out = torch.empty(shape, dtype=dtype, device=data.device) if out is None else out.view(shape)
    flat = out.view(rows.shape[0], values)
    for start in range(0, rows.shape[0], chunk):
        blocks = rows[start : start + chunk].reshape(-1, block.type_size)
        target = flat[start : start + chunk].view(-1, block.block_size)
        if block.scaled is not None and dtype in (torch.float32, torch.float16):
            q, d = block.scaled(blocks)  # float32: exact products; float16: exact operands, one rounding
            torch.mul(q.to(dtype), d.to(dtype), out=target)
        else:
            target.copy_(block.dequantize_blocks(blocks))  # float32 values, rounded once to `dtype`
    return out


class Workspace:
    """Memory that one model's GGUF layers decode their weights into for the matrix product, one layer after
    another: on a CPU a fresh tensor the size of a weight costs its page faults at every call, about as long as
    the decoding itself (docs/gguf.md). One buffer per device and dtype, as large as the largest weight. The
    layers of a model that shares one must run one call at a time (as the pipeline runs them)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buffer = self._buffers.get((device, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


class GGUFLinear(QuantizedLinear):
    """`nn.Linear` with its weight kept as the GGUF file stores it: `weight` uint8 (out, bytes a row) for a
    block type, or the float tensor (out, in) for F32 / F16 / BF16. The bias is kept in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block: BlockType,
                 compute_dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, compute_dtype)
        if in_features % block.block_size:
            raise ValueError(f"{block.name} packs {block.block_size} values a block; {in_features} inputs do not split")
        self.block = block
        shape = (out_features, in_features if block.float_dtype else block.row_bytes(in_features))
        self.weight = nn.Parameter(torch.empty(shape, dtype=block.float_dtype or torch.uint8, device=device),
                                   requires_grad=False)
        self._add_bias(bias, device)
        self.workspace: Workspace | None = None  # set by the loader: one per model (see `Workspace`)

    def dequantized(self, rows: slice = slice(None), dtype: torch.dtype | None = None) -> Tensor:
        """The weight's rows `rows` in `dtype` (default: the compute dtype), (rows, in)."""
        return dequantize(self.weight[rows], self.block, dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if (self.workspace is None or self.low_rank or weight.device.type != "cpu" or weight.dtype == self.compute_dtype
                or torch.compiler.is_compiling()):
            return super().forward(x)
        # The decoded weight is read by this product only, so it may live in the shared workspace.
        out = self.workspace.take(self.out_features * self.in_features, self.compute_dtype, weight.device)
        return F.linear(x, dequantize(weight, self.block, self.compute_dtype, out=out), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.block.name}, compute={str(self.compute_dtype).removeprefix('torch.')}")
