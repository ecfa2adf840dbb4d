"""Random weights for models that have none, one draw shared by the tests, the benchmarks and the built-in
model's trainer (its text encoders before training).

`randomize_` redraws a built module's parameters; `random_tensor` draws one tensor by name and shape in the
same way, for writers that never build the model (a checkpoint written one tensor at a time).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def randomize_(module: nn.Module, generator: torch.Generator, *, bias_std: float = 0.1, norm_std: float = 0.3) -> nn.Module:
    """Redraw every parameter of `module` in place, and return it.

    Matrices and kernels (ndim >= 2) ~ N(0, 1/fan_in), so activations stay O(1) at any width (LeCun's scaling);
    biases ~ N(0, bias_std²); other vectors (norm weights) ~ 1 + N(0, norm_std²). Non-zero biases and norm
    weights away from 1 mean that a comparison of two engines cannot pass on the default zeros and ones.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith("bias"):
                p.copy_(bias_std * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(1 + norm_std * torch.randn(p.shape, generator=generator))
    return module


def random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """bfloat16 values drawn as `randomize_` draws them: matrices N(0, 1/fan_in), biases N(0, 0.1²),
    norm weights 1 + N(0, 0.3²); the position table N(0, 0.1²)."""
    if name == "pos_embed":
        t = 0.1 * torch.randn(shape, generator=g)
    elif len(shape) >= 2:
        t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    elif name.endswith("bias"):
        t = 0.1 * torch.randn(shape, generator=g)
    else:
        t = 1 + 0.3 * torch.randn(shape, generator=g)
    return t.to(torch.bfloat16)
