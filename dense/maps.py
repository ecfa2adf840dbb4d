"""Image→phrase attention maps and the in-region statistic (docs/densediffusion.md §10).

For each region n with words of its own, the map is how much probability each image token's query puts
on phrase n's text tokens (summed over the phrase's tokens, CLIP and T5 copies), averaged over heads, the
positive batch rows, attention calls (blocks) and the recorded steps. F_n, the in-region fraction, is the
part of phrase n's total attention that comes from image tokens inside region n: a model blind to the
layout gives F_n ≈ a_n (the region's area), layout control should push it up.

`AttentionMaps` is the one mutable object of the package: `ScoreEdit.record` adds into it during
sampling. Writing PNGs and stats.json is the CLI's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


class AttentionMaps:
    """Accumulates image→phrase attention for the regions that have a phrase.

    seg: (N_img,) region index per image token (-1 none); grid: (rows, cols) of the token grid;
    regions: the indices of the recorded regions; phrases: their phrases; positions: for each, its joint
    text positions (0..N_txt-1); area: a_n of each recorded region.
    """

    def __init__(self, seg: Tensor, grid: tuple[int, int], regions: Sequence[int], phrases: Sequence[str],
                 positions: Sequence[Sequence[int]], area: Sequence[float], n_txt: int,
                 device: torch.device | str | None = None) -> None:
        if not (len(regions) == len(phrases) == len(positions) == len(area)):
            raise ValueError("regions, phrases, positions and area must have one entry per recorded region")
        self.grid = grid
        self.regions = tuple(regions)
        self.phrases = tuple(phrases)
        self.area = tuple(float(a) for a in area)
        self.n_img, self.n_txt = seg.numel(), n_txt
        self.seg = seg.to(device)
        # (N_txt, R'): column r selects the text tokens of recorded region r
        self.phrase_columns = torch.zeros(n_txt, len(regions), device=device)
        for r, pos in enumerate(positions):
            self.phrase_columns[list(pos), r] = 1.0
        self.sums = torch.zeros(self.n_img, len(regions), device=device)  # (N_img, R') summed mean-probabilities
        self.counts = torch.zeros(self.n_img, device=device)  # (N_img,) how many calls recorded each token
        self.calls = 0  # attention calls that recorded the first image token (for reporting)

    def record(self, p: Tensor, q0: int, q1: int) -> None:
        """Add one chunk of joint-attention probabilities p: (b, H, q1-q0, N_img + N_txt), query rows q0..q1."""
        if p.shape[-1] != self.n_img + self.n_txt:
            return  # image-only attention (SD3.5-M attn2) has no text keys to record
        r1 = min(q1, self.n_img)
        if r1 <= q0:
            return  # a chunk of text queries
        b, H = p.shape[0], p.shape[1]
        to_text = p[:, :, :r1 - q0, self.n_img:].sum(dim=(0, 1), dtype=torch.float32)  # (C_img, N_txt)
        self.sums[q0:r1] += (to_text @ self.phrase_columns) / (b * H)  # (C_img, R')
        self.counts[q0:r1] += 1
        if q0 == 0:
            self.calls += 1

    def region_maps(self) -> dict[int, Tensor]:
        """Region index -> (rows, cols) float32 CPU map of mean attention on that region's phrase."""
        mean = (self.sums / self.counts.clamp(min=1)[:, None]).cpu()  # (N_img, R')
        return {n: mean[:, r].reshape(self.grid) for r, n in enumerate(self.regions)}

    def in_region_fractions(self) -> dict[int, float | None]:
        """Region index -> F_n (None when nothing was recorded)."""
        out: dict[int, float | None] = {}
        seg = self.seg.cpu()
        for n, m in self.region_maps().items():
            total = float(m.sum())
            out[n] = float(m.flatten()[seg == n].sum()) / total if total > 0 else None
        return out

    def to_stats(self) -> dict:
        """The stats.json content: {"regions": [{"region", "phrase", "area", "in_region_fraction"}, ...]}."""
        fractions = self.in_region_fractions()
        return {
            "recorded_calls": self.calls,
            "regions": [{"region": n, "phrase": phrase, "area": area, "in_region_fraction": fractions[n]}
                        for n, phrase, area in zip(self.regions, self.phrases, self.area)],
        }


def map_to_image(attention_map: Tensor, height: int, width: int) -> np.ndarray:
    """A (rows, cols) map as an (H, W) uint8 grey image: scaled so its maximum is 255, each token a block."""
    rows, cols = attention_map.shape
    if height % rows or width % cols:
        raise ValueError(f"the image size {width}×{height} is not a multiple of the map's grid {cols}×{rows}")
    m = attention_map.detach().float().cpu()
    peak = float(m.max())
    scaled = (m / peak * 255.0).round() if peak > 0 else torch.zeros_like(m)
    image = scaled.to(torch.uint8).repeat_interleave(height // rows, 0).repeat_interleave(width // cols, 1)
    return image.numpy()  # (H, W) uint8
