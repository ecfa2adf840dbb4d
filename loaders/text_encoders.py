"""The three SD3 text encoders (CLIP-L, CLIP-G, T5) from the official files: config.json, key maps, loading.

Reads diffusers folders (`text_encoder/`, `text_encoder_2/`, `text_encoder_3/`), Stability's standalone
`text_encoders/*.safetensors` and the encoders inside combined checkpoints (under `CLIP_L_PREFIX`,
`CLIP_G_PREFIX`, `T5_PREFIX`). All use transformers' names, which are our module names, so the key maps are
small; what they change, and why CLIP-L's projection is the identity: docs/numerics.md §8.1, §11.4. ComfyUI's
scaled-float8 T5 and `weights="fp8"` load through `loaders.fp8.load_streamed`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from mmdit.clip import CLIPConfig, CLIPTextModel
from mmdit.t5 import T5Config, T5Encoder

from .fp8 import (METADATA_KEY, UnsupportedQuantization, check_weights, is_quantized, load_streamed, plain_keys,
                  read_quantization)
from .safetensors import CheckpointError, TensorReader, load_weights, read_meta, read_shapes, read_tensors, weight_files

CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
COMBINED_PREFIXES = {"CLIP-L": CLIP_L_PREFIX, "CLIP-G": CLIP_G_PREFIX, "T5": T5_PREFIX}

_CLIP_FLAT_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")  # transformers >= 5.6 CLIPTextModel
_T5_UNUSED = ("decoder.", "lm_head.")  # parts of a full encoder-decoder T5


# ----------------------------------------------------------------------------------------- config.json


@dataclass(frozen=True)
class TextEncoderJson:
    """What a transformers config.json says that the weights cannot (None: not stated)."""

    num_heads: int | None = None  # CLIP num_attention_heads / T5 num_heads
    activation: str | None = None  # CLIP hidden_act / T5 feed_forward_proj
    eos_token_id: int | None = None  # CLIP: decides the pooling rule (see CLIPConfig.eos_token_id)
    max_distance: int | None = None  # T5 relative_attention_max_distance
    eps: float | None = None  # CLIP layer_norm_eps / T5 layer_norm_epsilon


def read_text_encoder_json(path: str | Path) -> TextEncoderJson:
    """Read a `config.json` (or the one inside the folder `path`) of a CLIP or T5 text encoder."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object")

    def first(*names: str):
        return next((cfg[n] for n in names if cfg.get(n) is not None), None)

    return TextEncoderJson(
        num_heads=first("num_attention_heads", "num_heads"),
        activation=first("hidden_act", "feed_forward_proj"),
        eos_token_id=first("eos_token_id"),
        max_distance=first("relative_attention_max_distance"),
        eps=first("layer_norm_eps", "layer_norm_epsilon"),
    )


def clip_pooling_rule(eos_token_id: int | None) -> int | None:
    """CLIPConfig.eos_token_id from a config.json's eos_token_id, as transformers reads it.

    transformers pools at argmax(ids) when the config says 2 (a legacy value that SD3's configs carry), else
    at the first occurrence of the id. No config.json: SD3's rule, argmax.
    """
    return None if eos_token_id in (None, 2) else eos_token_id


# ------------------------------------------------------------------------------------------- key maps


def clip_state_dict(raw: Mapping[str, Tensor], *, identity_projection: bool) -> dict[str, Tensor]:
    """Official CLIP text-encoder tensors -> `mmdit.clip.CLIPTextModel` state dict (tensors or meta tensors).

    `identity_projection`: the projection is eye(width) (SD3's CLIP-L from Stability files, docs/numerics.md
    §8.1): inserted when `text_projection.weight` is missing, replacing it when present (a clip_l file from
    elsewhere may carry OpenAI's projection, which SD3 never applies). Otherwise a missing projection is an error:
    CLIP-G needs its own.
    """
    if any("transformer.resblocks." in k for k in raw) or "text_projection" in raw:
        raise CheckpointError(
            "this CLIP file is in the open_clip layout (transformer.resblocks.*, fused in_proj); "
            "use the transformers-format clip_g.safetensors / text_encoder_2 of the SD3 release"
        )
    flat = not any(k.startswith("text_model.") for k in raw)
    sd: dict[str, Tensor] = {}
    for key, t in raw.items():
        if flat and key.startswith(_CLIP_FLAT_ROOTS):
            key = "text_model." + key
        if key == "text_model.embeddings.position_ids":  # a buffer of old files; positions are made in forward
            continue
        sd[key] = t
    emb = sd.get("text_model.embeddings.token_embedding.weight")
    if identity_projection and emb is not None:
        # float32 whatever the file holds (float8 has no eye); load_weights casts it with the rest.
        sd["text_projection.weight"] = torch.eye(emb.shape[1], dtype=torch.float32, device=emb.device)
    elif "text_projection.weight" not in sd:
        raise CheckpointError(
            "this CLIP file has no text_projection.weight; only SD3's CLIP-L may lack it (its projection "
            "is the identity), CLIP-G needs its own"
        )
    return sd


