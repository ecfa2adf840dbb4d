"""float8 weights: ComfyUI's scaled-float8 checkpoints, and 16/32-bit checkpoints quantised while they load.

`weights` (`--weights`, `Pipeline.load(weights=)`): "full" holds every weight in the run's dtype, a
float8 file dequantised as it loads; "fp8" holds every linear layer of the MM-DiT and T5 as float8 with a float32
scale (`mmdit.fp8.FP8Linear`), computing in the run's dtype, and keeps a layer the file stores in float8 as
stored. Not given (None), it follows the MM-DiT's file: "fp8" for a file that stores float8, "full" for any
other (`loaders.checkpoint.stored_weights`). Either way the file is read one tensor at a time
(`load_streamed`). The files read (ComfyUI's "scaled fp8" and "comfy_quant" layouts, plain float8) and the
numerics: docs/numerics.md §11.5; any other quantisation is an `UnsupportedQuantization` error naming what it found.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmdit.errors import InputError
from mmdit.fp8 import FP8_DTYPES, FP8Spec, dequantize, quantize, use_fp8_linears

from .safetensors import CheckpointError, TensorReader, check_finite, check_fits, total
from .transformer_keys import swap_halves

WEIGHTS = ("full", "fp8")
# One scale per tensor, as ComfyUI's files hold; per output row is not clearly better (docs/performance.md).
PER_CHANNEL = False

MARKER = "scaled_fp8"  # empty, or 2 elements ("no fp8 matrix products", which changes nothing here)
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # old ("scaled fp8") and new ("comfy_quant") names
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
CONF_SUFFIX = ".comfy_quant"
METADATA_KEY = "_quantization_metadata"
FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}  # comfy_quant "format"
# Tensors by which other quantisation schemes are recognised, to name them instead of listing odd keys.
FOREIGN_SUFFIXES = {
    ".weight_scale_2": "nvfp4 (two-level scales)",
    ".absmax": "bitsandbytes",
    ".quant_map": "bitsandbytes",
    ".qweight": "GPTQ / AWQ integer packing",
    ".qzeros": "GPTQ / AWQ integer packing",
}
SUPPORTED = ("supported: float8_e4m3fn or float8_e5m2 weights with a per-tensor scale (ComfyUI's scaled_fp8 / "
             "comfy_quant files), or a 16/32-bit file (with --weights fp8 it is quantised while loading)")


class UnsupportedQuantization(CheckpointError):
    """A checkpoint quantised in a way this engine does not compute (the message says what and what is)."""


def check_weights(weights: str) -> str:
    """`weights` if it is one of WEIGHTS, else an InputError that lists them."""
    if weights not in WEIGHTS:
        raise InputError(f"weights {weights!r} is not one of {list(WEIGHTS)}: 'fp8' keeps the MM-DiT's and T5's "
                         "linear layers in float8 with a per-tensor scale (about half the memory of 16-bit); "
                         "'full' keeps every weight in --dtype (--weights fp8 / weights='fp8'); by default a float8 "
                         "file stays float8 and any other is full")
    return weights


def _quant_keys(key: str) -> bool:
    """Keys of quantisation bookkeeping: ComfyUI's, and the other schemes' (so that those reach the check)."""
    return key == MARKER or key.endswith((*SCALE_SUFFIXES, *INPUT_SCALE_SUFFIXES, CONF_SUFFIX, *FOREIGN_SUFFIXES))


def is_quantized(reader: TensorReader) -> bool:
    """Whether a component's tensors, or its file's `_quantization_metadata` about them, mark it as float8 with
    ComfyUI's bookkeeping (a combined file's header may describe only its other components)."""
    return any(_quant_keys(k) for k in reader.keys()) or bool(_metadata_layers(reader))


def _metadata_layers(reader: TensorReader) -> dict[str, object]:
    """This component's layers in the header's `_quantization_metadata` (names with or without the prefix)."""
    if METADATA_KEY not in reader.metadata:
        return {}
    try:
        layers = json.loads(reader.metadata[METADATA_KEY]).get("layers", {})
        present = set(reader.keys())
        return {n.removeprefix(reader.prefix): c for n, c in layers.items()
                if f"{n.removeprefix(reader.prefix)}.weight" in present}
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{reader.paths[0]}: its {METADATA_KEY} header entry is not JSON with 'layers' "
                              f"({e})") from None


def plain_keys(keys: Iterable[str]) -> list[str]:
    """The keys that hold weights, without the float8 bookkeeping (marker, scales, comfy_quant)."""
    return [k for k in keys if not _quant_keys(k)]


@dataclass(frozen=True)
class Quantization:
    """What a component's file says about its float8 weights."""

    scales: Mapping[str, Tensor]  # "<layer>.weight" -> float32 scale, () or (out, 1)
    weights: tuple[str, ...]  # the keys that hold weights, in file order (the rest is bookkeeping)


