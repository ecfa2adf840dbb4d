"""Layout control inside SD3's joint attention: DenseDiffusion (docs/densediffusion.md) and Regional Prompting
(`dense.regional`, docs/layout-control.md).

How the pieces fit, for one generation (the pipeline / CLI does the tokenizing and encoding):

1. `read_layout(path)` and `layout_prompt(layout, prompt)`: the validated layout and the prompt.
2. `region_masks(layout, H, W)` then `assign_tokens(masks, phrases)`: image tokens -> regions.
3. per region, `match_phrase(prompt CLIP ids, phrase bare CLIP ids, prompt T5 ids, phrase bare T5 ids,
   name=region_name(i, phrase))`.
4. `replace_phrase_embeddings(positive context, phrase encodings, matches)` (on by default).
5. `DensePlan.build(...)`, then per model call `plan.for_call(step, positive)` -> `ScoreEdit | None`,
   passed to the transformer as `dense=`; the attention calls `edit` and `record` on it.
6. After sampling, `plan.maps.to_stats()`, `plan.maps.region_maps()` and `map_to_image` (if recorded).

`dense.reference` is the score edit written out pair by pair, the oracle the tests compare `ScoreEdit` with;
`dense.regional_reference` is the same for Regional Prompting's mask and attention.
"""

from __future__ import annotations

from dense.layout import (MAX_REGIONS, Layout, LayoutError, Region, box_mask, layout_prompt, parse_layout,
                          read_layout, read_mask, region_masks, region_name, resize_nearest)
from dense.maps import AttentionMaps, map_to_image
from dense.phrases import PhraseEncoding, replace_phrase_embeddings
from dense.regional import (RegionalAttention, RegionalConfig, RegionalPlan, RegionalPrompts, blend,
                            joint_labels, regional_mask, regional_prompts)
from dense.schedule import active_steps, step_lambdas
from dense.score_edit import PRESETS, DenseConfig, DensePlan, ScoreEdit, TokenTables, build_tables
from dense.tokens import (CELL, CLIP_TOKENS, PhraseMatch, RegionTokens, assign_tokens, find_subsequence,
                          match_phrase, text_classes)

__all__ = [
    "MAX_REGIONS", "Layout", "LayoutError", "Region", "box_mask", "layout_prompt", "parse_layout", "read_layout",
    "read_mask", "region_masks", "region_name", "resize_nearest",
    "AttentionMaps", "map_to_image",
    "PhraseEncoding", "replace_phrase_embeddings",
    "RegionalAttention", "RegionalConfig", "RegionalPlan", "RegionalPrompts", "blend", "joint_labels", "regional_mask",
    "regional_prompts",
    "active_steps", "step_lambdas",
    "PRESETS", "DenseConfig", "DensePlan", "ScoreEdit", "TokenTables", "build_tables",
    "CELL", "CLIP_TOKENS", "PhraseMatch", "RegionTokens", "assign_tokens", "find_subsequence", "match_phrase",
    "text_classes",
]
