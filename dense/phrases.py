"""Phrase-embedding replacement, DenseDiffusion's "dense caption" trick (docs/densediffusion.md §5).

In a full caption the text encoders mix every word with its neighbours ("a red rose ... a blue ocean"
leaks red into the ocean). DenseDiffusion therefore encodes every phrase on its own and pastes those
rows over the phrase's rows in the caption's embeddings; everything else (BOS, EOS, padding, words outside
every phrase, and the pooled vector) keeps the caption's encoding.

In SD3's context the CLIP part is one row per position holding [CLIP-L (768) ‖ CLIP-G (1280) ‖ zeros],
and the T5 part follows; a phrase's CLIP rows skip its own BOS (row 0), its T5 rows start at row 0 (T5
has no BOS). Only the positive prompt's context is changed; the caller passes just those rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from dense.tokens import PhraseMatch


@dataclass(frozen=True, eq=False)
class PhraseEncoding:
    """A phrase encoded alone, with the same settings as the prompt (L_clip CLIP tokens, T5 padded to L_t5).

    L_clip is the prompt's CLIP length (77 in every released model), the match's `clip_length`.
    """

    clip_l: Tensor  # (B, L_clip, D_l): CLIP-L penultimate hidden states
    clip_g: Tensor  # (B, L_clip, D_g): CLIP-G penultimate hidden states
    t5: Tensor | None  # (B, L_t5, D): T5 output, or None when the model runs without T5 (T5 part = zeros)


def replace_phrase_embeddings(
    context: Tensor, encodings: Sequence[PhraseEncoding | None], matches: Sequence[PhraseMatch]
) -> Tensor:
    """The positive context with every phrase's rows replaced by that phrase's own encoding.

    context: (B, L_clip + L_t5, D), the positive prompt's context rows, L_clip being each match's `clip_length`
    (77 in every released model). One encoding and one match per region;
    an encoding may be None for a region whose match is empty (a background region). Channel widths are
    taken from the encodings (D_l, D_g; D for T5), so tiny test models work too. A `t5` of None leaves the
    T5 rows alone, which equals pasting the zeros that a T5-less model uses there. Returns a new tensor.
    """
    if len(encodings) != len(matches):
        raise ValueError(f"got {len(encodings)} phrase encodings for {len(matches)} phrase matches")
    B, S, D = context.shape
    out = context.clone()
    for n, (enc, match) in enumerate(zip(encodings, matches)):
        if not match.clip and not match.t5:
            continue
        if enc is None:
            raise ValueError(f"region {n} has phrase positions but no phrase encoding")
        d_l, d_g = enc.clip_l.shape[-1], enc.clip_g.shape[-1]
        for what, t in (("clip_l", enc.clip_l), ("clip_g", enc.clip_g), ("t5", enc.t5)):
            if t is not None and (t.ndim != 3 or t.shape[0] not in (1, B)):
                raise ValueError(f"region {n}: {what} must be (1 or {B}, tokens, width), got {tuple(t.shape)}")
        clip_length = match.clip_length  # where the prompt's T5 part starts
        if enc.clip_l.shape[1] != clip_length or enc.clip_g.shape[1] != clip_length:
            raise ValueError(f"region {n}: the CLIP encodings must have {clip_length} tokens, as the prompt's, "
                             f"got {enc.clip_l.shape[1]} and {enc.clip_g.shape[1]}")
        if d_l + d_g > D:
            raise ValueError(f"region {n}: CLIP widths {d_l} + {d_g} exceed the context width {D}")
        if match.clip:
            j, w = match.clip.start, len(match.clip)
            # the phrase's own rows 1..w: row 0 is its BOS, which the prompt's BOS row keeps
            out[:, j:j + w, :d_l] = enc.clip_l[:, 1:1 + w].to(out.dtype)
            out[:, j:j + w, d_l:d_l + d_g] = enc.clip_g[:, 1:1 + w].to(out.dtype)
        if match.t5 and enc.t5 is not None:
            if enc.t5.shape[1] != S - clip_length or enc.t5.shape[2] != D:
                raise ValueError(f"region {n}: the T5 encoding must be (B, {S - clip_length}, {D}) like the "
                                 f"prompt's T5 part, got {tuple(enc.t5.shape)}")
            j, w = clip_length + match.t5.start, len(match.t5)
            out[:, j:j + w] = enc.t5[:, :w].to(out.dtype)
    return out
