"""Key names of the SD3 VAE: diffusers `AutoencoderKL` <-> Stability/LDM (our module names), and vae/config.json.

The correspondence is diffusers' `convert_ldm_vae_checkpoint` (docs/numerics.md §11.3), read backwards as
well as forwards. It is written once, as a table of module paths, and used in both directions.
Two things are not plain renames:

* Decoder levels are numbered in opposite orders: LDM by resolution (`decoder.up.0` is full resolution and
  runs last), diffusers in execution order (`decoder.up_blocks.0` runs first). With n levels,
  `up.{k}` <-> `up_blocks.{n-1-k}`; n is counted from the keys, never assumed to be 4.
* The mid-block attention projections are 1x1 convolutions (C, C, 1, 1) in LDM files and linear layers (C, C)
  in diffusers; the weights are reshaped (same numbers, same storage).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from loaders.safetensors import CheckpointError

# Parts of a residual block and of the mid attention: (LDM name, diffusers name).
RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
PROJECTIONS = {"q", "k", "v", "proj_out"}  # LDM names of the attention parts stored as 1x1 convs

# Every module that holds a weight and a bias: (LDM path, diffusers path). Placeholders:
#   {side} encoder or decoder;  {i} encoder level;  {up} decoder level (numbered in reverse between the two);
#   {j} residual block within a level;  {res} a RESNET_PARTS entry;  {attn} an ATTENTION_PARTS entry.
MODULES = (
    ("{side}.conv_in", "{side}.conv_in"),
    ("{side}.norm_out", "{side}.conv_norm_out"),
    ("{side}.conv_out", "{side}.conv_out"),
    ("{side}.mid.block_1.{res}", "{side}.mid_block.resnets.0.{res}"),
    ("{side}.mid.attn_1.{attn}", "{side}.mid_block.attentions.0.{attn}"),
    ("{side}.mid.block_2.{res}", "{side}.mid_block.resnets.1.{res}"),
    ("encoder.down.{i}.block.{j}.{res}", "encoder.down_blocks.{i}.resnets.{j}.{res}"),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ("decoder.up.{up}.block.{j}.{res}", "decoder.up_blocks.{up}.resnets.{j}.{res}"),
    ("decoder.up.{up}.upsample.conv", "decoder.up_blocks.{up}.upsamplers.0.conv"),
)

# Where the decoder level number sits in each layout (to count the levels before renaming).
_UP_LEVEL = {"ldm": re.compile(r"decoder\.up\.(\d+)\."), "diffusers": re.compile(r"decoder\.up_blocks\.(\d+)\.")}


def _vocabulary(layout: str) -> dict[str, tuple[str, ...] | None]:
    """What each placeholder may match in `layout` (None: a decimal number)."""
    side = 0 if layout == "ldm" else 1
    return {
        "side": ("encoder", "decoder"),
        "i": None,
        "j": None,
        "up": None,
        "res": tuple(pair[side] for pair in RESNET_PARTS.items()),
        "attn": tuple(pair[side] for pair in ATTENTION_PARTS.items()),
    }


def _pattern(template: str, layout: str) -> re.Pattern[str]:
    """A module-path template -> a regex for `<path>.weight|bias`, with one named group per placeholder."""
    vocab = _vocabulary(layout)
    regex, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        choices = vocab[m[1]]
        alternatives = r"\d+" if choices is None else "|".join(map(re.escape, choices))
        regex += re.escape(template[pos : m.start()]) + f"(?P<{m[1]}>{alternatives})"
        pos = m.end()
    return re.compile(regex + re.escape(template[pos:]) + r"\.(?P<param>weight|bias)")


_RULES = {
    layout: [(_pattern(ldm if layout == "ldm" else dif, layout), ldm, dif) for ldm, dif in MODULES]
    for layout in ("ldm", "diffusers")
}


def _count_up_levels(keys: list[str], layout: str) -> int:
    found = {int(m[1]) for k in keys if (m := _UP_LEVEL[layout].match(k))}
    if found and found != set(range(len(found))):
        raise CheckpointError(f"VAE decoder levels must be numbered 0..n-1, found {sorted(found)} ({layout})")
    return len(found)


# Translating a captured part name: source layout -> the other layout.
_PART_TABLES = {
    "ldm": {"res": RESNET_PARTS, "attn": ATTENTION_PARTS},
    "diffusers": {
        "res": {dif: ldm for ldm, dif in RESNET_PARTS.items()},
        "attn": {dif: ldm for ldm, dif in ATTENTION_PARTS.items()},
    },
}


def _translate(fields: dict[str, str], source: str, levels: int) -> dict[str, str]:
    """Placeholder values read in the `source` layout -> the same placeholders in the other layout."""
    out = dict(fields)
    if "up" in out:
        out["up"] = str(levels - 1 - int(out["up"]))  # the reversal is its own inverse
    for name, table in _PART_TABLES[source].items():
        if name in out:
            out[name] = table[out[name]]
    return out


def _convert(sd: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    keys = list(sd)
    levels = _count_up_levels(keys, source)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key in keys:
        for pattern, ldm_template, dif_template in _RULES[source]:
            m = pattern.fullmatch(key)
            if m:
                break
        else:
            unknown.append(key)
            continue
        fields = {name: value for name, value in m.groupdict().items() if value is not None}
        param = fields.pop("param")
        other = _translate(fields, source, levels)
        ldm, dif = (fields, other) if source == "ldm" else (other, fields)
        value = sd[key]
        if ldm.get("attn") in PROJECTIONS and param == "weight":  # 1x1 conv kernel <-> linear matrix
            shape = (value.shape[0], -1) if source == "ldm" else (value.shape[0], -1, 1, 1)
            value = value.reshape(shape)
        target = dif_template.format(**dif) if source == "ldm" else ldm_template.format(**ldm)
        out[f"{target}.{param}"] = value
    if unknown:
        raise CheckpointError(_unknown_message(sorted(unknown), source))
    return out


def _unknown_message(unknown: list[str], source: str) -> str:
    shown = ", ".join(unknown[:8]) + (f" … and {len(unknown) - 8} more" if len(unknown) > 8 else "")
    other = "diffusers" if source == "ldm" else "ldm"
    if any("quant_conv" in k for k in unknown):
        why = "this VAE has quant_conv/post_quant_conv layers, which the SD3 VAE does not: it is not an SD3 VAE"
    elif any(p.fullmatch(k) for k in unknown for p, _, _ in _RULES[other]):
        why = f"these keys already use the {other} names"
    elif any(k.startswith(("first_stage_model.", "vae.")) for k in unknown):
        why = "strip the 'first_stage_model.' prefix when reading the file"
    else:
        why = "they are not part of an SD3 AutoencoderKL"
    names = "diffusers AutoencoderKL" if source == "diffusers" else "LDM/Stability"
    return f"unexpected VAE key(s) for {names} names: {shown} ({why})"


def vae_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKL` state dict -> our (Stability/LDM) names. Values are shared, not copied."""
    return _convert(sd, "diffusers")


