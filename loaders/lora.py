"""LoRA files for SD3 / SD3.5: read the diffusers / PEFT, kohya and ComfyUI formats (MM-DiT, CLIP-L, CLIP-G), map
their keys onto our modules, and merge W' = W + s · (alpha / r) · up @ down into the weights as a model loads
(in float32, rounded once to the weight's dtype), so a step costs what it costs without one. Formats, the key
map and the exactness against diffusers' `fuse_lora`: docs/lora.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mmdit.errors import InputError, MissingInputError
from mmdit.fp8 import FP8Linear, dequantize, quantize
from mmdit.gguf import GGUFLinear
from mmdit.quantized import LowRank, QuantizedLinear

from .safetensors import TensorReader, total
from .transformer_keys import module_pairs

COMPONENTS = ("transformer", "clip_l", "clip_g")  # what a LoRA may adapt: the MM-DiT and the two CLIPs
COMPONENT_NAMES = {"transformer": "the MM-DiT", "clip_l": "CLIP-L", "clip_g": "CLIP-G"}
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' `LORA_ADAPTER_METADATA_KEY`


class LoRAError(InputError):
    """A LoRA file, or the way it was asked for, cannot be used (the message names the key and what to do)."""


class LoRAFormatError(LoRAError):
    """Not a LoRA this engine reads: a bad PATH:SCALE, an empty file, an unsupported adapter kind or tensor."""


class LoRAMismatchError(LoRAError):
    """A LoRA key names no layer of this model, or its factors do not fit the layer's shape."""


class NotForSD3Error(LoRAError):
    """The LoRA was trained for another model family (SD 1.x / SDXL UNet, FLUX, ...)."""


# ------------------------------------------------------------------------------------------------ asking


