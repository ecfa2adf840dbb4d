"""DenseDiffusion's score edit inside SD3's joint attention: presets, per-token tables, the per-call edit.

DenseDiffusion (Kim et al. 2023) steers a pretrained model with a layout by editing attention scores before
the softmax; the rule, and the algebra from it to the form `ScoreEdit.edit` runs, are in
docs/densediffusion.md §6. `dense.reference` writes the same rule out pair by pair (the tests' oracle).
`DensePlan` holds one generation's tables and hands out a `ScoreEdit` per model call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from dense.maps import AttentionMaps
from dense.schedule import step_lambdas
from dense.tokens import PhraseMatch, RegionTokens, text_classes
from mmdit.errors import InputError


@dataclass(frozen=True)
class DenseConfig:
    """Weights of the four quadrants, the mode and the schedule constants (docs/densediffusion.md §6, §7)."""

    w_ii: float = 0.3  # image -> image (DenseDiffusion's self-attention weight)
    w_it: float = 1.0  # image -> text (DenseDiffusion's cross-attention weight)
    w_ti: float = 0.0  # text -> image (no UNet analogue: off in the faithful preset)
    w_tt: float = 0.0  # text -> text (no UNet analogue: off in the faithful preset)
    mode: Literal["soft", "hard"] = "soft"  # hard: Q keys get −∞; the weights only switch quadrants on/off
    sizereg: float = 1.0  # size(q) = max(0, 1 − sizereg·a_n)
    power: float = 5.0  # λ_k = strength · u_k^power
    fraction: float = 0.3  # edit the first round(fraction·K) steps

    def __post_init__(self) -> None:
        if self.mode not in ("soft", "hard"):
            raise ValueError(f'mode must be "soft" or "hard", got {self.mode!r}')


# The presets by name (docs/densediffusion.md §1 says what each is for).
PRESETS: dict[str, DenseConfig] = {
    "faithful": DenseConfig(),  # DenseDiffusion's two rules, on the image-query rows only
    "linear": DenseConfig(power=1.0),  # faithful with λ decaying linearly over the active steps
    "joint": DenseConfig(w_ti=1.0, w_tt=0.3),  # the same rules mirrored onto the phrase-token rows
    "hard": DenseConfig(w_ii=1.0, w_it=1.0, w_ti=1.0, w_tt=1.0, mode="hard"),  # every quadrant, Q keys at −∞
}


@dataclass(frozen=True, eq=False)
class TokenTables:
    """Per-token lookups for one generation, on the attention's device (joint order: image, then text)."""

    n_img: int
    n_txt: int
    query_label: Tensor  # (N,) int64: region of an image query, phrase of a text query; -2 if none (matches no key)
    key_label: Tensor  # (N,) int64: region of an image key, phrase of a text key; -1 if none
    row_weight: Tensor  # (N, 2) fp32: w_{A,B}·size(q) for B = image keys, text keys; 0 for rows never edited
    row_on: Tensor  # (N, 2) bool: hard mode: the row excludes its Q keys in that key block
    text_is_phrase: Tensor  # (N_txt,) bool: text keys of some phrase (TT's negative set is only these)
    text_rows_edited: bool  # some phrase (text) query row is edited (TI or TT on)