def t5_state_dict(raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official T5 encoder tensors -> `mmdit.t5.T5Encoder` state dict (tensors or meta tensors). The embedding
    is `shared.weight`, taken from its tied copy `encoder.embed_tokens.weight` when only that is stored; a full
    T5's decoder and LM head are dropped."""
    if any(k.endswith(("scale_weight", "scaled_fp8")) for k in raw):
        raise CheckpointError(
            "these T5 tensors include scaled-float8 bookkeeping (scale_weight / scaled_fp8), which this key map "
            "does not apply: load such files with load_t5, which reads them (loaders/fp8.py)"
        )
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in raw:
        raise CheckpointError("this is a T5 v1.0 (ReLU) encoder; SD3 uses T5 v1.1 (gated GELU, wi_0/wi_1)")
    sd = {k: t for k, t in raw.items() if not k.startswith(_T5_UNUSED)}
    tied = sd.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in sd and tied is not None:
        sd["shared.weight"] = tied
    return sd


# -------------------------------------------------------------------------------------------- loading


def _sources(files: str | Path | Sequence[str | Path]) -> tuple[list[Path], TextEncoderJson | None, bool]:
    """Weight files, their config.json values (None: none found), and whether they came as a component folder."""
    if isinstance(files, (str, Path)):
        path = Path(files).expanduser()
        if path.is_dir():
            config = read_text_encoder_json(path) if (path / "config.json").is_file() else TextEncoderJson()
            return weight_files(path), config, True
        # A Stability single file carries no config; a transformers config saved beside it as <name>.json
        # supplies what the weights cannot say (e.g. the heads of a CLIP whose width is not a multiple of 64).
        sidecar = path.with_suffix(".json")
        return [path], read_text_encoder_json(sidecar) if sidecar.is_file() else None, False
    return [Path(f).expanduser() for f in files], None, False


def _describe(paths: list[Path], prefix: str) -> str:
    where = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} shards)"
    return where + (f" [{prefix}*]" if prefix else "")


def _check_found(
    shapes: Mapping[str, tuple[int, ...]], markers: tuple[str, ...], paths: list[Path], prefix: str, what: str
) -> None:
    """A clear error when the tensors we need are not under `prefix` (wrong file, or a combined file)."""
    if any(m in shapes for m in markers):
        return
    inside = {name: p for name, p in COMBINED_PREFIXES.items() if read_shapes(paths, p)} if not prefix else {}
    hint = "; it is a combined checkpoint: pass prefix=" + " or ".join(f"{p!r} ({n})" for n, p in inside.items())
    raise CheckpointError(
        f"{_describe(paths, prefix)}: no {what} tensors (no {markers[0]!r}){hint if inside else ''}"
    )


def clip_config(
    files: str | Path | Sequence[str | Path], *, activation: str, num_heads: int | None = None, prefix: str = ""
) -> CLIPConfig:
    """The configuration `load_clip` builds for these files, from their headers and config.json (no tensor data
    is read). Heads: `num_heads`, else config.json, else width // 64. Pooling rule: config.json's eos_token_id
    (see `clip_pooling_rule`), else argmax."""
    paths, found, folder = _sources(files)
    config = found or TextEncoderJson()
    what = f"CLIP text encoder from {_describe(paths, prefix)}"
    if config.activation is not None and config.activation != activation:
        raise CheckpointError(
            f"{what}: config.json says hidden_act={config.activation!r} but activation={activation!r} was asked "
            "for; CLIP-L (text_encoder/) is 'quick_gelu', CLIP-G (text_encoder_2/) is 'gelu'"
        )
    if num_heads is not None and config.num_heads is not None and num_heads != config.num_heads:
        raise CheckpointError(f"{what}: num_heads={num_heads} but config.json says {config.num_heads}")
    markers = ("text_model.encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.mlp.fc1.weight")
    _check_found(read_shapes(paths, prefix), markers, paths, prefix, "CLIP text-model")
    state = clip_state_dict(read_meta(paths, prefix), identity_projection=activation == "quick_gelu" and not folder)
    try:
        cfg = CLIPConfig.from_state_dict(
            state,
            activation=activation,
            num_heads=num_heads if num_heads is not None else config.num_heads,
            eos_token_id=clip_pooling_rule(config.eos_token_id),
        )
    except ValueError as e:
        fix = ""
        if "multiple of 64" in str(e):
            where = paths[0].parent / "config.json" if folder else paths[0].with_suffix(".json")
            fix = f"; write its transformers config.json (with num_attention_heads) to {where}"
        raise CheckpointError(f"{what}: {e}{fix}") from None
    return cfg if config.eps is None else replace(cfg, eps=config.eps)