@dataclass(frozen=True)
class LoRA:
    """One LoRA file and its scale s: what `--lora PATH[:SCALE]` and `Pipeline.load(loras=[...])` take."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoRA:
        """`PATH` or `PATH:SCALE`. A colon followed by something that is not a number is part of the path only if
        that whole path exists (a file name with a colon in it); otherwise the spelling is an error."""
        head, sep, tail = text.rpartition(":")
        if not sep or tail.startswith(("/", "\\")):  # no colon, or one inside the path ("C:\\x", "a:b/c")
            return cls(Path(text).expanduser())
        if not tail:
            raise LoRAFormatError(f"{text!r}: nothing after ':'; give PATH or PATH:SCALE, e.g. "
                                  "--lora style.safetensors:0.8")
        try:
            scale = float(tail)
        except ValueError:
            if Path(text).expanduser().exists():  # a file whose name has a colon in it
                return cls(Path(text).expanduser())
            raise LoRAFormatError(
                f"{text!r}: {tail!r} after the last ':' is not a number; give PATH or PATH:SCALE, e.g. "
                "--lora style.safetensors:0.8"
            ) from None
        if not head:
            raise LoRAFormatError(f"{text!r}: no path before ':{tail}'; give PATH or PATH:SCALE")
        return cls(Path(head).expanduser(), scale).checked()

    @classmethod
    def of(cls, value: LoRA | str | Path | tuple[str | Path, float]) -> LoRA:
        """What `Pipeline.load(loras=)` accepts for one LoRA: a `LoRA`, a `Path` (scale 1), a string spelt as for
        `--lora` (`parse`), or a (path, scale) pair."""
        if isinstance(value, LoRA):
            return value.checked()
        if isinstance(value, Path):
            return cls(value.expanduser())
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (str, Path)):
            try:
                scale = float(value[1])
            except (TypeError, ValueError):
                scale = None
            if scale is not None:
                return cls(Path(value[0]).expanduser(), scale).checked()
        raise LoRAFormatError(f"a LoRA is a path, a (path, scale) pair or a loaders.lora.LoRA; got {value!r}")

    def checked(self) -> LoRA:
        if not math.isfinite(self.scale):
            raise LoRAFormatError(f"LoRA {self.path}: scale {self.scale} is not a finite number")
        return self


# ----------------------------------------------------------------------------------------- key spelling


@dataclass(frozen=True)
class Namespace:
    """One key prefix: which component it adapts, whose module names follow it, and how they are spelt."""

    prefix: str
    component: str  # one of COMPONENTS, or "t5" (refused)
    names: str  # "stability" (our names), "diffusers", or "transformers" (CLIP)
    underscored: bool  # module path written with `_` for `.` (kohya, OneTrainer, LyCORIS)
    format: str  # for messages
    peft: bool = False  # PEFT metadata (`lora_adapter_metadata`) under this prefix applies


NAMESPACES = (
    Namespace("transformer.", "transformer", "diffusers", False, "diffusers/PEFT", peft=True),
    Namespace("base_model.model.", "transformer", "diffusers", False, "PEFT"),
    Namespace("lora_transformer_", "transformer", "diffusers", True, "OneTrainer"),
    Namespace("lycoris_", "transformer", "diffusers", True, "SimpleTuner LyCORIS"),
    Namespace("lora_unet_", "transformer", "stability", True, "kohya"),
    Namespace("diffusion_model.", "transformer", "stability", False, "ComfyUI"),
    Namespace("text_encoder.", "clip_l", "transformers", False, "diffusers/PEFT", peft=True),
    Namespace("text_encoder_2.", "clip_g", "transformers", False, "diffusers/PEFT", peft=True),
    Namespace("lora_te1_", "clip_l", "transformers", True, "kohya"),
    Namespace("lora_te2_", "clip_g", "transformers", True, "kohya"),
    Namespace("text_encoders.clip_l.transformer.", "clip_l", "transformers", False, "ComfyUI"),
    Namespace("text_encoders.clip_g.transformer.", "clip_g", "transformers", False, "ComfyUI"),
    Namespace("text_encoder_3.", "t5", "transformers", False, "diffusers/PEFT"),
    Namespace("lora_te3_", "t5", "transformers", True, "kohya/OneTrainer"),
    Namespace("text_encoders.t5xxl.transformer.", "t5", "transformers", False, "ComfyUI"),
)

# Tensor names after the module path, by role (ComfyUI's `LoRAAdapter.load` spellings; PEFT with its adapter name).
UP = ("lora_up.weight", "lora_B.weight", "lora.up.weight", "lora_linear_layer.up.weight", "lora_B.default.weight")
DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight",
        "lora_A.default.weight")
UP_BIAS = ("lora_B.bias", "lora_up.bias")  # PEFT's `lora_bias=True`
ALPHA = ("alpha",)
# Other adapter kinds, by a tensor name each has (ComfyUI `comfy.weight_adapter`, LyCORIS).
UNSUPPORTED = {
    **dict.fromkeys(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"), "LoHa"),
    **dict.fromkeys(("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"), "LoKr"),
    **dict.fromkeys(("dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.default.weight"), "DoRA"),
    "lora_mid.weight": "LoCon with a Tucker mid weight",
    **dict.fromkeys(("diff", "diff_b", "w_norm", "b_norm", "set_weight"), "full weight differences"),
}
ROLES = {**dict.fromkeys(UP, "up"), **dict.fromkeys(DOWN, "down"), **dict.fromkeys(UP_BIAS, "up_bias"),
         **dict.fromkeys(ALPHA, "alpha")}

# Key patterns of other families' LoRAs, to say what a wrong file is (cf. loaders.checkpoint.OTHER_FAMILIES).
OTHER_FAMILIES = (
    (re.compile(r"^(lora_unet_|unet\.|diffusion_model\.)?(down_blocks|up_blocks|mid_block|input_blocks|"
                r"output_blocks|middle_block)[._]\d*"), "a UNet (Stable Diffusion 1.x / 2.x / SDXL)"),
    (re.compile(r"^unet\."), "a UNet (Stable Diffusion 1.x / 2.x / SDXL)"),
    (re.compile(r"(^|[._])(single_transformer_blocks|single_blocks|double_blocks)[._]\d"), "FLUX"),
)


_SUFFIXES = sorted((*ROLES, *UNSUPPORTED), key=len, reverse=True)  # longest first: "lora_B.bias" before "bias"


def _split(key: str) -> tuple[str, str] | None:
    """`module.path.lora_up.weight` -> ("module.path", "lora_up.weight"); None if no known tensor name ends it."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