def build_tables(regions: RegionTokens, text_class: Tensor, config: DenseConfig,
                 device: torch.device | str | None = None) -> TokenTables:
    """Token lookups from the image-token regions and the (N_txt,) text classes (-1 = other)."""
    seg = regions.seg
    size = (1.0 - config.sizereg * torch.tensor(regions.area, dtype=torch.float32)).clamp(min=0.0)  # (R,)
    assigned, phrase = seg >= 0, text_class >= 0
    img_size = torch.where(assigned, size[seg.clamp(min=0)], 1.0)  # (N_img,) size 1 for unassigned rows
    txt_size = torch.where(phrase, size[text_class.clamp(min=0)], 0.0)  # (N_txt,) 'other' rows: never
    row_weight = torch.cat([
        torch.stack([config.w_ii * img_size, config.w_it * img_size], dim=1),
        torch.stack([config.w_ti * txt_size, config.w_tt * txt_size], dim=1),
    ])  # (N, 2)
    # hard mode leaves unassigned image rows alone and ignores size: a row is on iff its quadrant is
    row_on = torch.cat([
        assigned[:, None] & torch.tensor([config.w_ii > 0, config.w_it > 0]),
        phrase[:, None] & torch.tensor([config.w_ti > 0, config.w_tt > 0]),
    ])  # (N, 2)
    key_label = torch.cat([seg, text_class])  # (N,)
    return TokenTables(
        n_img=seg.numel(), n_txt=text_class.numel(),
        query_label=torch.where(key_label >= 0, key_label, -2).to(device),
        key_label=key_label.to(device),
        row_weight=row_weight.to(device),
        row_on=row_on.to(device),
        text_is_phrase=phrase.to(device),
        text_rows_edited=bool(row_on[seg.numel():].any()),
    )


