"""Prompts -> conditioning: finding the tokenizers and text encoders of a model, and running them.

diffusers' `StableDiffusion3Pipeline.encode_prompt` (sd3-diffusers-numerics.md §4.2) is reproduced here from
its parts: tokenizers (`loaders.tokenizers`), encoders (`mmdit.clip`, `mmdit.t5`) and the assembly
(`mmdit.conditioning.assemble`). Precomputed embeddings (`--prompt-embeds`) also come in here.
"""

from __future__ import annotations

from torch import Tensor

from mmdit.conditioning import Conditioning

EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
NEGATIVE_KEYS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")


def repeat_rows(x: Tensor, n: int) -> Tensor:
    """(B, ...) -> (B·n, ...) as prompt0 ×n, prompt1 ×n, ... (diffusers' order for num_images_per_prompt)."""
    return x.repeat_interleave(n, dim=0)


def conditioning_from_embeds(
    embeds: dict[str, Tensor], cfg_on: bool, num_images: int = 1, *, where: str = "the embeddings file"
) -> tuple[Conditioning, Conditioning | None]:
    """Positive (and, with CFG, negative) conditioning from a `--prompt-embeds` file's tensors.

    Each prompt row is repeated `num_images` times. (diffusers, given precomputed embeddings, does not repeat
    them and fails when num_images_per_prompt > 1; we repeat, which is what generating N images means.)
    """
    needed = EMBED_KEYS + (NEGATIVE_KEYS if cfg_on else ())
    missing = [k for k in needed if k not in embeds]
    if missing:
        hint = " (classifier-free guidance is on: add the negative embeddings, or use --cfg 1)" if cfg_on else ""
        raise ValueError(f"{where} lacks {missing}; it has {sorted(embeds)}{hint}")

    def make(context_key: str, pooled_key: str) -> Conditioning:
        context, pooled = embeds[context_key], embeds[pooled_key]
        if context.ndim != 3 or pooled.ndim != 2 or context.shape[0] != pooled.shape[0]:
            raise ValueError(
                f"{where}: {context_key} must be (B, L, D) and {pooled_key} (B, P) with the same B; "
                f"got {tuple(context.shape)} and {tuple(pooled.shape)}"
            )
        return Conditioning(repeat_rows(context, num_images), repeat_rows(pooled, num_images))

    positive = make(*EMBED_KEYS)
    negative = make(*NEGATIVE_KEYS) if cfg_on else None
    if negative is not None and (
        negative.context.shape != positive.context.shape or negative.pooled.shape != positive.pooled.shape
    ):
        raise ValueError(f"{where}: the negative embeddings' shapes differ from the positive ones")
    return positive, negative
