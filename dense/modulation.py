"""DenseDiffusion's attention-score modulation inside SD3's joint attention (docs/densediffusion.md §6, §8).

DenseDiffusion (Kim et al. 2023, naver-ai/DenseDiffusion) steers a pretrained model with a layout by
editing attention scores before the softmax. SD3 has one joint attention over [image tokens; text tokens]
instead of a UNet's separate self- and cross-attention, so the keys of a query's row are split into an
image block I and a text block T, and each block gets DenseDiffusion's rule with its own row range:

    s'_qk = s_qk + c · ( R_qk · (M_B(q) − s_qk) − Q_qk · (s_qk − m_B(q)) ),   c = λ_k · w_AB · size(q)

R are the keys the query should attend to (its own region / its own phrase), Q the keys it should not,
M_B / m_B the max / min of the query's scores over block B (per head). A positive key moves a fraction c
of the way up to the block maximum, a negative key a fraction c down to the block minimum. Neutral keys
(in neither set) keep their score. The sets per quadrant (A = query kind, B = key kind):

    II  image n -> image:  R = region n,          Q = every other image key
    IT  image n -> text:   R = phrase n's tokens, Q = every other text key (other phrases, BOS/EOS, padding)
    TI  phrase n -> image: R = region n,          Q = every other image key
    TT  phrase n -> text:  R = phrase n's tokens, Q = other phrases' tokens (the rest is neutral)

An image query in no region has R empty and Q everything ("flattened", with size 1); text queries outside
every phrase are never changed. `size(q) = max(0, 1 − sizereg·a_n)` weakens the push for large regions.

How it is computed. Within key block B, with W_qk = c on R ∪ Q keys and 0 on neutral ones,

    s' = (1 − W)·s + W·m_B + (c·R)·(M_B − m_B)

(a Q key gets s + c(m − s), an R key s + c(m − s) + c(M − m) = s + c(M − s)). So a modulated row is a
temperature change plus a bias on its positive keys, as in DenseDiffusion's closed form (docs/densediffusion.md §8).
On the image block W·m_I = c_I·m_I is one number per row; soft mode leaves it out, i.e. `modulate`
returns s' − c_I(q)·m_I(q), which has the same softmax and saves a pass over the largest block.
W and c·R are (chunk, L) tables shared by every head and batch row (H times smaller than the scores), so
a chunk costs the four row reductions (max, min per block) and about two in-place passes over the
scores, with nothing (b, H, chunk, L)-sized allocated. Hard mode adds a (chunk, L) table of 0 / −∞: one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from dense.maps import AttentionMaps
from dense.schedule import step_lambdas
from dense.tokens import PhraseMatch, RegionTokens, text_classes
from mmdit.errors import InputError


@dataclass(frozen=True)
class DenseConfig:
    """Weights of the four quadrants and the schedule constants (docs/densediffusion.md §6, §7)."""

    w_ii: float = 0.3  # image -> image (DenseDiffusion's self-attention weight)
    w_it: float = 1.0  # image -> text (DenseDiffusion's cross-attention weight)
    w_ti: float = 0.0  # text -> image (no UNet analogue: off in the faithful preset)
    w_tt: float = 0.0  # text -> text (no UNet analogue: off in the faithful preset)
    hard: bool = False  # exclude Q keys (−∞) instead of pulling them down; weights only switch quadrants on/off
    sizereg: float = 1.0  # size(q) = max(0, 1 − sizereg·a_n)
    power: float = 5.0  # λ_k = strength · u_k^power
    fraction: float = 0.3  # modulate the first round(fraction·K) steps


PRESETS: dict[str, DenseConfig] = {
    "faithful": DenseConfig(),  # DenseDiffusion's two rules, on the image-query rows only
    # faithful's rules with λ decaying linearly over the active steps instead of as the fifth power: the later
    # active steps keep more of the push (measured on the built-in model: README, "Layout control, measured")
    "linear": DenseConfig(power=1.0),
    "joint": DenseConfig(w_ti=1.0, w_tt=0.3),  # the same rules mirrored onto the phrase-token rows
    # λ→∞ counterpart, masked like Regional Prompting: every quadrant on, so the phrase rows are confined too
    "hard": DenseConfig(w_ii=1.0, w_it=1.0, w_ti=1.0, w_tt=1.0, hard=True),
}


@dataclass(frozen=True, eq=False)
class TokenTables:
    """Per-token lookups for one generation, on the attention's device (joint order: image, then text)."""

    n_img: int
    n_txt: int
    query_label: Tensor  # (N,) int64: region of an image query, phrase of a text query; -2 if none (matches no key)
    key_label: Tensor  # (N,) int64: region of an image key, phrase of a text key; -1 if none
    row_weight: Tensor  # (N, 2) fp32: w_{A,B}·size(q) for B = image keys, text keys; 0 for rows never modulated
    row_on: Tensor  # (N, 2) bool: hard mode: the row excludes its Q keys in that key block
    text_is_phrase: Tensor  # (N_txt,) bool: text keys of some phrase (TT's negative set is only these)
    text_rows_modulated: bool  # some phrase (text) query row is modulated (TI or TT on)


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
        text_rows_modulated=bool(row_on[seg.numel():].any()),
    )


