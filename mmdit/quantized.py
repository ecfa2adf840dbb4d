"""A linear layer whose weight is stored another way, and decoded to the compute dtype one layer at a time.

Two storages derive from `QuantizedLinear`: float8 with a scale (`mmdit.fp8.FP8Linear`) and GGUF's blocks
(`mmdit.gguf.GGUFLinear`). Each says only how its weight becomes numbers (`dequantized`); the rest is shared:
the bias (kept in the compute dtype), `forward` = `F.linear` on the dequantised weight, and LoRA updates that
cannot be merged into the stored weight (`LowRank`), added to the dequantised weight in float32 at every call.
So the full-precision weight exists only while its own layer runs, never for the whole model.

Modules are swapped in by name on a model built on the meta device, so the networks are written with
`nn.Linear` and know nothing of this; the two places that reach into a linear layer's weight use
`linear_rows` and `compute_dtype` (mmdit/fp8.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, eq=False)
class LowRank:
    """One LoRA update kept beside a stored weight: rows `rows` of the weight get factor · up @ down.

    `up` (R, r) and `down` (r, in) are float32 on the layer's device; `source` is whatever the caller uses to
    take the update back (`loaders.lora` passes its `Update`)."""

    rows: slice
    up: Tensor
    down: Tensor
    factor: float
    source: object = None


class QuantizedLinear(nn.Module):
    """`nn.Linear`'s interface over a weight stored in another form; subclasses hold the stored weight as
    `weight` (and whatever else it needs) and implement `dequantized`.

    `compute_dtype` is fixed at construction: a module-wide `.to(dtype)` would convert the stored weight itself
    and leave `compute_dtype` as it was (don't).
    """

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.low_rank: list[LowRank] = []

    def _add_bias(self, bias: bool, device: torch.device | str | None) -> None:
        """Register `bias` (in the compute dtype), or None; subclasses call it after their stored weight, so that
        the state dict lists `weight` first, as `nn.Linear`'s does."""
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=self.compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def dequantized(self, rows: slice = slice(None), dtype: torch.dtype | None = None) -> Tensor:
        """The stored weight's rows `rows` as numbers, (rows, in), in `dtype` (default: the compute dtype)."""
        raise NotImplementedError

    def matmul_weight(self, rows: slice = slice(None)) -> Tensor:
        """The weight rows the matrix product uses: dequantised, plus any low-rank updates.

        With updates, the sum is formed as `loaders.lora` merges into a float weight: the weight in float32, each
        factor · up @ down added in turn, one rounding to the compute dtype; so a LoRA on a stored layer gives
        the numbers it gives on an `nn.Linear` holding the dequantised weight (tests/test_gguf.py)."""
        if not self.low_rank:
            return self.dequantized(rows)
        w = self.dequantized(dtype=torch.float32)
        if w.data_ptr() == self.weight.data_ptr():  # a float32 weight stored as it is: never write into it
            w = w.clone()
        for u in self.low_rank:  # the factors follow the weight when blocks are streamed to another device
            w[u.rows] += (u.up.to(w.device) @ u.down.to(w.device)) * u.factor
        return w[rows].to(self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.matmul_weight(), self.bias)  # (..., in) -> (..., out)

