"""Regional Prompting written out pair by pair and query by query: the oracle `dense.regional` is tested against.

Nothing here is fast or shared with `dense.regional`: the mask is decided for every (query, key) pair from the
rules in Chen et al. 2024 (arXiv 2411.02395, §3) as upstream's `RegionalFluxPipeline.__call__` builds them, and
the attention is a softmax per query over the keys that pair allows, in float64, then upstream's blend.
Joint order as in this project's MM-DiT: image tokens, then the base prompt's text, then each regional prompt's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def token_kind(t: int, n_img: int, n_base: int, prompt_length: int) -> tuple[str, int]:
    """("image", t), ("base", j) or ("prompt", p) for joint position t."""
    if t < n_img:
        return "image", t
    if t < n_img + n_base:
        return "base", t - n_img
    return "prompt", (t - n_img - n_base) // prompt_length


def reference_mask(image_prompt: Sequence[int], n_base: int, n_prompts: int, prompt_length: int,
                   masked: bool = True) -> list[list[bool]]:
    """allowed[i][j]: may query i attend to key j in the regional pass. `image_prompt[t]`: the prompt image token t
    follows (its region's, or the background's)."""
    n_img = len(image_prompt)
    size = n_img + n_base + n_prompts * prompt_length
    allowed = [[False] * size for _ in range(size)]
    for i in range(size):
        qi, a = token_kind(i, n_img, n_base, prompt_length)
        for j in range(size):
            kj, b = token_kind(j, n_img, n_base, prompt_length)
            if qi == "base":  # the base text's rows come from the base pass: image and base text keys
                allowed[i][j] = kj in ("image", "base")
            elif kj == "base":  # the regional pass never sees the base prompt
                allowed[i][j] = False
            elif not masked:  # a block between masked ones: image and every regional prompt, unmasked
                allowed[i][j] = True
            elif qi == "image" and kj == "image":  # image -> image within a region (background with background)
                allowed[i][j] = image_prompt[a] == image_prompt[b]
            elif qi == "image" and kj == "prompt":  # a region's image -> its own prompt
                allowed[i][j] = image_prompt[a] == b
            elif qi == "prompt" and kj == "image":  # a prompt -> its region's image
                allowed[i][j] = a == image_prompt[b]
            else:  # prompt -> prompt: block-diagonal
                allowed[i][j] = a == b
    return allowed


def _attend(q: Tensor, k: Tensor, v: Tensor, keys: Sequence[int]) -> Tensor:
    """softmax over the listed keys of q·k/√Dh, times v; q (Dh,), k and v (L, Dh), float64."""
    scores = [float(q @ k[j]) / math.sqrt(q.shape[0]) for j in keys]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    out = torch.zeros_like(q)
    for w, j in zip(weights, keys):
        out += (w / total) * v[j]
    return out


def reference_attention(q: Tensor, k: Tensor, v: Tensor, image_prompt: Sequence[int], n_base: int,
                        n_prompts: int, prompt_length: int, positive: range, base_ratio: float,
                        masked: bool = True) -> Tensor:
    """Regional Prompting's joint attention, float64: q (B, H, Lq, Dh) (Lq = every token, or the image tokens only
    in the last block), k and v (B, H, L, Dh). Rows in `positive`: image queries blend (1 − β)·regional + β·base,
    base text queries take the base pass, regional text queries the regional pass. Other rows: the plain attention
    over [image; base text] (their regional-text rows, never read, are left 0)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Lq, _ = q.shape
    n_img = len(image_prompt)
    allowed = reference_mask(image_prompt, n_base, n_prompts, prompt_length, masked)
    plain_keys = list(range(n_img + n_base))
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                kind, _ = token_kind(i, n_img, n_base, prompt_length)
                base = _attend(q[b, h, i], k[b, h], v[b, h], plain_keys)
                if b not in positive:
                    out[b, h, i] = base if kind != "prompt" else 0.0
                    continue
                regional = _attend(q[b, h, i], k[b, h], v[b, h], [j for j in range(k.shape[2]) if allowed[i][j]])
                if kind == "image":
                    out[b, h, i] = (1 - base_ratio) * regional + base_ratio * base
                elif kind == "base":
                    out[b, h, i] = base
                else:
                    out[b, h, i] = regional
    return out
