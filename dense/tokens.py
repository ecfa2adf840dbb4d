"""From a layout to token labels: which region each image token and each text token belongs to.

* Image tokens (docs/densediffusion.md §3): SD3 patchifies the latent 2×2, and the VAE downsamples 8×, so each
  image token is a 16×16-pixel cell, row-major over the (H/16) × (W/16) grid. A token belongs to the
  region that covers most of its cell, if that region covers at least half of it.
* Text tokens (docs/densediffusion.md §4): the joint sequence's text part is the CLIP positions (as many as
  the CLIP tokenizers pad to, 77 in every released model) followed by the T5 positions. A phrase is located by
  exact token-id subsequence match, separately in each part, because the two tokenizers split words
  differently (and CLIP truncates at its length, T5 later). The CLIP length is read off the prompt's CLIP ids
  and travels with each match (`PhraseMatch.clip_length`), so nothing here assumes 77.

Everything here is a pure function of masks and id lists; the tokenizers live in `loaders/`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dense.layout import LayoutError, region_name
from mmdit.conditioning import CLIP_TOKENS  # the released models' CLIP length: PhraseMatch's default
from mmdit.errors import InputError

CELL = 16  # pixels per image token side: VAE factor 8 × patch size 2


# ----------------------------------------------------------------------------------------------------------
# Image tokens -> regions (docs/densediffusion.md §3)


@dataclass(frozen=True, eq=False)
class RegionTokens:
    """Image-token side of a layout."""

    seg: Tensor  # (N_img,) int64: region index of each image token (row-major), -1 for none
    coverage: Tensor  # (R, N_img) float32: fraction of each token's 16×16 cell inside each region
    area: tuple[float, ...]  # a_n = |{t : seg(t) = n}| / N_img, per region
    grid: tuple[int, int]  # (rows, cols) of the token grid = (H/16, W/16)

    @property
    def n_img(self) -> int:
        return self.seg.numel()


def assign_tokens(masks: Tensor, phrases: Sequence[str] | None = None) -> RegionTokens:
    """Assign image tokens to regions from (R, H, W) bool pixel masks at the output size.

    Token t goes to the region with the largest coverage c_n(t) if c_n(t) >= 0.5; ties go to the earlier
    region. A region left with no token is an error (it is too small, or other regions win its cells);
    `phrases` (one per region) only make that message name the region.
    """
    R, H, W = masks.shape
    if H % CELL or W % CELL:
        raise InputError(f"the image size {W}×{H} must be a multiple of {CELL} pixels in both directions")
    h, w = H // CELL, W // CELL
    # integer pixel counts per cell keep the 0.5 threshold and the ties exact
    counts = masks.reshape(R, h, CELL, w, CELL).sum(dim=(2, 4), dtype=torch.int64).reshape(R, h * w)  # (R, N_img)
    best = counts.amax(dim=0)  # (N_img,)
    winner = torch.argmax(counts, dim=0)  # (N_img,); argmax returns the first maximum: ties -> earlier region
    seg = torch.where(2 * best >= CELL * CELL, winner, torch.full_like(winner, -1))  # (N_img,)
    n_tokens = torch.bincount(seg[seg >= 0], minlength=R)  # (R,)
    for n in range(R):
        if n_tokens[n] == 0:
            name = region_name(n, phrases[n]) if phrases is not None else f"regions[{n}]"
            raise LayoutError(
                f"{name} covers no image token at {W}×{H}: each token is a {CELL}×{CELL}-pixel cell and belongs to "
                "the region covering most of it, at least half; make the region larger or stop other regions "
                "from overlapping it")
    area = tuple(float(c) / (h * w) for c in n_tokens.tolist())
    coverage = counts.float() / (CELL * CELL)
    return RegionTokens(seg=seg, coverage=coverage, area=area, grid=(h, w))


# ----------------------------------------------------------------------------------------------------------
# Phrases -> text positions (docs/densediffusion.md §4)


@dataclass(frozen=True)
class PhraseMatch:
    """Where a phrase sits in the prompt's text tokens; empty ranges when absent (or for an empty phrase)."""

    clip: range  # positions in the CLIP part (0..clip_length-1); same for CLIP-L and CLIP-G
    t5: range  # positions in the T5 part, counted from the start of the T5 part (0..L_t5-1)
    # The CLIP part's length, where the T5 part starts in the joint text sequence. `match_phrase` sets it from
    # the prompt's CLIP ids; the default is every released model's.
    clip_length: int = CLIP_TOKENS

    @property
    def positions(self) -> tuple[int, ...]:
        """Positions in the joint text sequence (CLIP part first, T5 part from `clip_length`)."""
        return tuple(self.clip) + tuple(self.clip_length + j for j in self.t5)


def find_subsequence(ids: Sequence[int], sub: Sequence[int], start: int = 0) -> int | None:
    """First j >= start with ids[j:j+len(sub)] == sub, or None. An empty `sub` never matches."""
    ids, sub = list(ids), list(sub)
    n = len(sub)
    if n == 0:
        return None
    for j in range(start, len(ids) - n + 1):
        if ids[j:j + n] == sub:
            return j
    return None