def _layer_confs(reader: TensorReader, what: str) -> dict[str, dict]:
    """Layer -> its comfy_quant JSON, from `<layer>.comfy_quant` tensors and the header's `_quantization_metadata`."""
    confs: dict[str, dict] = {}
    for key in reader.keys():
        if key.endswith(CONF_SUFFIX):
            raw = bytes(reader.read(key).to(torch.uint8).tolist())
            try:
                confs[key[: -len(CONF_SUFFIX)]] = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{what}: {key} is not the JSON a comfy_quant tensor holds ({e})") from None
    for name, conf in _metadata_layers(reader).items():
        confs.setdefault(name, {"format": conf} if isinstance(conf, str) else conf)
    return confs


def read_quantization(reader: TensorReader, what: str) -> Quantization:
    """Check a component's float8 bookkeeping against what is supported and read its scales (small tensors)."""
    keys = reader.keys()
    present = set(keys)
    for key in keys:
        if reader.dtype(key) is None:
            raise UnsupportedQuantization(f"{what}: tensor {key} is stored as an unsupported dtype; {SUPPORTED}")
        for suffix, scheme in FOREIGN_SUFFIXES.items():
            if key.endswith(suffix):
                raise UnsupportedQuantization(f"{what}: {key} belongs to {scheme} quantisation; {SUPPORTED}")
    if MARKER in present:
        marker = reader.dtype(MARKER)
        if marker not in (*FP8_DTYPES, torch.float32):  # float32 marks e4m3fn (comfy.utils.convert_old_quants)
            raise UnsupportedQuantization(f"{what}: its scaled_fp8 marker says {marker}; {SUPPORTED}")
    for layer, conf in _layer_confs(reader, what).items():
        fmt = conf.get("format") if isinstance(conf, dict) else None
        if fmt not in FORMATS:
            raise UnsupportedQuantization(f"{what}: layer {layer} is quantised as {fmt!r} (comfy_quant); {SUPPORTED}")
        if f"{layer}.weight" not in present:
            raise CheckpointError(f"{what}: {layer}{CONF_SUFFIX} describes a layer whose weight is not in the file")
        stored = reader.dtype(f"{layer}.weight")
        if stored != FORMATS[fmt]:
            raise CheckpointError(f"{what}: layer {layer} says {fmt} but its weight is stored as {stored}")
    scales: dict[str, Tensor] = {}
    for key in keys:
        if key.endswith(INPUT_SCALE_SUFFIXES):
            value = reader.read(key)
            if value.numel() != 1 or value.item() != 1.0:
                raise UnsupportedQuantization(
                    f"{what}: {key} = {value.flatten()[:4].tolist()} is an input (activation) scale: this file "
                    "quantises the layers' inputs for float8 matrix products, which this engine never does; "
                    + SUPPORTED
                )
        elif key.endswith(SCALE_SUFFIXES):
            weight = key.rsplit(".", 1)[0] + ".weight"
            if weight not in present:
                raise CheckpointError(f"{what}: scale {key} has no weight {weight} to scale")
            out = reader.shape(weight)[0]
            scale = reader.read(key).to(torch.float32)
            if scale.numel() == 1:
                scale = scale.reshape(())
            elif scale.numel() == out:
                scale = scale.reshape(out, 1)  # one per output row
            else:
                raise UnsupportedQuantization(f"{what}: scale {key} has shape {list(scale.shape)} for a weight of "
                                              f"{out} rows (neither per tensor nor per row); {SUPPORTED}")
            scales[weight] = scale
    return Quantization(scales, tuple(plain_keys(keys)))


