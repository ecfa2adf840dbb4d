"""Finding and loading the MM-DiT and the VAE from the official releases.

Two layouts are accepted, and a path decides which:
* a Stability single file, e.g. `sd3.5_large.safetensors`: MM-DiT under `model.diffusion_model.`, VAE under
  `first_stage_model.` (docs/numerics.md §11.1);
* a diffusers folder (the Hugging Face repos, or `save_pretrained` output) with `transformer/` and `vae/`, each a
  `config.json` plus safetensors, possibly sharded (docs/numerics.md §11.1).
The diffusers layout goes through the key maps in `transformer_keys` / `vae_keys`; our modules only know the
Stability names. The configuration is always inferred from tensor shapes; `config.json` only supplies what
shapes cannot tell (the head count of a model without QK-norm, the VAE's latent scale and shift).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit.errors import InputError
from mmdit.model import MMDiT, MMDiTConfig, NotSD3Error
from mmdit.streaming import offload_blocks
from mmdit.vae import VAE, VAEConfig

from .fp8 import check_weights, is_quantized, load_streamed, read_quantization
from .safetensors import CheckpointError, TensorReader, load_weights, read_meta, read_shapes, read_tensors, weight_files
from .transformer_keys import diffusers_sources, is_diffusers_layout, transformer_from_diffusers
from .vae_keys import vae_config_from_diffusers, vae_from_diffusers

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
OFFLOAD = ("none", "blocks")  # where the MM-DiT's weights live: all on the device, or the blocks in CPU memory

# Key fragments of other model families, to say what a wrong file is instead of only what it is not.
OTHER_FAMILIES = {
    "input_blocks.": "a UNet (Stable Diffusion 1.x / 2.x / SDXL)",
    "double_blocks.": "a FLUX transformer",
    "down_blocks.": "a diffusers UNet",
    "conditioner.embedders.": "an SDXL checkpoint",
}


@dataclass(frozen=True)
class Checkpoint:
    """Where the diffusion components live: one single file, or one diffusers folder."""

    path: Path
    single_file: bool

    @property
    def name(self) -> str:
        return self.path.stem if self.single_file else self.path.name


def locate(path: str | Path) -> Checkpoint:
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path}: only .safetensors checkpoints are loaded (pickled .ckpt/.pt/.bin files can run code)"
            )
        return Checkpoint(path, single_file=True)
    if path.is_dir():
        if (path / "transformer").is_dir():
            return Checkpoint(path, single_file=False)
        raise CheckpointError(
            f"{path}: a folder, but not a diffusers pipeline folder (no transformer/ inside). "
            "Give the folder that holds model_index.json, transformer/ and vae/, or a single .safetensors file."
        )
    raise CheckpointError(f"{path}: no such file or folder")


def _what_is_it(keys) -> str:
    for fragment, family in OTHER_FAMILIES.items():
        if any(fragment in k for k in keys):
            return f"; it looks like {family}"
    return ""


def _read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{file}: not a UTF-8 text file; restore the config.json the model came with") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(data).__name__}, not the object ({{...}}) of a config.json")
    return data


def _transformer_source(checkpoint: Checkpoint) -> tuple[list[Path], str, int | None]:
    """(files, key prefix, head count from config.json) for the MM-DiT of a checkpoint."""
    if checkpoint.single_file:
        files = [checkpoint.path]
        if read_shapes(files, TRANSFORMER_PREFIX):
            return files, TRANSFORMER_PREFIX, None
        return files, "", None  # a bare transformer file (no prefix), in either layout
    folder = checkpoint.path / "transformer"
    return weight_files(folder), "", _read_config(folder).get("num_attention_heads")


def transformer_config(checkpoint: Checkpoint) -> MMDiTConfig:
    """The MM-DiT's configuration, from the file headers alone (no tensor data is read)."""
    files, prefix, num_heads = _transformer_source(checkpoint)
    # Meta tensors carry shapes only, so the key map and the config inference run before any data is read.
    meta = read_meta(files, prefix)
    diffusers = is_diffusers_layout(meta)
    if diffusers:
        meta = transformer_from_diffusers(meta)
    if diffusers and num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int)
                                                or num_heads < 1):
        raise CheckpointError(f"{checkpoint.path}: transformer/config.json has num_attention_heads={num_heads!r}; "
                              "it must be a positive whole number")
    try:
        return MMDiTConfig.from_state_dict(meta, num_heads=num_heads if diffusers else None)
    except NotSD3Error as e:
        raise NotSD3Error(f"{checkpoint.path}: {e}{_what_is_it(meta)}") from None
    except ValueError as e:  # the head count config.json gives does not fit the weights
        raise CheckpointError(f"{checkpoint.path}: transformer/config.json and the weights disagree: {e}") from None


def stored_weights(checkpoint: Checkpoint) -> str:
    """How the MM-DiT's file holds its weights, as a `weights` setting: "fp8" when it stores float8 tensors
    (ComfyUI's scaled files, plain float8 ones), else "full". A run that is not told otherwise keeps them so."""
    files, prefix, _ = _transformer_source(checkpoint)
    with TensorReader(files, prefix) as reader:
        float8 = is_quantized(reader) or any(reader.dtype(k) in (torch.float8_e4m3fn, torch.float8_e5m2)
                                             for k in reader.keys())
    return "fp8" if float8 else "full"