@dataclass(frozen=True, eq=False)
class ScoreEdit:
    """The score edit (and map recording) of one model call: which batch rows, λ_k, the tables.

    The attention recomputes the batch rows `rows` explicitly, query chunk by query chunk (at most
    `chunk_size` rows), calling `edit` on the fp32 scores and `record` on the probabilities.
    """

    method: ClassVar[str] = "dense"  # how `mmdit.attention.attention` tells the layout methods apart
    rows: slice  # batch rows to edit: the positive (conditional) half
    chunk_size: int  # query rows per explicit chunk
    editing: bool  # False when the call only records maps
    step_weight: float  # λ_k of this step (0 when not editing)
    config: DenseConfig
    tables: TokenTables
    maps: AttentionMaps | None = None  # where `record` writes, if maps are being recorded

    def edit(self, s: Tensor, q0: int, q1: int) -> Tensor:
        """Edited scores for query rows q0..q1: s (b, H, q1-q0, Lk) fp32, changed in place and returned.

        Lk = N_img + N_txt is joint attention (queries in joint order); Lk = N_img is SD3.5-M's image-only
        `attn2` (queries are image tokens), where only the image->image rule applies. Soft mode returns s' of
        docs/densediffusion.md §6 minus the per-row constant ω_I(q)·m_I(q): feed the result to a softmax.
        """
        if not self.editing:
            return s
        t = self.tables
        Lk = s.shape[-1]
        if Lk not in (t.n_img, t.n_img + t.n_txt):
            raise ValueError(f"scores have {Lk} keys; the layout expects {t.n_img} image tokens "
                             f"(+ {t.n_txt} text tokens for joint attention)")
        if s.ndim != 4 or s.shape[-2] != q1 - q0 or not 0 <= q0 < q1 <= Lk:
            raise ValueError(f"scores of shape {tuple(s.shape)} do not match query rows {q0}..{q1} of {Lk}")
        if s.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"edit works on fp32 scores, got {s.dtype}")
        if s.device != t.key_label.device:
            raise ValueError(f"scores are on {s.device} but the layout tables on {t.key_label.device}; "
                             "build the DensePlan with device= the transformer's device")
        if self.config.mode == "hard":
            return self._hard(s, q0, q1)
        return self._soft(s, q0, q1)

    def _soft(self, s: Tensor, q0: int, q1: int) -> Tensor:
        """Soft mode as s' = (1 − W)·s + W·m_B + ω·R·(M_B − m_B) per key block, less ω_I·m_I per row
        (docs/densediffusion.md §6, "The form the code runs")."""
        t, cfg, Ni = self.tables, self.config, self.tables.n_img
        Lk, C = s.shape[-1], q1 - q0
        joint = Lk > Ni
        has_img_rows, has_txt_rows = q0 < Ni, q1 > Ni
        # which key blocks any row of this chunk edits (II/TI on image keys, IT/TT on text keys)
        img_on = (has_img_rows and cfg.w_ii > 0) or (has_txt_rows and cfg.w_ti > 0)
        txt_on = joint and ((has_img_rows and cfg.w_it > 0) or (has_txt_rows and cfg.w_tt > 0))
        if not (img_on or txt_on):
            return s
        omega = self.step_weight * t.row_weight[q0:q1]  # (C, 2): ω = λ·w·size per row and key block
        omega_img, omega_txt = omega[:, :1], omega[:, 1:]  # (C, 1) each
        labels = t.query_label[q0:q1, None]  # (C, 1)
        s_img, s_txt = s[..., :Ni], s[..., Ni:]  # (b, H, C, N_img), (b, H, C, N_txt) views

        # row statistics per block, per head, before anything changes
        if img_on:
            hi_img, lo_img = s_img.amax(-1, keepdim=True), s_img.amin(-1, keepdim=True)  # (b, H, C, 1)
        if txt_on:
            hi_txt, lo_txt = s_txt.amax(-1, keepdim=True), s_txt.amin(-1, keepdim=True)  # (b, H, C, 1)
            if has_txt_rows:  # TT: text keys outside every phrase are neutral for phrase rows
                image_row = torch.arange(q0, q1, device=s.device)[:, None] < Ni  # (C, 1)
                W_txt = (image_row | t.text_is_phrase[None, :]) * omega_txt  # (C, N_txt)
            else:
                W_txt = omega_txt.expand(C, s_txt.shape[-1])  # (C, N_txt)

        # pass 1: s · (1 − W), both blocks at once; a (C, Lk) table shared by all heads
        if img_on and txt_on:
            s.mul_(torch.cat([(1.0 - omega_img).expand(C, Ni), 1.0 - W_txt], dim=1))
        elif img_on:
            s_img.mul_(1.0 - omega_img)
        else:
            s_txt.mul_(1.0 - W_txt)

        # pass 2, image keys: + ω·(M − m) on R keys (W·m = ω·m on every image key is the dropped row constant)
        row_constant = None
        if img_on:
            s_img.addcmul_((labels == t.key_label[None, :Ni]) * omega_img, hi_img - lo_img)
            row_constant = omega_img * lo_img  # (b, H, C, 1)
        # pass 2, text keys: + W·m − row constant, then + ω·(M − m) on R keys
        if txt_on:
            if has_txt_rows:
                s_txt.addcmul_(W_txt, lo_txt)
                if row_constant is not None:
                    s_txt.sub_(row_constant)
            else:
                s_txt.add_(omega_txt * lo_txt if row_constant is None else omega_txt * lo_txt - row_constant)
            s_txt.addcmul_((labels == t.key_label[None, Ni:]) * omega_txt, hi_txt - lo_txt)
        elif joint and row_constant is not None:
            s_txt.sub_(row_constant)
        return s

    def _hard(self, s: Tensor, q0: int, q1: int) -> Tensor:
        """Hard mode: Q pairs get −∞, R and neutral pairs keep their score (docs/densediffusion.md §6). A query's
        own key carries its own label, so it is never in Q and every row keeps a finite score."""
        t, Ni = self.tables, self.tables.n_img
        Lk = s.shape[-1]
        on = t.row_on[q0:q1]  # (C, 2)
        other = t.query_label[q0:q1, None] != t.key_label[None, :Lk]  # (C, Lk): not R
        negative = torch.cat([other[:, :Ni] & on[:, :1],
                              other[:, Ni:] & on[:, 1:]], dim=1)  # (C, Lk)
        if Lk > Ni and q1 > Ni:
            image_row = torch.arange(q0, q1, device=s.device)[:, None] < Ni  # (C, 1)
            negative[:, Ni:] &= image_row | t.text_is_phrase[None, :]  # TT: only other phrases are excluded
        # adding a 0/−∞ table is one broadcast pass; masked_fill with a broadcast mask is much slower on CPU
        bias = torch.zeros(negative.shape, dtype=s.dtype, device=s.device).masked_fill_(negative, float("-inf"))
        return s.add_(bias)

    def for_block(self, index: int) -> ScoreEdit:
        """The same edit in every joint block."""
        return self

    def explicit_queries(self, n_queries: int) -> int:
        """How many leading query rows (of `n_queries`, image rows first) need explicit scores: the image rows,
        which are edited or recorded, and the text rows only if the preset edits phrase rows."""
        t = self.tables
        return n_queries if self.editing and t.text_rows_edited else min(n_queries, t.n_img)

    def record(self, p: Tensor, q0: int, q1: int) -> None:
        """Accumulate attention probabilities p (b, H, q1-q0, Lk) into the maps, if maps are being recorded."""
        if self.maps is not None:
            self.maps.record(p, q0, q1)


