"""Linear layers whose weights are kept in float8 with a scale, and dequantised one layer at a time.

A weight W (out, in) is stored as q (float8, one byte a weight) and a float32 scale s, W ≈ q·s: one s for the
whole tensor, the convention of ComfyUI's float8 checkpoints (`comfy.ops.scaled_fp8_ops`' `scale_weight`,
`comfy.quant_ops.TensorCoreFP8Layout`'s `weight_scale`), or one per output row (shape (out, 1)).

`FP8Linear.forward` dequantises its own weight to the compute dtype, `(q.float()·s).to(dtype)`: the product in
float32 and one rounding to the compute dtype, then calls `F.linear` (docs/numerics.md §11.5). So the
full-precision weight exists only while that one layer runs, never for the whole model, and the numbers are
exactly those of an ordinary `nn.Linear` holding `dequantize(q, s, dtype)` (tests/test_fp8.py checks this bit
for bit). Activations stay in the compute dtype: there is no float8 matrix product here (ComfyUI's `fp8_linear`,
which needs fp8 tensor cores, also quantises the input; we never do).

`quantize` is the inverse used while loading a 16/32-bit checkpoint: s = max|W| / 448 (the largest finite
e4m3fn value), q = round-to-nearest(W / s): ComfyUI's rule (`TensorCoreFP8Layout.quantize`, which multiplies by
1/s where we divide). float8 e4m3fn has 3 mantissa bits, so each weight is rounded to within 1/16 of itself
(relative) unless it is more than 2^14 times smaller than the largest weight of its tensor (or row), where the
subnormals begin.

Modules are swapped in by name (`use_fp8_linears`) on a model built on the meta device, so the networks
themselves are written with `nn.Linear` and know nothing of this; the two places that reach into a linear
layer's weight use `compute_dtype` below and `FP8Linear.dequantized` (`mmdit.attention.linear_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantized import QuantizedLinear

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # the float8 storage this module computes with


def quantize(weight: Tensor, *, per_channel: bool = False, dtype: torch.dtype = torch.float8_e4m3fn
             ) -> tuple[Tensor, Tensor]:
    """(out, in) weight of any float dtype -> (q in `dtype`, float32 scale), weight ≈ q.float() * scale.

    The scale is () per tensor, or (out, 1) per output row with `per_channel`. An all-zero tensor (row) gets
    scale 1. Values are divided by the scale in float32 and clamped to the finite range before the cast:
    float8 e4m3fn has no infinity, and an out-of-range cast would give NaN.
    """
    top = torch.finfo(dtype).max
    w = weight.to(torch.float32, copy=True)
    lo, hi = torch.aminmax(w, dim=1, keepdim=True) if per_channel else torch.aminmax(w)
    amax = torch.maximum(-lo, hi)
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    q = w.div_(scale).clamp_(-top, top).to(dtype)
    return q, scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q·scale in `dtype`: their product in float32, rounded once to `dtype`. The one formula both the loader
    (dequantising a file) and `FP8Linear` use."""
    sixteen_bit = dtype in (torch.bfloat16, torch.float16)
    if q.device.type == "cpu" and q.dtype in FP8_DTYPES and scale.ndim == 0 and sixteen_bit:
        # The same numbers without a float32 copy of the weight: float8 -> 16-bit is exact, and on the CPU a
        # 0-dim tensor enters a binary op at the kernel's float32 "opmath" precision, so this is the float32
        # product rounded once (tests/test_fp8.py checks it against the general formula below, bit for bit).
        return torch.mul(q.to(dtype), scale)
    w = q.to(torch.float32)
    w = w.mul_(scale) if w is not q else w * scale  # `q` may itself be float32 (a scaled 32-bit tensor)
    return w.to(dtype)


@dataclass(frozen=True)
class FP8Spec:
    """How one linear layer is stored: its float8 dtype, per-tensor or per-row scale, and the dtype it
    computes in (the run's dtype; float32 for T5's `wo` under float16, see mmdit/t5.py)."""

    compute_dtype: torch.dtype
    weight_dtype: torch.dtype = torch.float8_e4m3fn
    per_channel: bool = False


class FP8Linear(QuantizedLinear):
    """`nn.Linear` with its weight stored as float8 `weight` (out, in) and float32 `weight_scale` (() or
    (out, 1)); the bias (if any) is kept in the compute dtype. Keys: `<layer>.weight`, `<layer>.weight_scale`,
    `<layer>.bias`, as in ComfyUI's `comfy_quant` checkpoints. The shared part (forward, bias, compute dtype)
    is `mmdit.quantized.QuantizedLinear`'s.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, spec: FP8Spec,
                 device: torch.device | str | None = None):
        super().__init__(in_features, out_features, spec.compute_dtype)
        if spec.weight_dtype not in FP8_DTYPES:
            raise ValueError(f"FP8Linear stores float8 e4m3fn or e5m2 weights, not {spec.weight_dtype}")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=spec.weight_dtype, device=device),
                                   requires_grad=False)
        scale_shape = (out_features, 1) if spec.per_channel else ()
        self.weight_scale = nn.Parameter(torch.ones(scale_shape, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self._add_bias(bias, device)

    def dequantized(self, rows: slice = slice(None), dtype: torch.dtype | None = None) -> Tensor:
        """The weight's rows `rows` in `dtype` (default: the compute dtype), (rows, in)."""
        scale = self.weight_scale if self.weight_scale.ndim == 0 else self.weight_scale[rows]
        return dequantize(self.weight[rows], scale, dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        scale = "per row" if self.weight_scale.ndim else "per tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={str(self.weight.dtype).removeprefix('torch.')} (scale {scale}), "
                f"compute={str(self.compute_dtype).removeprefix('torch.')}")


def compute_dtype(layer: nn.Linear | QuantizedLinear) -> torch.dtype:
    """The dtype a linear layer computes in (for a plain layer, its weight's dtype)."""
    return layer.compute_dtype if isinstance(layer, QuantizedLinear) else layer.weight.dtype


def use_fp8_linears(module: nn.Module, specs: Mapping[str, FP8Spec]) -> nn.Module:
    """Replace each `nn.Linear` named in `specs` (module paths, e.g. `joint_blocks.0.x_block.attn.qkv`) by an
    `FP8Linear` of the same shape, on the same device (the meta device, before loading). Returns `module`."""
    for name, spec in specs.items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        new = FP8Linear(old.in_features, old.out_features, old.bias is not None, spec=spec, device=old.weight.device)
        setattr(parent, child, new)
    return module