def load_clip(
    files: str | Path | Sequence[str | Path],
    *,
    activation: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_heads: int | None = None,
    prefix: str = "",
) -> CLIPTextModel:
    """A CLIP text encoder in `dtype` on `device`, configured by `clip_config`.

    `files`: a diffusers component folder (`text_encoder/`, `text_encoder_2/`), a single file, or shards;
    `prefix`: CLIP_L_PREFIX / CLIP_G_PREFIX for a combined checkpoint. `activation`: "quick_gelu" for CLIP-L,
    "gelu" for CLIP-G (checked against config.json when there is one). The "quick_gelu" tower is taken to be
    SD3's CLIP-L: loaded from Stability files (not a folder) its projection is the identity (docs/numerics.md §8.1).
    """
    cfg = clip_config(files, activation=activation, num_heads=num_heads, prefix=prefix)
    paths, _, folder = _sources(files)
    with TensorReader(paths, prefix) as reader:
        if is_quantized(reader):  # ComfyUI scales only T5 and the MM-DiT (t5xxl_scaled_fp8 in sd3_clip.py)
            found = sorted(set(reader.keys()) - set(plain_keys(reader.keys())))[:3] or [METADATA_KEY]
            raise UnsupportedQuantization(
                f"CLIP text encoder from {_describe(paths, prefix)}: stored as scaled float8 ({', '.join(found)} ...); "
                "scaled float8 is read for the MM-DiT and T5 only: use a 16-bit (or plain float8) CLIP file"
            )
    raw = read_tensors(paths, prefix, device=device)
    state = clip_state_dict(raw, identity_projection=activation == "quick_gelu" and not folder)
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    what = f"CLIP text encoder from {_describe(paths, prefix)}"
    return load_weights(model, state, what=what, dtype=dtype, device=device)


def t5_fp32_keys(dtype: torch.dtype) -> Callable[[str], bool] | None:
    """Which keys stay float32 when loading T5 in `dtype`: `wo` for float16 (transformers' rule), else none."""
    if dtype != torch.float16:
        return None
    return lambda key: key.endswith(".DenseReluDense.wo.weight")


def t5_config(files: str | Path | Sequence[str | Path], *, num_heads: int | None = None, prefix: str = "") -> T5Config:
    """The configuration `load_t5` builds for these files, from their headers and config.json (no tensor data
    is read). The head count comes from the weights (the relative-attention table); `num_heads` and config.json
    are only checked against it."""
    paths, config, _ = _sources(files)
    config = config or TextEncoderJson()
    what = f"T5 encoder from {_describe(paths, prefix)}"
    if config.activation is not None and config.activation != "gated-gelu":
        raise CheckpointError(
            f"{what}: config.json says feed_forward_proj={config.activation!r}; SD3's T5 is 'gated-gelu'"
        )
    markers = ("encoder.block.0.layer.0.SelfAttention.q.weight",)
    _check_found(read_shapes(paths, prefix), markers, paths, prefix, "T5 encoder")
    try:
        meta = read_meta(paths, prefix)
        cfg = T5Config.from_state_dict(
            t5_state_dict({k: meta[k] for k in plain_keys(meta)}),
            num_heads if num_heads is not None else config.num_heads,
            max_distance=config.max_distance if config.max_distance is not None else 128,
        )
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from None
    return cfg if config.eps is None else replace(cfg, eps=config.eps)


def load_t5(
    files: str | Path | Sequence[str | Path],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_heads: int | None = None,
    prefix: str = "",
    weights: str = "full",
) -> T5Encoder:
    """The T5 v1.1 encoder in `dtype` on `device` (float16: `wo` kept float32, as transformers does), configured
    by `t5_config`.

    `files`: a diffusers folder (`text_encoder_3/`, sharded or not), a single file (t5xxl_fp16 / fp8_e4m3fn /
    ComfyUI's fp8_e4m3fn_scaled), or shards; `prefix`: T5_PREFIX for a combined checkpoint. weights="fp8": the
    linear layers in float8 with a per-tensor scale, computed in `dtype` (`wo` in float32 under float16).
    """
    check_weights(weights)
    cfg = t5_config(files, num_heads=num_heads, prefix=prefix)
    paths, _, _ = _sources(files)
    with TensorReader(paths, prefix, device=device) as reader:
        if weights == "fp8" or is_quantized(reader):
            what = f"T5 encoder from {_describe(paths, prefix)}"
            quant = read_quantization(reader, what)
            # t5_state_dict only renames and drops keys, so on {key: key} it says where each tensor comes from
            sources = {ours: ((key,), False) for ours, key in t5_state_dict({k: k for k in quant.weights}).items()}
            with torch.device("meta"):
                model = T5Encoder(cfg)
            return load_streamed(model, reader, quant, sources, what=what, fp8=weights == "fp8", dtype=dtype,
                                 device=device, fp32_keys=t5_fp32_keys(dtype))
    state = t5_state_dict(read_tensors(paths, prefix, device=device))
    with torch.device("meta"):
        model = T5Encoder(cfg)
    what = f"T5 encoder from {_describe(paths, prefix)}"
    return load_weights(model, state, what=what, dtype=dtype, device=device, fp32_keys=t5_fp32_keys(dtype))