@dataclass(frozen=True, eq=False)
class DenseAttention:
    """What the attention needs to modulate (and record) during one model call.

    The attention recomputes the batch rows `rows` explicitly, query chunk by query chunk (at most
    `chunk_size` rows), calling `modulate` on the fp32 scores and `record` on the probabilities.
    """

    method: ClassVar[str] = "dense"  # how `mmdit.attention.attention` tells the layout methods apart
    rows: slice  # batch rows to modulate: the positive (conditional) half
    chunk_size: int  # query rows per explicit chunk
    modulating: bool  # False when the call only records maps
    step_weight: float  # λ_k of this step (0 when not modulating)
    config: DenseConfig
    tables: TokenTables
    maps: AttentionMaps | None = None  # where `record` writes, if maps are being recorded

    def modulate(self, s: Tensor, q0: int, q1: int) -> Tensor:
        """Modulated scores for query rows q0..q1: s (b, H, q1-q0, Lk) fp32, changed in place and returned.

        Lk = N_img + N_txt is joint attention (queries in joint order); Lk = N_img is SD3.5-M's image-only
        `attn2` (queries are image tokens), where only the image->image rule applies. Soft mode returns the
        formula minus a per-row constant (c_I·m_I, see the module docstring): feed the result to a softmax.
        """
        if not self.modulating:
            return s
        t = self.tables
        Lk = s.shape[-1]
        if Lk not in (t.n_img, t.n_img + t.n_txt):
            raise ValueError(f"scores have {Lk} keys; the layout expects {t.n_img} image tokens "
                             f"(+ {t.n_txt} text tokens for joint attention)")
        if s.ndim != 4 or s.shape[-2] != q1 - q0 or not 0 <= q0 < q1 <= Lk:
            raise ValueError(f"scores of shape {tuple(s.shape)} do not match query rows {q0}..{q1} of {Lk}")
        if s.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"modulate works on fp32 scores, got {s.dtype}")
        if s.device != t.key_label.device:
            raise ValueError(f"scores are on {s.device} but the layout tables on {t.key_label.device}; "
                             "build the DensePlan with device= the transformer's device")
        if self.config.hard:
            return self._exclude(s, q0, q1)
        return self._pull(s, q0, q1)

    def _pull(self, s: Tensor, q0: int, q1: int) -> Tensor:
        """Soft mode, in the fewest passes over s; the result is the formula minus c_I(q)·m_I(q) per row.

        Per key block the formula is s' = (1 − W)·s + W·m + (c·R)·(M − m), where W = c on R ∪ Q keys and 0 on
        neutral ones. On the image block W = c_I everywhere, so W·m = c_I·m_I is a constant along the row;
        subtracting it from the whole row changes no softmax and saves a pass over the largest block.
        """
        t, cfg, Ni = self.tables, self.config, self.tables.n_img
        Lk, C = s.shape[-1], q1 - q0
        joint = Lk > Ni
        has_img_rows, has_txt_rows = q0 < Ni, q1 > Ni
        # which key blocks any row of this chunk modulates (II/TI on image keys, IT/TT on text keys)
        img_on = (has_img_rows and cfg.w_ii > 0) or (has_txt_rows and cfg.w_ti > 0)
        txt_on = joint and ((has_img_rows and cfg.w_it > 0) or (has_txt_rows and cfg.w_tt > 0))
        if not (img_on or txt_on):
            return s
        c = self.step_weight * t.row_weight[q0:q1]  # (C, 2): λ·w·size per row and key block
        c_img, c_txt = c[:, :1], c[:, 1:]  # (C, 1) each
        labels = t.query_label[q0:q1, None]  # (C, 1)
        s_img, s_txt = s[..., :Ni], s[..., Ni:]  # (b, H, C, N_img), (b, H, C, N_txt) views

        # row statistics per block, per head, before anything changes
        if img_on:
            hi_img, lo_img = s_img.amax(-1, keepdim=True), s_img.amin(-1, keepdim=True)  # (b, H, C, 1)
        if txt_on:
            hi_txt, lo_txt = s_txt.amax(-1, keepdim=True), s_txt.amin(-1, keepdim=True)  # (b, H, C, 1)
            if has_txt_rows:  # TT: text keys outside every phrase are neutral for phrase rows
                image_row = torch.arange(q0, q1, device=s.device)[:, None] < Ni  # (C, 1)
                w_txt = (image_row | t.text_is_phrase[None, :]) * c_txt  # (C, N_txt)
            else:
                w_txt = c_txt.expand(C, s_txt.shape[-1])  # (C, N_txt)

        # pass 1: s · (1 − W), both blocks at once; a (C, Lk) table shared by all heads
        if img_on and txt_on:
            s.mul_(torch.cat([(1.0 - c_img).expand(C, Ni), 1.0 - w_txt], dim=1))
        elif img_on:
            s_img.mul_(1.0 - c_img)
        else:
            s_txt.mul_(1.0 - w_txt)

        # pass 2, image keys: + c·(M − m) on R keys (+ c·m on every image key is the dropped row constant)
        shift = None
        if img_on:
            s_img.addcmul_((labels == t.key_label[None, :Ni]) * c_img, hi_img - lo_img)
            shift = c_img * lo_img  # (b, H, C, 1)
        # pass 2, text keys: + W·m − shift, then + c·(M − m) on R keys
        if txt_on:
            if has_txt_rows:
                s_txt.addcmul_(w_txt, lo_txt)
                if shift is not None:
                    s_txt.sub_(shift)
            else:
                s_txt.add_(c_txt * lo_txt if shift is None else c_txt * lo_txt - shift)
            s_txt.addcmul_((labels == t.key_label[None, Ni:]) * c_txt, hi_txt - lo_txt)
        elif joint and shift is not None:
            s_txt.sub_(shift)
        return s

    def _exclude(self, s: Tensor, q0: int, q1: int) -> Tensor:
        """Hard mode: Q pairs get −∞; R and neutral pairs keep their score.

        The diagonal is never in Q (a query's own key has its own label, so it is in R), so every row keeps
        at least one finite score.
        """
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

    def for_block(self, index: int) -> DenseAttention:
        """The same modulation in every joint block."""
        return self

    def explicit_queries(self, n_queries: int) -> int:
        """How many leading query rows (of `n_queries`, image rows first) need explicit scores: the image rows,
        which are modulated or recorded, and the text rows only if the preset modulates phrase rows."""
        t = self.tables
        return n_queries if self.modulating and t.text_rows_modulated else min(n_queries, t.n_img)

    def record(self, p: Tensor, q0: int, q1: int) -> None:
        """Accumulate attention probabilities p (b, H, q1-q0, Lk) into the maps, if maps are being recorded."""
        if self.maps is not None:
            self.maps.record(p, q0, q1)


@dataclass(frozen=True, eq=False)
class DensePlan:
    """Everything about one layout-controlled generation; hands out a `DenseAttention` per model call."""

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

    def for_call(self, step: int, positive: slice, *, skip_layers: tuple[int, ...] = ()) -> DenseAttention | None:
        """The modulation for one model call at 0-based `step`, or None for the plain attention path.

        None outside the active steps, and when there is nothing to do (λ_k = 0, i.e. strength 0, or every
        weight 0) unless maps are recorded. Skip-layer-guidance passes (`skip_layers` non-empty) are
        modulated like the main pass but never recorded, so maps average the main pass only.
        """
        if not 0 <= step < self.num_active:
            return None
        cfg = self.config
        weight = self.step_weights[step]
        modulating = weight > 0 and max(cfg.w_ii, cfg.w_it, cfg.w_ti, cfg.w_tt) > 0
        maps = self.maps if not skip_layers else None
        if not modulating and maps is None:
            return None
        return DenseAttention(rows=positive, chunk_size=self.chunk_size, modulating=modulating,
                              step_weight=weight if modulating else 0.0, config=cfg, tables=self.tables,
                              maps=maps)