# ------------------------------------------------------------------------------------------ the file


@dataclass(frozen=True, eq=False)
class Pair:
    """One adapted layer as the file stores it (tensors as stored; no scale applied yet)."""

    key: str  # the file's module key, e.g. "lora_unet_joint_blocks_0_x_block_attn_qkv"
    namespace: Namespace
    name: str  # the key without the namespace prefix
    up: Tensor  # (out, r) or (out, r, 1, 1)
    down: Tensor  # (r, in) or (r, in, kh, kw)
    alpha: float  # alpha as the format defines it (r when the file gives none)
    rslora: bool  # PEFT use_rslora: alpha / √r instead of alpha / r
    up_bias: Tensor | None  # (out,)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def factor(self, scale: float) -> float:
        """s · alpha / r (PEFT: `scaling` = lora_alpha / r, times `scale_layer`'s lora_scale)."""
        return (self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)) * scale


@dataclass(frozen=True, eq=False)
class LoRAFile:
    """A LoRA file read and checked for its format (not yet against a model): `read_lora`'s result."""

    lora: LoRA
    pairs: tuple[Pair, ...]

    @property
    def formats(self) -> list[str]:
        return sorted({p.namespace.format for p in self.pairs})

    def parts(self, component: str) -> tuple[Pair, ...]:
        return tuple(p for p in self.pairs if p.namespace.component == component)

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if self.parts(c)]

    def describe(self) -> str:
        where = ", ".join(f"{COMPONENT_NAMES[c]} {len(self.parts(c))}" for c in self.components)
        return f"{self.lora.path.name} ({'/'.join(self.formats)}; layers: {where}; scale {self.lora.scale:g})"


def _peft_alpha(config: Mapping, name: str, rank: int) -> tuple[float, bool]:
    """(alpha, use_rslora) of module `name` from a PEFT LoraConfig dict: `alpha_pattern` first (matched as
    `peft.utils.other.get_pattern_key` matches: the pattern must end the name at a `.` boundary), then
    `lora_alpha`, else r (what diffusers' `get_peft_kwargs` assumes without alphas)."""
    rslora = bool(config.get("use_rslora", False))
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise LoRAFormatError(f"its PEFT metadata's alpha_pattern is {patterns!r}, not a mapping of module names to "
                              "alphas")
    for pattern, alpha in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return _metadata_number(alpha, f"alpha_pattern[{pattern!r}]"), rslora
    alpha = config.get("lora_alpha")
    return (_metadata_number(alpha, "lora_alpha") if alpha is not None else float(rank)), rslora


def _metadata_number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoRAFormatError(f"its PEFT metadata's {key} is {value!r}, not a finite number")
    return float(value)


def _finite(t: Tensor) -> bool:
    return math.isfinite(total(t).item())


