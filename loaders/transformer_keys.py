"""The one key map between diffusers' `SD3Transformer2DModel` layout and the Stability layout our MM-DiT uses.

Three things differ besides the names (diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`;
docs/numerics.md §11.2):
* diffusers splits every fused `qkv` into three linears (`to_q/to_k/to_v`, `add_{q,k,v}_proj` for text);
* its `AdaLayerNormContinuous` (the final layer, and the text stream of the last block) chunks its output as
  (scale, shift) where Stability stores (shift, scale): those two weights have their halves swapped;
* nothing else: no transposes, no rescaling. Both directions are pure functions on state dicts.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

# ours (Stability module path) -> diffusers module path(s); several paths are concatenated along dim 0.
GLOBAL_MODULES: dict[str, tuple[str, ...]] = {
    "x_embedder.proj": ("pos_embed.proj",),
    "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
    "context_embedder": ("context_embedder",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
    "final_layer.linear": ("proj_out",),
}
BLOCK_MODULES: dict[str, tuple[str, ...]] = {
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.ln_q": ("attn.norm_q",),
    "x_block.attn.ln_k": ("attn.norm_k",),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.ln_q": ("attn2.norm_q",),
    "x_block.attn2.ln_k": ("attn2.norm_k",),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.ln_q": ("attn.norm_added_q",),
    "context_block.attn.ln_k": ("attn.norm_added_k",),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
}


def swap_halves(t: Tensor) -> Tensor:
    """[a; b] -> [b; a] along dim 0: (shift, scale) <-> (scale, shift). Its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _module_pairs(depth: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """(ours, diffusers paths, swap halves?) for every module a depth-`depth` model can have."""
    pairs = [(o, d, o == "final_layer.adaLN_modulation.1") for o, d in GLOBAL_MODULES.items()]
    for i in range(depth):
        last_context = f"joint_blocks.{i}.context_block.adaLN_modulation.1" if i == depth - 1 else None
        for o, d in BLOCK_MODULES.items():
            ours = f"joint_blocks.{i}.{o}"
            pairs.append((ours, tuple(f"transformer_blocks.{i}.{p}" for p in d), ours == last_context))
    return pairs


def module_pairs(depth: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """The module-level map, for code that maps names rather than state dicts (`loaders.lora`): per module of a
    depth-`depth` model, (our path, its diffusers path(s), whose weights are concatenated along dim 0 in this
    order, and whether its (shift, scale) halves are swapped)."""
    return _module_pairs(depth)


def _depth(sd: dict[str, Tensor], pattern: str) -> int:
    blocks = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return max(blocks) + 1 if blocks else 0


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith("transformer_blocks.") for k in keys)


def transformer_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `SD3Transformer2DModel` state dict -> Stability layout.

    Keys the map does not know are passed through unchanged, so the strict loader reports them by name.
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    if "pos_embed.pos_embed" in sd:
        out["pos_embed"] = sd["pos_embed.pos_embed"]
        used.add("pos_embed.pos_embed")
    for ours, theirs, swap in _module_pairs(_depth(sd, r"transformer_blocks\.(\d+)\.")):
        for param in ("weight", "bias"):
            keys = [f"{p}.{param}" for p in theirs]
            if not all(k in sd for k in keys):
                continue
            t = torch.cat([sd[k] for k in keys], dim=0) if len(keys) > 1 else sd[keys[0]]
            out[f"{ours}.{param}"] = swap_halves(t) if swap else t
            used.update(keys)
    out.update({k: v for k, v in sd.items() if k not in used})
    return out


def transformer_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stability layout -> diffusers `SD3Transformer2DModel` state dict (the inverse of the above)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    if "pos_embed" in sd:
        out["pos_embed.pos_embed"] = sd["pos_embed"]
        used.add("pos_embed")
    for ours, theirs, swap in _module_pairs(_depth(sd, r"joint_blocks\.(\d+)\.")):
        for param in ("weight", "bias"):
            key = f"{ours}.{param}"
            if key not in sd:
                continue
            t = swap_halves(sd[key]) if swap else sd[key]
            for path, part in zip(theirs, t.chunk(len(theirs), dim=0)):
                out[f"{path}.{param}"] = part
            used.add(key)
    out.update({k: v for k, v in sd.items() if k not in used})
    return out


def diffusers_sources(keys: list[str]) -> dict[str, tuple[tuple[str, ...], bool]]:
    """`transformer_from_diffusers` as a recipe, for loaders that read one tensor at a time: for each tensor of
    the Stability layout, the diffusers keys it is made of (concatenated along dim 0, in this order) and whether
    its halves are then swapped. Keys the map does not know stand for themselves, as they pass through above."""
    present = set(keys)
    out: dict[str, tuple[tuple[str, ...], bool]] = {}
    used: set[str] = set()
    if "pos_embed.pos_embed" in present:
        out["pos_embed"] = (("pos_embed.pos_embed",), False)
        used.add("pos_embed.pos_embed")
    for ours, theirs, swap in _module_pairs(_depth(keys, r"transformer_blocks\.(\d+)\.")):
        for param in ("weight", "bias"):
            parts = tuple(f"{p}.{param}" for p in theirs)
            if all(k in present for k in parts):
                out[f"{ours}.{param}"] = (parts, swap)
                used.update(parts)
    out.update({k: ((k,), False) for k in keys if k not in used})
    return out
