"""A layout put to work in one generation: DenseDiffusion (docs/densediffusion.md §2-§5, §10) or Regional
Prompting (docs/layout-control.md).

`dense` holds the pure pieces (layout checks, token assignment, phrase matching, the score edit); this module
feeds them what only a loaded model has: the tokenizers' ids, the encoders' phrase encodings, the schedule.
Order matters for the user: everything that can be wrong with a layout is found by `match_layout`, before any
encoder or transformer is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dense import (PRESETS, AttentionMaps, DenseConfig, DensePlan, Layout, PhraseEncoding, PhraseMatch, RegionalConfig,
                   RegionalPlan, RegionalPrompts, RegionTokens, assign_tokens, map_to_image, match_phrase,
                   region_masks, regional_prompts, replace_phrase_embeddings)
from dense.layout import region_name
from mmdit.conditioning import Conditioning, assemble
from samplers import sigmas

from .files import write_atomic, write_bytes
from .text import EncodedPrompts, TextFiles, clip_length
from .tokenizers import ClipTokenizer, T5Tokenizer


@dataclass(frozen=True)
class LayoutMatch:
    """Where each region is among the image tokens and where its phrase is among the text tokens."""

    layout: Layout
    regions: RegionTokens
    phrases: list[str]
    matches: list[PhraseMatch]

    @property
    def texts_to_encode(self) -> list[str]:
        """The non-empty phrases, each encoded alone for the embedding replacement (docs/densediffusion.md §5)."""
        return [p for p in self.phrases if p]


def match_layout(layout: Layout, prompt: str, files: TextFiles, *, height: int, width: int,
                 max_sequence_length: int, keep: dict | None = None) -> LayoutMatch:
    """`keep`: the caller's cache of loaded tokenizers (as `loaders.text.encode_texts` fills it), if any.

    The prompt's CLIP ids are padded to the CLIP length the encoders will use (`loaders.text.clip_length`, 77 in
    every released model); the matches carry it, so the T5 positions start where the encoded prompt's T5 part does.
    """
    phrases = [r.phrase for r in layout.regions]
    regions = assign_tokens(region_masks(layout, height, width), phrases)
    keep = keep if keep is not None else {}
    # CLIP-G shares the BPE; CLIP-L pads with EOS. CLIP-G's tokenizer is read for its length only.
    clip = keep.get("tokenizer") or ClipTokenizer.from_folder(files.tokenizer)
    clip_g = keep.get("tokenizer_2") or ClipTokenizer.from_folder(files.tokenizer_2)
    t5 = None
    if files.tokenizer_3 is not None:
        t5 = keep.get("tokenizer_3") or T5Tokenizer.from_folder(files.tokenizer_3)
    prompt_clip = clip.encode([prompt], clip_length(files, clip, clip_g)).ids[0].tolist()
    prompt_t5 = t5.encode([prompt], max_sequence_length).ids[0].tolist() if t5 is not None else None
    matches = [
        match_phrase(
            prompt_clip, clip.encode_ids(phrase), prompt_t5, t5.encode_ids(phrase) if t5 is not None else None,
            name=region_name(i, phrase),
            describe_clip=lambda ids: [clip.id_to_token(i) for i in ids],
            describe_t5=(lambda ids: [t5.id_to_token(i) for i in ids]) if t5 is not None else None,
        )
        for i, phrase in enumerate(phrases)
    ]
    return LayoutMatch(layout, regions, phrases, matches)


def plan_layout(
    match: LayoutMatch,
    encoded: EncodedPrompts,
    *,
    steps: int,
    shift: float,
    strength: float,
    preset: str | DenseConfig,
    record_maps: bool,
    max_sequence_length: int,
    device: torch.device | str,
) -> tuple[Conditioning, DensePlan | None]:
    """The positive conditioning with the phrase rows replaced, and the plan for the attention.

    Strength 0 without maps returns the conditioning untouched and no plan: the plain path, bit for bit
    (docs/densediffusion.md §9). Strength 0 with maps records through the explicit attention without editing.
    """
    positive = encoded.positive
    # The text length as encoded: the CLIP length (77 in every released model) + the T5 length. The matches were
    # made on the same tokenizers, so their T5 parts start at the same CLIP length.
    n_txt = positive.context.shape[1]
    if any(m.clip_length + max_sequence_length != n_txt for m in match.matches):
        raise ValueError(f"the phrase matches' CLIP lengths {sorted({m.clip_length for m in match.matches})} + "
                         f"{max_sequence_length} T5 tokens do not make the prompt's {n_txt} text tokens")
    if strength > 0 and encoded.phrases is not None:
        rows = iter(range(len(match.texts_to_encode)))
        e = encoded.phrases
        encodings = []
        for phrase in match.phrases:
            if not phrase:
                encodings.append(None)
                continue
            k = next(rows)
            encodings.append(PhraseEncoding(e.clip_l.penultimate[k : k + 1], e.clip_g.penultimate[k : k + 1],
                                            e.t5[k : k + 1] if e.t5 is not None else None))
        positive = Conditioning(replace_phrase_embeddings(positive.context, encodings, match.matches), positive.pooled)
    if strength == 0 and not record_maps:
        return positive, None
    plan = DensePlan.build(
        match.regions, match.matches, match.phrases, n_txt=n_txt,
        sigmas=sigmas(steps, shift).tolist(), num_steps=steps, shift=shift,
        config=PRESETS[preset] if isinstance(preset, str) else preset,
        strength=strength, record_maps=record_maps, device=device,
    )
    return positive, plan


def attention_map_paths(folder: str | Path, layout: Layout) -> list[Path]:
    """The files `save_attention_maps` writes for `layout`: a map per region with a phrase, then stats.json."""
    folder = Path(folder)
    return [folder / f"region_{n}.png" for n, r in enumerate(layout.regions) if r.phrase] + [folder / "stats.json"]


def save_attention_maps(folder: str | Path, maps: AttentionMaps, size: tuple[int, int]) -> list[Path]:
    """`region_<n>.png` per recorded region and `stats.json` (docs/densediffusion.md §10), each written
    atomically (`loaders.files`); returns their paths."""
    from PIL import Image

    folder = Path(folder)
    written = []
    for n, attention in maps.region_maps().items():
        picture = Image.fromarray(map_to_image(attention, *size))
        written.append(write_atomic(folder / f"region_{n}.png", lambda f, p=picture: p.save(f, format="PNG")))
    stats = write_bytes(folder / "stats.json", json.dumps(maps.to_stats(), indent=2).encode("utf-8"))
    return written + [stats]


def layout_record(layout: Layout) -> dict:
    """The layout as JSON data for the PNG metadata (masks by their file path)."""
    regions = []
    for r in layout.regions:
        entry = {"phrase": r.phrase}
        entry.update({"box": list(r.box)} if r.box is not None else {"mask": str(r.mask_path)})
        regions.append(entry)
    return {"prompt": layout.prompt, "regions": regions, "file": str(layout.path) if layout.path else None,
            **({"background": layout.background} if layout.background is not None else {})}


# ----------------------------------------------------------------------------------------------------------
# Regional Prompting (docs/layout-control.md)


def regional_layout(layout: Layout, background: str | None, *, height: int, width: int) -> RegionalPrompts:
    """Which prompt each image token follows: the region's phrase, or the background prompt (`background`, else the
    layout's "background", else the empty prompt) for tokens of no worded region. The phrases need not be in the
    prompt: each is a prompt of its own."""
    phrases = [r.phrase for r in layout.regions]
    regions = assign_tokens(region_masks(layout, height, width), phrases)
    text = background if background is not None else layout.background if layout.background is not None else ""
    return regional_prompts(regions.seg, phrases, text)


def plan_regional(prompts: RegionalPrompts, encoded: EncodedPrompts, config: RegionalConfig, *,
                  max_sequence_length: int, context_dim: int, device: torch.device | str) -> RegionalPlan:
    """The plan from the regional prompts' encodings (`encode_prompts(..., extra_texts=prompts.texts)`), each
    assembled like the base prompt (one context of L_clip + L_t5 tokens)."""
    e = encoded.phrases
    contexts = assemble(e.clip_l, e.clip_g, e.t5, t5_length=max_sequence_length, context_dim=context_dim).context
    return RegionalPlan.build(prompts, contexts.to(encoded.positive.context.dtype), config, device=device)