def _peft_configs(path: Path, metadata: Mapping[str, str]) -> dict[str, dict]:
    """Namespace prefix -> its PEFT LoraConfig dict, from diffusers' `lora_adapter_metadata` JSON, whose keys are
    `<prefix>.<field>` (diffusers `_pack_dict_with_prefix`)."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoRAFormatError(f"LoRA {path}: its '{PEFT_METADATA_KEY}' metadata is not valid JSON ({e})") from None
    if not isinstance(packed, dict):
        raise LoRAFormatError(f"LoRA {path}: its '{PEFT_METADATA_KEY}' metadata is not a JSON object")
    configs: dict[str, dict] = {}
    for ns in NAMESPACES:
        if ns.peft:
            configs[ns.prefix] = {k[len(ns.prefix):]: v for k, v in packed.items() if k.startswith(ns.prefix)}
    return configs


def _alpha(path: Path, key: str, t: Tensor) -> float:
    if t.numel() != 1 or (not t.is_floating_point() and t.dtype not in (torch.int32, torch.int64)):
        raise LoRAFormatError(f"LoRA {path}: {key} should be one number (the module's alpha), "
                              f"found a {t.dtype} tensor of shape {list(t.shape)}")
    value = float(t.reshape(-1)[0])
    if not math.isfinite(value):
        raise LoRAFormatError(f"LoRA {path}: {key} is {value}; the file is damaged")
    return value


def read_lora(lora: LoRA | str | Path | tuple[str | Path, float]) -> LoRAFile:
    """Read a LoRA .safetensors file and check what can be checked without a model: the format of every key, the
    family, the kind of adapter, up/down pairs complete with matching ranks. Never unpickles (`.safetensors`
    only, as for checkpoints)."""
    lora = LoRA.of(lora)
    path = lora.path
    if not path.is_file():
        raise MissingInputError(f"LoRA {path}: no such file" + (" (a folder: give the .safetensors file in it)"
                                                                if path.is_dir() else ""))
    with TensorReader(path) as reader:
        keys = reader.keys()
        if not keys:
            raise LoRAFormatError(f"LoRA {path} holds no tensors; it adapts nothing. Is it the right file?")
        configs = _peft_configs(path, reader.metadata)
        for pattern, family in OTHER_FAMILIES:
            hits = [k for k in keys if pattern.search(k)]
            if hits:
                raise NotForSD3Error(f"LoRA {path} is for {family}, not SD3 / SD3.5 (e.g. key {hits[0]!r}); "
                                     "use a LoRA trained on an SD3 / SD3.5 model")
        groups: dict[str, dict[str, str]] = {}  # module key -> role -> tensor key
        unknown, unsupported, t5 = [], {}, []
        for key in sorted(keys):
            parts = _split(key)
            if parts is None:
                unknown.append(key)
                continue
            module, suffix = parts
            if suffix in UNSUPPORTED:
                unsupported.setdefault(UNSUPPORTED[suffix], key)
                continue
            groups.setdefault(module, {})[ROLES[suffix]] = key
        if unsupported:
            kind, key = next(iter(unsupported.items()))
            raise LoRAFormatError(f"LoRA {path} is a {kind} adapter (e.g. key {key!r}); only plain LoRA "
                                  "(up/down factors, with an optional alpha) is merged here")
        if unknown:
            raise LoRAFormatError(
                f"LoRA {path}: {len(unknown)} key(s) are not LoRA tensors, e.g. {unknown[0]!r}; a LoRA's keys end "
                "in .lora_down.weight / .lora_up.weight / .alpha (kohya, ComfyUI) or .lora_A.weight / .lora_B.weight "
                "(diffusers/PEFT)")
        pairs = []
        unplaced = []
        for module, roles in groups.items():
            ns = next((n for n in NAMESPACES if module.startswith(n.prefix)), None)
            if ns is None:
                unplaced.append(next(iter(roles.values())))
                continue
            if ns.component == "t5":
                t5.append(next(iter(roles.values())))
                continue
            if "up" not in roles or "down" not in roles:
                have = ", ".join(sorted(roles.values()))
                raise LoRAFormatError(f"LoRA {path}: module {module!r} has {have} but not both factors "
                                      "(up and down, or lora_B and lora_A); the file is incomplete")
            up, down = reader.read(roles["up"]), reader.read(roles["down"])
            for role, t in (("up", up), ("down", down)):
                if not t.is_floating_point() or t.ndim not in (2, 4):
                    raise LoRAFormatError(f"LoRA {path}: {roles[role]} should be a 2-D (or 4-D convolution) "
                                          f"float tensor, found {t.dtype} of shape {list(t.shape)}")
                if not _finite(t):  # merged, NaN factors would make every image black
                    raise LoRAFormatError(f"LoRA {path}: {roles[role]} holds NaN or infinite values; the file is "
                                          "damaged (download it again, or ask whoever made it)")
            if down.shape[0] == 0:
                raise LoRAFormatError(f"LoRA {path}: {roles['down']} has rank 0 (shape {list(down.shape)}); it adapts "
                                      "nothing and its scale alpha / r is undefined: the file is damaged")
            if up.shape[1] != down.shape[0] or up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
                raise LoRAMismatchError(
                    f"LoRA {path}: {roles['up']} {list(up.shape)} and {roles['down']} {list(down.shape)} do not "
                    f"multiply (up must be (out, r), down (r, in) with the same rank r); the file is damaged")
            name = module[len(ns.prefix):]
            if "alpha" in roles:
                alpha, rslora = _alpha(path, roles["alpha"], reader.read(roles["alpha"])), False
            elif ns.peft:
                try:
                    alpha, rslora = _peft_alpha(configs.get(ns.prefix, {}), name, down.shape[0])
                except LoRAFormatError as e:
                    raise LoRAFormatError(f"LoRA {path}: {e}") from None
                if configs.get(ns.prefix, {}).get("use_dora"):
                    raise LoRAFormatError(f"LoRA {path}: its PEFT metadata says use_dora; DoRA is not supported")
            else:
                alpha, rslora = float(down.shape[0]), False
            if not math.isfinite(alpha):
                raise LoRAFormatError(f"LoRA {path}: the alpha of {module!r} is {alpha}; the file is damaged")
            bias = reader.read(roles["up_bias"]) if "up_bias" in roles else None
            if bias is not None and not _finite(bias):
                raise LoRAFormatError(f"LoRA {path}: {roles['up_bias']} holds NaN or infinite values; the file is "
                                      "damaged")
            if bias is not None and tuple(bias.shape) != (up.shape[0],):
                raise LoRAMismatchError(f"LoRA {path}: {roles['up_bias']} has shape {list(bias.shape)}, its up "
                                        f"factor {list(up.shape)}: the bias needs ({up.shape[0]},)")
            pairs.append(Pair(module, ns, name, up, down, alpha, rslora, bias))
    if unplaced:
        prefixes = ", ".join(dict.fromkeys(n.prefix for n in NAMESPACES if n.component != "t5"))
        raise LoRAMismatchError(
            f"LoRA {path}: {len(unplaced)} key(s) match no SD3 module, e.g. {unplaced[0]!r}; SD3 LoRA keys start "
            f"with one of {prefixes}")
    if t5:
        raise LoRAFormatError(f"LoRA {path} adapts T5 (e.g. key {t5[0]!r}); T5 LoRAs are not supported (diffusers "
                              "does not load them either): use a LoRA of the MM-DiT and the CLIP encoders only")
    if not pairs:
        raise LoRAFormatError(f"LoRA {path} holds no up/down factor pairs (keys: {', '.join(sorted(keys)[:4])}); "
                              "it adapts nothing")
    return LoRAFile(lora, tuple(pairs))


# ------------------------------------------------------------------------------------ against a model


@dataclass(frozen=True)
class Target:
    """Where a LoRA module lands: our layer, the rows of its weight (a block of a fused qkv), and whether its
    halves are swapped ((scale, shift) in diffusers, (shift, scale) here)."""

    module: str
    rows: tuple[int, int] | None = None
    swap: bool = False


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer a LoRA can adapt: linear layers (float8 and GGUF ones too) and convolutions."""
    kinds = (nn.Linear, nn.Conv2d, QuantizedLinear)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _out_features(layer: nn.Module) -> int:
    return layer.weight.shape[0]