def vae_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our (Stability/LDM) VAE state dict -> diffusers `AutoencoderKL` names; the inverse of vae_from_diffusers."""
    return _convert(sd, "ldm")


@dataclass(frozen=True)
class VAESettings:
    """What a diffusers vae/config.json says that the weights cannot: pass these to VAEConfig.from_state_dict."""

    scaling_factor: float
    shift_factor: float
    norm_groups: int


# config.json entries that would change the network, with diffusers' default and what we implement.
_SUPPORTED = (
    ("act_fn", "silu", "silu"),
    ("use_quant_conv", True, False),
    ("use_post_quant_conv", True, False),
    ("mid_block_add_attention", True, True),
)


def vae_config_from_diffusers(config_json: Mapping[str, object]) -> VAESettings:
    """Read scaling_factor, shift_factor and norm_num_groups from a diffusers vae/config.json (already parsed).

    Missing entries take diffusers' class defaults (scaling 0.18215, groups 32); a missing or null
    shift_factor means no shift (0.0). Settings that would need layers this VAE does not have raise.
    """
    name = config_json.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise CheckpointError(f"vae/config.json describes a {name}, not an AutoencoderKL")
    for key, default, supported in _SUPPORTED:
        value = config_json.get(key, default)
        if value != supported:
            raise CheckpointError(
                f"vae/config.json has {key}={value!r} (default {default!r}); the SD3 VAE has {supported!r} "
                "and that is the only variant implemented"
            )
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        kinds = config_json.get(key, [allowed])
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise CheckpointError(f"vae/config.json {key} must be a list of block names, got {kinds!r}")
        kinds = set(kinds)
        if kinds != {allowed}:
            raise CheckpointError(f"vae/config.json {key} must all be {allowed!r}, got {sorted(kinds)}")
    shift = config_json.get("shift_factor")
    scaling = _number(config_json.get("scaling_factor", 0.18215), "scaling_factor")
    if scaling == 0:
        raise CheckpointError("vae/config.json has scaling_factor=0; latents are divided by it (SD3: 1.5305)")
    groups = config_json.get("norm_num_groups", 32)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise CheckpointError(f"vae/config.json has norm_num_groups={groups!r}; it must be a positive whole number "
                              "(SD3: 32)")
    return VAESettings(
        scaling_factor=scaling,
        shift_factor=0.0 if shift is None else _number(shift, "shift_factor"),
        norm_groups=groups,
    )


def _number(value: object, key: str) -> float:
    """A finite number from config.json, or a CheckpointError naming the key (NaN would make every image black)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"vae/config.json has {key}={value!r}; it must be a finite number")
    return float(value)