@dataclass(frozen=True, eq=False)
class DensePlan:
    """Everything about one layout-controlled generation; hands out a `ScoreEdit` per model call."""

    tables: TokenTables
    step_weights: tuple[float, ...]  # λ_k for the active steps k < round(fraction·K)
    config: DenseConfig
    chunk_size: int = 64
    maps: AttentionMaps | None = None

    @classmethod
    def build(
        cls,
        regions: RegionTokens,
        matches: Sequence[PhraseMatch],
        phrases: Sequence[str],
        *,
        n_txt: int,
        sigmas: Sequence[float],
        num_steps: int,
        shift: float,
        config: DenseConfig = PRESETS["faithful"],
        strength: float = 1.0,
        chunk_size: int = 64,
        record_maps: bool = False,
        device: torch.device | str | None = None,
    ) -> DensePlan:
        """Plan a generation from the token assignment (`assign_tokens`), one `match_phrase` result and one
        phrase per region, the text length `n_txt` = L_clip + L_t5 (77 + L_t5 in released models), and the
        sampler's sigmas / step count / shift."""
        R = len(regions.area)
        if not (len(matches) == len(phrases) == R):
            raise ValueError(f"need one phrase match and one phrase per region ({R}), "
                             f"got {len(matches)} and {len(phrases)}")
        if strength < 0:
            raise InputError(f"strength must be >= 0, got {strength}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        text_class = text_classes(matches, n_txt, phrases)
        weights = step_lambdas(sigmas, num_steps, shift=shift, strength=strength, power=config.power,
                               fraction=config.fraction)
        maps = None
        if record_maps:
            recorded = [n for n in range(R) if phrases[n] and matches[n].positions]
            maps = AttentionMaps(regions.seg, regions.grid, recorded, [phrases[n] for n in recorded],
                                 [matches[n].positions for n in recorded], [regions.area[n] for n in recorded],
                                 n_txt, device=device)
        return cls(tables=build_tables(regions, text_class, config, device), step_weights=weights,
                   config=config, chunk_size=chunk_size, maps=maps)

    @property
    def num_active(self) -> int:
        return len(self.step_weights)

    def for_call(self, step: int, positive: slice, *, skip_layers: tuple[int, ...] = ()) -> ScoreEdit | None:
        """The score edit for one model call at 0-based `step`, or None for the plain attention path.

        None outside the active steps, and when there is nothing to do (λ_k = 0, i.e. strength 0, or every
        weight 0) unless maps are recorded. Skip-layer-guidance passes (`skip_layers` non-empty) are
        edited like the main pass but never recorded, so maps average the main pass only.
        """
        if not 0 <= step < self.num_active:
            return None
        cfg = self.config
        weight = self.step_weights[step]
        editing = weight > 0 and max(cfg.w_ii, cfg.w_it, cfg.w_ti, cfg.w_tt) > 0
        maps = self.maps if not skip_layers else None
        if not editing and maps is None:
            return None
        return ScoreEdit(rows=positive, chunk_size=self.chunk_size, editing=editing,
                         step_weight=weight if editing else 0.0, config=cfg, tables=self.tables, maps=maps)