def targets(model: nn.Module, component: str) -> dict[str, dict[tuple[str, bool], Target]]:
    """names -> {(name, underscored): Target} for the module names a LoRA of `component` may use."""
    layers = _layers(model)
    ours = {name: Target(name) for name in layers}
    table = {"stability": ours, "transformers": ours}
    if component == "transformer":
        diffusers: dict[str, Target] = {}
        for mine, theirs, swap in module_pairs(model.config.depth):
            if mine not in layers:
                continue
            n = _out_features(layers[mine]) // len(theirs)
            for i, path in enumerate(theirs):
                diffusers[path] = Target(mine, (i * n, (i + 1) * n) if len(theirs) > 1 else None, swap)
        table["diffusers"] = diffusers
    out: dict[str, dict[tuple[str, bool], Target]] = {}
    for names, found in table.items():
        out[names] = {**{(k, False): t for k, t in found.items()},
                      **{(k.replace(".", "_"), True): t for k, t in found.items()}}
    return out


def _lookup(table: dict[tuple[str, bool], Target], pair: Pair) -> Target | None:
    name, underscored = pair.name, pair.namespace.underscored
    found = table.get((name, underscored))
    if found is None and pair.namespace.names == "transformers":
        # transformers >= 5.6 saves a bare CLIPTextModel without `text_model.` (cf. text_encoders.clip_state_dict)
        found = table.get((("text_model_" if underscored else "text_model.") + name, underscored))
    return found


