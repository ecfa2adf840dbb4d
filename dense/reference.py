"""DenseDiffusion's score edit written out pair by pair: the oracle the fast path is tested against.

For each query row and each key: the quadrant gives the weight, the labels give the positive set R and the
negative set Q, and the score moves (docs/densediffusion.md §6). Python loops over every pair, so this is for
tiny layouts in tests; `dense.score_edit.ScoreEdit.edit` computes the same in a few tensor passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dense.score_edit import DenseConfig


def quadrant_weight(config: DenseConfig, image_query: bool, image_key: bool) -> float:
    """w_AB for query kind A and key kind B: w_ii, w_it, w_ti or w_tt."""
    if image_query:
        return config.w_ii if image_key else config.w_it
    return config.w_ti if image_key else config.w_tt


def reference_scores(s: Tensor, seg: Tensor, text_class: Tensor, area: Sequence[float], config: DenseConfig,
                     step_weight: float) -> Tensor:
    """s' of docs/densediffusion.md §6 for every query row of s (..., N, N), in joint order.

    seg: (N_img,) region of each image token (-1 none); text_class: (N_txt,) phrase of each text token (-1
    other); area: a_n per region; step_weight: λ_k. With an empty text_class and N = N_img this is SD3.5-M's
    image-only attention, where only the image→image rule applies.
    """
    n_img = seg.numel()
    label = torch.cat([seg, text_class]).tolist()  # region of an image token, phrase of a text token; -1 none
    n = len(label)
    out = s.clone()
    for q in range(n):
        image_query, own = q < n_img, label[q]
        if not image_query and own < 0:
            continue  # text queries outside every phrase are never edited
        size = 1.0 if own < 0 else max(0.0, 1.0 - config.sizereg * area[own])
        for image_keys, keys in ((True, list(range(n_img))), (False, list(range(n_img, n)))):
            w = quadrant_weight(config, image_query, image_keys)
            if w == 0 or not keys:
                continue
            hi = s[..., q, keys].amax(-1)  # M_B(q), per head
            lo = s[..., q, keys].amin(-1)  # m_B(q)
            omega = step_weight * w * size
            for k in keys:
                positive = own >= 0 and label[k] == own  # R: the query's own region / phrase
                if image_query or image_keys:
                    negative = not positive  # Q: every other key of the block
                else:
                    negative = label[k] >= 0 and not positive  # TT: only the other phrases' tokens
                if config.mode == "hard":
                    if negative and own >= 0:  # image queries in no region are left alone
                        out[..., q, k] = -float("inf")
                    continue
                out[..., q, k] = s[..., q, k] + omega * (positive * (hi - s[..., q, k])
                                                         - negative * (s[..., q, k] - lo))
    return out


def reference_row_constant(s: Tensor, seg: Tensor, text_class: Tensor, area: Sequence[float],
                           config: DenseConfig, step_weight: float) -> Tensor:
    """(..., N): ω_{A→I}(q)·m_I(q), the per-row constant the fast soft path leaves out (docs/densediffusion.md
    §6, "The form the code runs"); zero in hard mode and on rows whose image block is not edited."""
    n_img = seg.numel()
    label = torch.cat([seg, text_class]).tolist()
    out = torch.zeros(s.shape[:-1])
    if config.mode == "hard" or n_img == 0:
        return out
    for q in range(len(label)):
        image_query, own = q < n_img, label[q]
        if not image_query and own < 0:
            continue
        size = 1.0 if own < 0 else max(0.0, 1.0 - config.sizereg * area[own])
        omega = step_weight * quadrant_weight(config, image_query, True) * size
        out[..., q] = omega * s[..., q, :n_img].amin(-1)
    return out