def variant(checkpoint: Checkpoint, config: MMDiTConfig) -> str:
    """The released model, for presets. Large-Turbo has Large's architecture, so only its name tells them apart."""
    if config.variant == "sd3.5-large" and "turbo" in str(checkpoint.path).lower():
        return "sd3.5-large-turbo"
    return config.variant


def check_offload(offload: str) -> str:
    """`offload` if it is one of OFFLOAD, else an InputError that lists them."""
    if offload not in OFFLOAD:
        raise InputError(f"offload {offload!r} is not one of {list(OFFLOAD)}: 'blocks' keeps the MM-DiT's joint "
                         "blocks in CPU memory and streams them to the GPU one at a time; 'none' (the default) "
                         "puts the whole MM-DiT on the device (--offload blocks / offload='blocks')")
    return offload


def load_transformer(
    checkpoint: Checkpoint, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    offload: str = "none", weights: str = "full",
) -> MMDiT:
    """The MM-DiT in `dtype` on `device`, built from its weights alone.

    offload="blocks": the joint blocks stay in CPU memory and are streamed to `device` as they run
    (`mmdit.streaming`); only the embedders, the position table and the final layer are put on `device`.
    weights="fp8": every linear layer in float8 with a per-tensor scale, computed in `dtype` (loaders/fp8.py).
    A ComfyUI float8 file loads either way ("full": dequantised to `dtype`), one tensor at a time.
    """
    check_offload(offload)
    check_weights(weights)
    config = transformer_config(checkpoint)
    files, prefix, _ = _transformer_source(checkpoint)
    home = "cpu" if offload == "blocks" else device
    with TensorReader(files, prefix, device=home) as reader:
        if weights == "fp8" or is_quantized(reader):
            what = f"MM-DiT from {checkpoint.path}"
            quant = read_quantization(reader, what)
            keys = list(quant.weights)
            sources = diffusers_sources(keys) if is_diffusers_layout(keys) else {k: ((k,), False) for k in keys}
            with torch.device("meta"):
                model = MMDiT(config)
            model = load_streamed(model, reader, quant, sources, what=what, fp8=weights == "fp8", dtype=dtype,
                                  device=home)
            return offload_blocks(model, device) if offload == "blocks" else model
    state = read_tensors(files, prefix, device=home)
    if is_diffusers_layout(state):
        state = transformer_from_diffusers(state)
    with torch.device("meta"):
        model = MMDiT(config)
    model = load_weights(model, state, what=f"MM-DiT from {checkpoint.path}", dtype=dtype, device=home)
    return offload_blocks(model, device) if offload == "blocks" else model


def _vae_source(checkpoint: Checkpoint) -> tuple[list[Path], str, dict]:
    """The VAE's weight files, their key prefix, and what config.json adds to the shapes (group count, latent
    scale and shift; SD3's constants are the defaults, which the single file relies on)."""
    if checkpoint.single_file:
        if not read_shapes([checkpoint.path], VAE_PREFIX):
            raise CheckpointError(
                f"{checkpoint.path}: no VAE inside (no '{VAE_PREFIX}' tensors); "
                "use the full release file (e.g. sd3.5_large.safetensors), which carries the VAE"
            )
        return [checkpoint.path], VAE_PREFIX, {}
    folder = checkpoint.path / "vae"
    found = vae_config_from_diffusers(_read_config(folder))
    return weight_files(folder), "", dict(norm_groups=found.norm_groups, scaling_factor=found.scaling_factor,
                                         shift_factor=found.shift_factor)


def vae_config(checkpoint: Checkpoint) -> VAEConfig:
    """The VAE's configuration, from the file headers (and vae/config.json) alone."""
    files, prefix, settings = _vae_source(checkpoint)
    meta = read_meta(files, prefix)
    return _vae_config(checkpoint, meta if checkpoint.single_file else vae_from_diffusers(meta), settings)


def _vae_config(checkpoint: Checkpoint, state: dict, settings: dict) -> VAEConfig:
    """`VAEConfig.from_state_dict`, its complaints (a group count that does not divide a width) as CheckpointErrors."""
    try:
        return VAEConfig.from_state_dict(state, **settings)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint.path}: the VAE's weights and vae/config.json do not fit: {e}") from None


def load_vae(checkpoint: Checkpoint, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> VAE:
    """The VAE (decoder, and encoder when the file has one) in `dtype` on `device`."""
    files, prefix, settings = _vae_source(checkpoint)
    state = read_tensors(files, prefix, device=device)
    if not checkpoint.single_file:
        state = vae_from_diffusers(state)
    config = _vae_config(checkpoint, state, settings)  # what `vae_config` infers from the headers alone
    with torch.device("meta"):
        vae = VAE(config)
    return load_weights(vae, state, what=f"VAE from {checkpoint.path}", dtype=dtype, device=device)