@dataclass(frozen=True, eq=False)
class Update:
    """One low-rank update in our terms: rows `rows` of `module`'s weight get factor · up @ down (and its bias
    factor · up_bias). What `merge_loras` returns and `unmerge_loras` takes back."""

    module: str
    rows: tuple[int, int] | None
    up: Tensor  # (R, r), halves already swapped where the target needs it
    down: Tensor  # (r, in) or (r, in, kh, kw) as stored
    factor: float  # s · alpha / r
    up_bias: Tensor | None  # (R,)
    key: str  # the file's module key, for messages


def _check_fit(pair: Pair, target: Target, layer: nn.Module, path: Path) -> None:
    stored = isinstance(layer, QuantizedLinear)  # a GGUF weight's shape is that of its packed bytes
    weight = (layer.out_features, layer.in_features) if stored else tuple(layer.weight.shape)
    rows = weight[0] if target.rows is None else target.rows[1] - target.rows[0]
    where = target.module + ("" if target.rows is None else f" rows {target.rows[0]}:{target.rows[1]} (its "
                             f"{'qkv'[target.rows[0] // rows]} block)")
    up, down = tuple(pair.up.shape), tuple(pair.down.shape)
    down_fits = down[1:] == weight[1:] or (len(down) == 4 and len(weight) == 2 and down[2:] == (1, 1)
                                           and down[1] == weight[1])
    if up[0] != rows or not down_fits:
        r = pair.rank
        need_down = [r, *weight[1:]]
        raise LoRAMismatchError(
            f"LoRA {path}: {pair.key} does not fit {where}: up is {list(up)} and down {list(down)}, the layer needs "
            f"up [{rows}, {r}] and down {need_down} (weight {list(weight)}); the LoRA was made for a model of "
            "another size (e.g. SD3.5-Large against Medium) or another architecture")
    if pair.up_bias is not None and getattr(layer, "bias", None) is None:
        raise LoRAMismatchError(f"LoRA {path}: {pair.key} has a bias update but {target.module} has no bias")


def resolve(model: nn.Module, files: Sequence[LoRAFile], component: str) -> tuple[Update, ...]:
    """The updates `files` make to `model` (the MM-DiT for "transformer", a CLIP for "clip_l" / "clip_g"), checked
    key by key against its layers. `model` may live on the meta device: only names and shapes are used."""
    table = targets(model, component)
    layers = _layers(model)
    updates = []
    for file in files:
        for pair in file.parts(component):
            target = _lookup(table[pair.namespace.names], pair)
            if target is None:
                raise LoRAMismatchError(
                    f"LoRA {file.lora.path}: {pair.key} matches no layer of {COMPONENT_NAMES[component]} (read as "
                    f"{pair.namespace.format} key {pair.name!r}, {pair.namespace.names} names); the LoRA was made "
                    "for another model (a deeper one, or without MMDiT-X dual attention) or the key is misspelt")
            layer = layers[target.module]
            _check_fit(pair, target, layer, file.lora.path)
            up = pair.up.reshape(pair.up.shape[0], pair.rank)
            bias = pair.up_bias
            if target.swap:  # diffusers (scale, shift) rows -> ours (shift, scale)
                up = torch.cat(up.chunk(2, dim=0)[::-1])
                bias = None if bias is None else torch.cat(bias.chunk(2)[::-1])
            updates.append(Update(target.module, target.rows, up, pair.down, pair.factor(file.lora.scale), bias,
                                  pair.key))
    return tuple(updates)


