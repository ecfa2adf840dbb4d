"""Random weights for a model that has none: the built-in model's text encoders before training, tests and
benchmarks."""

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
