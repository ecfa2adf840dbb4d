"""Regional Prompting, the second layout method: each region gets its own prompt, masked in the joint attention.

Chen et al. 2024, "Training-free Regional Prompting for Diffusion Transformers" (arXiv 2411.02395, §3; code:
antonioo-c/Regional-Prompting-FLUX, `RegionalFluxAttnProcessor2_0`, and its SD3.5 port
shauray8/Regional-Prompting-SD3.5). Where DenseDiffusion edits scores, this method hard-masks them
(docs/layout-control.md):

* every region's phrase is a prompt of its own, encoded alone; the encodings are appended to the base prompt's
  on the token axis, so one joint sequence holds [image; base text; prompt 0 text; prompt 1 text; ...];
* a background prompt covers the image tokens no region with words owns (only when there are such tokens);
* the "regional pass" attends with a boolean mask: a prompt's text and its region's image tokens see each
  other, text sees its own prompt only, image sees image of its own region only; the base text is unseen;
* a "base pass" beside it is the plain attention over [image; base text], as if there were no layout;
* the image tokens' output is (1 − β)·regional + β·base; the base text's rows are the base pass's, the
  regional text's rows the regional pass's. The pooled vector stays the base prompt's;
* only during the first `inject_steps` steps (later steps are the plain generation of the base prompt), and
  the mask only in blocks k with k % inject_interval == 0; the other blocks of those steps run the regional
  pass unmasked over [image; regional texts], as upstream does (its processor drops the mask but keeps the
  regional text and the blend).

Labels make the mask one comparison: an image token carries the index of its prompt, a regional text token its
prompt's index, a base text token −1; in a masked block a query sees a key iff both labels are equal and ≥ 0.
`dense.regional_reference` writes the same rules pair by pair, the oracle for the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from mmdit.errors import InputError

BASE = -1  # label of the base prompt's text tokens


@dataclass(frozen=True)
class RegionalConfig:
    """Regional Prompting's knobs; the defaults are the upstream examples' (`infer_flux_regional.py`)."""

    base_ratio: float = 0.3  # β: the base pass's share of the image tokens' attention output
    inject_steps: int = 10  # the first steps that use the regional prompts (upstream: 10 of 24)
    inject_interval: int = 1  # mask the blocks k with k % interval == 0 (1: every block)

    def __post_init__(self) -> None:
        if not 0.0 <= self.base_ratio <= 1.0:
            raise InputError(f"base ratio must be in [0, 1], got {self.base_ratio}")
        if self.inject_steps < 0:
            raise InputError(f"inject steps must be >= 0, got {self.inject_steps}")
        if self.inject_interval < 1:
            raise InputError(f"inject interval must be >= 1, got {self.inject_interval}")


@dataclass(frozen=True, eq=False)
class RegionalPrompts:
    """Which prompt each image token follows."""

    texts: tuple[str, ...]  # the regional prompts in text order: the worded regions' phrases, then the background
    image_label: Tensor  # (N_img,) int64: index into `texts` of every image token
    background: bool  # the last prompt is the background prompt


def regional_prompts(seg: Tensor, phrases: Sequence[str], background: str) -> RegionalPrompts:
    """Prompts and image labels from the token assignment (`dense.assign_tokens(...).seg`, −1 = no region).

    A region with a phrase is a prompt of its own. Tokens of no region and of regions with an empty phrase
    (the layout's background regions) follow `background`, added as the last prompt if any token needs it.
    """
    index, texts = {}, []
    for n, phrase in enumerate(phrases):
        if phrase:
            index[n] = len(texts)
            texts.append(phrase)
    label = torch.full_like(seg, len(texts))  # (N_img,) the background's index until a region claims the token
    for n, p in index.items():
        label[seg == n] = p
    has_background = bool((label == len(texts)).any())
    if has_background:
        texts.append(background)
    return RegionalPrompts(tuple(texts), label, has_background)


def joint_labels(image_label: Tensor, n_base: int, n_prompts: int, prompt_length: int) -> Tensor:
    """(N_img + n_base + n_prompts·prompt_length,) int64 labels in joint order: image, base text, each prompt's
    text (prompt p's tokens labelled p), base text labelled BASE."""
    text = torch.arange(n_prompts).repeat_interleave(prompt_length)  # (n_prompts·prompt_length,)
    return torch.cat([image_label, torch.full((n_base,), BASE, dtype=torch.int64), text])


def regional_mask(labels: Tensor, n_img: int, n_base: int, masked: bool = True) -> Tensor:
    """(L, L) bool, True where query row i may attend to key column j in the regional pass.

    Masked: equal labels, neither the base text. Unmasked (blocks between masked ones): every image and regional
    text key. The base text's query rows get the base pass's rows (image and base text keys) in both, so no row is
    empty; the attention replaces those rows by the base pass anyway.
    """
    key_regional = labels >= 0  # (L,)
    if masked:
        allowed = (labels[:, None] == labels[None, :]) & key_regional[None, :]
    else:
        allowed = (labels[:, None] >= 0) & key_regional[None, :]
    base_row = labels == BASE
    allowed[base_row] = torch.arange(labels.numel()) < n_img + n_base  # (L,) broadcast over the base rows
    return allowed


def blend(regional: Tensor, base: Tensor, base_ratio: float) -> Tensor:
    """(1 − β)·regional + β·base: upstream's `hidden_states*(1-base_ratio) + hidden_states_base*base_ratio`.

    At β = 1 this is `base` bit for bit (0·x = 0 and 0 + y = y for finite x), the plain generation's value.
    """
    return regional * (1 - base_ratio) + base * base_ratio


@dataclass(frozen=True, eq=False)
class RegionalTables:
    """Per-generation lookups, on the attention's device."""

    n_img: int
    n_base: int  # the base prompt's text tokens (L_clip + L_t5), the start of the regional texts
    masked: Tensor  # (L, L) bool: `regional_mask(..., masked=True)`
    unmasked: Tensor  # (L, L) bool: `regional_mask(..., masked=False)`


@dataclass(frozen=True, eq=False)
class RegionalAttention:
    """What the joint attention needs for one model call (and, after `for_block`, one block)."""

    method: ClassVar[str] = "regional"  # how `mmdit.attention.attention` tells the layout methods apart
    rows: slice  # batch rows with the positive prompt; the others take the plain attention on [image; base text]
    base_ratio: float
    interval: int  # the blocks k with k % interval == 0 apply the mask
    tables: RegionalTables
    masked: bool = True  # this block applies the regional mask

    @property
    def n_img(self) -> int:
        return self.tables.n_img

    @property
    def n_prefix(self) -> int:
        """Image tokens + base text tokens: the keys of the plain attention."""
        return self.tables.n_img + self.tables.n_base

    @property
    def mask(self) -> Tensor:
        return self.tables.masked if self.masked else self.tables.unmasked

    def blend(self, regional: Tensor, base: Tensor) -> Tensor:
        """The image rows' output from the two passes (`blend`)."""
        return blend(regional, base, self.base_ratio)

    def for_block(self, index: int) -> RegionalAttention:
        """This call in joint block `index` (counted over every block of the model, skipped ones included)."""
        return replace(self, masked=index % self.interval == 0)


@dataclass(frozen=True, eq=False)
class RegionalPlan:
    """One generation under Regional Prompting; hands out a `RegionalAttention` per model call."""

    config: RegionalConfig
    prompts: RegionalPrompts
    contexts: Tensor  # (n_prompts, S, D): each regional prompt's own encoding, S = the base context's length
    tables: RegionalTables

    @classmethod
    def build(cls, prompts: RegionalPrompts, contexts: Tensor, config: RegionalConfig, *,
              device: torch.device | str | None = None) -> RegionalPlan:
        """`contexts`: the prompts' conditioning contexts (`prompts.texts` order), encoded like the base prompt."""
        n_prompts, n_base = contexts.shape[0], contexts.shape[1]
        if n_prompts != len(prompts.texts):
            raise ValueError(f"{len(prompts.texts)} regional prompts but {n_prompts} encodings")
        n_img = prompts.image_label.numel()
        labels = joint_labels(prompts.image_label, n_base, n_prompts, n_base)
        tables = RegionalTables(n_img, n_base, regional_mask(labels, n_img, n_base, True).to(device),
                                regional_mask(labels, n_img, n_base, False).to(device))
        return cls(config, prompts, contexts.to(device), tables)

    def active(self, step: int) -> bool:
        return 0 <= step < self.config.inject_steps

    def for_call(self, step: int, positive: slice) -> RegionalAttention | None:
        """The regional attention at 0-based `step`, or None (the plain attention) past the inject steps.

        Skip-layer-guidance passes get it like the main pass: they predict the positive prompt, which during these
        steps is the regional one (docs/layout-control.md).
        """
        if not self.active(step):
            return None
        cfg = self.config
        return RegionalAttention(rows=positive, base_ratio=cfg.base_ratio, interval=cfg.inject_interval,
                                 tables=self.tables)

    def context(self, context: Tensor, positive: slice) -> Tensor:
        """The model's context during the inject steps: (B, S, D) -> (B, S·(1 + n_prompts), D).

        The positive rows get the regional prompts' encodings after their own; the other rows (the negative half
        of CFG) get their own context repeated, which only their own padding tokens ever see (their attention is
        the plain one over [image; first S text tokens]): a filler that keeps the batch one tensor.
        """
        B, S, _ = context.shape
        n = self.contexts.shape[0]
        extra = context.repeat(1, n, 1)  # (B, n·S, D)
        rows = range(B)[positive]
        extra[positive] = self.contexts.to(context).reshape(1, n * S, -1).expand(len(rows), -1, -1)
        return torch.cat([context, extra], dim=1)  # (B, S·(1 + n), D)