def _apply(model: nn.Module, updates: Iterable[Update], sign: float) -> None:
    """Add (sign +1) or subtract (-1) `updates`, in float32, each layer rounded once to its own dtype."""
    by_layer: dict[str, list[Update]] = {}
    for u in updates:
        by_layer.setdefault(u.module, []).append(u)
    layers = _layers(model)
    with torch.no_grad():
        for name, group in by_layer.items():
            layer = layers[name]
            if isinstance(layer, GGUFLinear):
                _apply_low_rank(layer, group, sign)
                continue
            fp8 = isinstance(layer, FP8Linear)
            w = (dequantize(layer.weight, layer.weight_scale, torch.float32) if fp8
                 else layer.weight.detach().to(torch.float32, copy=True))
            flat = w.reshape(w.shape[0], -1)  # a view: a convolution's (out, in, kh, kw) as (out, in·kh·kw)
            b = None
            if any(u.up_bias is not None for u in group):
                b = layer.bias.detach().to(torch.float32, copy=True)
            for u in group:
                rows = slice(None) if u.rows is None else slice(*u.rows)
                up = u.up.to(w.device, torch.float32)
                down = u.down.to(w.device, torch.float32).reshape(u.down.shape[0], -1)
                flat[rows] += (up @ down) * (sign * u.factor)  # PEFT's order: (B @ A) * scaling, then W += it
                if u.up_bias is not None:
                    b[rows] += u.up_bias.to(w.device, torch.float32) * (sign * u.factor)
            if fp8:
                q, scale = quantize(w, per_channel=layer.weight_scale.ndim > 0, dtype=layer.weight.dtype)
                layer.weight.copy_(q)
                layer.weight_scale.copy_(scale)
            else:
                layer.weight.copy_(w)  # in place: the parameter keeps its device, dtype and (pinned) memory
            if b is not None:
                layer.bias.copy_(b)


def _apply_low_rank(layer: GGUFLinear, group: list[Update], sign: float) -> None:
    """A GGUF layer's blocks cannot take a sum: its updates are kept beside it and added to the dequantised
    weight at every call (`mmdit.quantized.QuantizedLinear.matmul_weight`), in float32 as `_apply` adds them;
    taking them back removes them. Bias updates are merged into the (float) bias as for any layer."""
    if sign > 0:
        for u in group:
            device = layer.weight.device
            rows = slice(None) if u.rows is None else slice(*u.rows)
            down = u.down.to(device, torch.float32).reshape(u.down.shape[0], -1)
            layer.low_rank.append(LowRank(rows, u.up.to(device, torch.float32), down, u.factor, source=u))
    else:
        layer.low_rank[:] = [r for r in layer.low_rank if not any(r.source is u for u in group)]
    if any(u.up_bias is not None for u in group):
        b = layer.bias.detach().to(torch.float32, copy=True)
        for u in group:
            if u.up_bias is not None:
                rows = slice(None) if u.rows is None else slice(*u.rows)
                b[rows] += u.up_bias.to(b.device, torch.float32) * (sign * u.factor)
        layer.bias.copy_(b)


def merge_loras(model: nn.Module, files: Sequence[LoRAFile], component: str = "transformer") -> tuple[Update, ...]:
    """Merge every update `files` make to `model` (see `resolve`) into its weights; returns them (for
    `unmerge_loras`). Nothing is changed unless every key fits."""
    updates = resolve(model, files, component)
    _apply(model, updates, +1.0)
    return updates


def unmerge_loras(model: nn.Module, updates: Sequence[Update]) -> None:
    """Subtract what `merge_loras` added (float32 weights come back to within rounding; docs/lora.md)."""
    _apply(model, updates, -1.0)


def check_transformer_loras(model_on_meta: nn.Module, files: Sequence[LoRAFile]) -> None:
    """Every MM-DiT key of `files` fits `model_on_meta` (an MMDiT built on the meta device): the errors at load
    time, before any weight is read."""
    resolve(model_on_meta, files, "transformer")


def lora_records(files: Sequence[LoRAFile]) -> list[dict]:
    """What the PNG metadata says about the LoRAs that made an image."""
    return [{"path": str(f.lora.path), "scale": f.lora.scale, "formats": f.formats, "components": f.components}
            for f in files]