def _read(reader: TensorReader, quant: Quantization, parts: tuple[str, ...], swap: bool,
          dtype: torch.dtype | None) -> Tensor:
    """One of our tensors from its file tensors: each dequantised if it has a scale, cast to `dtype` (None: as
    stored, or float32 where a scale applies), concatenated along dim 0, halves swapped if asked."""
    pieces = []
    for key in parts:
        t = reader.read(key)
        if key in quant.scales:
            t = dequantize(t, quant.scales[key].to(t.device), dtype or torch.float32)
        elif dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        pieces.append(t)
    if len({p.dtype for p in pieces}) > 1:  # parts stored in different dtypes: join them in float32
        pieces = [p.to(torch.float32) for p in pieces]
    t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    return swap_halves(t) if swap else t


def _shape(reader: TensorReader, parts: tuple[str, ...], what: str) -> tuple[int, ...]:
    shapes = [reader.shape(k) for k in parts]
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise CheckpointError(f"{what}: {list(parts)} cannot be joined: their shapes are {shapes}")
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def load_streamed(
    module: nn.Module,
    reader: TensorReader,
    quant: Quantization,
    sources: Mapping[str, tuple[tuple[str, ...], bool]],
    *,
    what: str,
    fp8: bool,
    dtype: torch.dtype,
    device: str | torch.device,
    fp32_keys: Callable[[str], bool] | None = None,
    per_channel: bool = PER_CHANNEL,
) -> nn.Module:
    """Load `module` (built on the meta device) strictly from `reader`, one tensor at a time.

    `sources`: for each of the module's keys, the file keys it is made of and whether its halves are swapped
    (`transformer_keys.diffusers_sources`; a key for itself otherwise). With `fp8`, every `nn.Linear` becomes an
    `FP8Linear`: a weight stored in float8 is kept with its scale, any other is quantised here as soon as it is
    read (one scale per tensor, or per row with `per_channel`), so at most one full-precision tensor (and its
    float32 copy) exists at a time. Without `fp8`, float8 weights are dequantised to `dtype` as they are read.
    `fp32_keys` (T5 under float16) names the weights kept, or computed, in float32.
    Returns the module in eval mode, without grads.
    """
    check_fits(module, {k: _shape(reader, parts, what) for k, (parts, _) in sources.items()}, what=what)
    wide = fp32_keys or (lambda key: False)
    specs: dict[str, FP8Spec] = {}
    kept: set[str] = set()  # layers whose float8 weight is taken as the file stores it
    if fp8:
        for name, layer in module.named_modules():
            if isinstance(layer, nn.Linear):
                parts, swap = sources[f"{name}.weight"]
                stored, scale = reader.dtype(parts[0]), quant.scales.get(parts[0])
                compute = torch.float32 if wide(f"{name}.weight") else dtype
                if len(parts) == 1 and not swap and stored in FP8_DTYPES:
                    kept.add(name)
                    specs[name] = FP8Spec(compute, stored, per_channel=scale is not None and scale.ndim > 0)
                else:
                    specs[name] = FP8Spec(compute, per_channel=per_channel)
        use_fp8_linears(module, specs)
    state: dict[str, Tensor] = {}
    totals: dict[str, Tensor] = {}  # each tensor's float64 sum: finite exactly when the tensor is
    for key, (parts, swap) in sources.items():
        layer, _, param = key.rpartition(".")
        spec = specs.get(layer)
        if spec is not None and param == "weight":
            if layer in kept:
                q = reader.read(parts[0])
                scale = quant.scales.get(parts[0], torch.ones((), dtype=torch.float32))
                totals[parts[0]], totals[f"{parts[0]} scale"] = total(q), total(scale)
            else:  # quantised now; the full-precision tensor is dropped before the next one is read
                full = _read(reader, quant, parts, swap, None)
                totals[key] = total(full)
                q, scale = quantize(full, per_channel=spec.per_channel)
                del full
            state[key], state[f"{layer}.weight_scale"] = q.to(device), scale.to(device)
        else:
            target = spec.compute_dtype if spec is not None else (torch.float32 if wide(key) else dtype)
            state[key] = _read(reader, quant, parts, swap, target).to(device)
            if state[key].is_floating_point():
                totals[key] = total(state[key])
    check_finite(totals, what)  # NaN weights would give black images, silently
    module.load_state_dict(state, strict=True, assign=True)
    still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{what}: tensors left without data after loading: {still_meta[:8]}")
    return module.requires_grad_(False).eval()