def match_phrase(
    prompt_clip_ids: Sequence[int],
    phrase_clip_ids: Sequence[int],
    prompt_t5_ids: Sequence[int] | None,
    phrase_t5_ids: Sequence[int] | None,
    *,
    name: str = "phrase",
    describe_clip: Callable[[Sequence[int]], list[str]] | None = None,
    describe_t5: Callable[[Sequence[int]], list[str]] | None = None,
) -> PhraseMatch:
    """Locate a phrase in the prompt's tokens (first exact match in each part).

    `prompt_clip_ids` are the prompt's CLIP ids as the encoders get them: BOS/EOS/padding included, padded to
    the CLIP length (77 in every released model), whose value becomes the match's `clip_length`, where the T5
    part starts. Pass CLIP-L's ids, whose padding is EOS, so padding can never match. The phrase ids are
    "bare": the phrase tokenized alone with BOS and EOS (CLIP) or the final `</s>` (T5) removed. The CLIP
    search starts at position 1 (after BOS). Pass None for the T5 ids when the model runs without T5 (the T5
    part is zeros then and carries no phrase).
    An empty phrase (no ids in either part) gives empty ranges. A phrase found in neither part is a
    `LayoutError` showing the prompt tokens around the best partial match in each part; `describe_*` turn
    ids into readable token strings for that message (`name` is how the message names the region).
    """
    clip_ids, t5_ids = list(phrase_clip_ids), list(phrase_t5_ids or [])
    length = len(prompt_clip_ids)
    if not clip_ids and not t5_ids:
        return PhraseMatch(clip=range(0), t5=range(0), clip_length=length)
    j = find_subsequence(prompt_clip_ids, clip_ids, start=1)
    clip = range(j, j + len(clip_ids)) if j is not None else range(0)
    j5 = find_subsequence(prompt_t5_ids, t5_ids) if prompt_t5_ids is not None else None
    t5 = range(j5, j5 + len(t5_ids)) if j5 is not None else range(0)
    if clip and not t5 and t5_ids and prompt_t5_ids is not None:
        warnings.warn(f"{name}: the phrase is in the prompt's CLIP tokens but not in its T5 tokens (T5 splits it "
                      "differently there, e.g. glued to punctuation); only its CLIP positions are used", stacklevel=2)
    if not clip and not t5:
        parts = [_near_miss("CLIP", prompt_clip_ids, clip_ids, 1, describe_clip)]
        if prompt_t5_ids is not None:
            parts.append(_near_miss("T5", prompt_t5_ids, t5_ids, 0, describe_t5))
        raise LayoutError(
            f"{name}: the phrase is not in the prompt's tokens. Each phrase must occur word for word in the prompt "
            "(same spelling and punctuation, whole words: 'rose' does not match inside 'roses'); edit the phrase "
            "or the prompt.\n" + "\n".join(parts))
    return PhraseMatch(clip=clip, t5=t5, clip_length=length)


def _near_miss(part: str, prompt: Sequence[int], phrase: list[int], start: int,
               describe: Callable[[Sequence[int]], list[str]] | None) -> str:
    """One message line: the phrase's tokens and the prompt tokens around the window agreeing most with it."""
    show = describe or (lambda ids: [str(i) for i in ids])
    prompt = list(prompt)
    if not phrase:
        return f"  {part}: the phrase has no {part} tokens"
    # score each alignment by the number of phrase tokens equal to the prompt token under them
    best_j, best_hits = start, -1
    for j in range(start, len(prompt)):
        hits = sum(1 for i, t in enumerate(phrase) if j + i < len(prompt) and prompt[j + i] == t)
        if hits > best_hits:
            best_j, best_hits = j, hits
    head = f"  {part}: phrase tokens {show(phrase)}"
    if best_hits <= 0:
        return head + f"; none of them occurs in the prompt's {part} tokens"
    lo, hi = max(0, best_j - 3), min(len(prompt), best_j + len(phrase) + 3)
    return (head + f"; best partial match ({best_hits} of {len(phrase)} tokens) at positions "
            f"{best_j}..{min(best_j + len(phrase), len(prompt)) - 1}, prompt tokens {lo}..{hi - 1}: "
            f"{show(prompt[lo:hi])}")


def text_classes(matches: Sequence[PhraseMatch], n_txt: int, names: Sequence[str] | None = None) -> Tensor:
    """The class of every joint text position: (N_txt,) int64, region index n for phrase(n), -1 for other.

    Two phrases may not claim the same position (that happens when two regions have the same phrase, as
    the first match binds both to the same words): that is a `LayoutError`.
    """
    classes = torch.full((n_txt,), -1, dtype=torch.int64)
    for n, match in enumerate(matches):
        pos = match.positions
        if pos and max(pos) >= n_txt:
            raise ValueError(f"phrase positions {pos} do not fit in {n_txt} text tokens")
        for p in pos:
            other = int(classes[p])
            if other >= 0:
                a = region_name(other, names[other]) if names is not None else f"regions[{other}]"
                b = region_name(n, names[n]) if names is not None else f"regions[{n}]"
                start = match.clip_length
                where = f"CLIP position {p}" if p < start else f"T5 position {p - start}"
                raise LayoutError(f"{a} and {b} bind to the same prompt tokens ({where}); every phrase must have "
                                  "its own words in the prompt, so make the phrases differ")
            classes[p] = n
    return classes
