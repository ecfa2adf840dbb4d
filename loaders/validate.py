"""Checks of everything a run is given, made before any weight is loaded and before any work is done.

`Pipeline.load` and `Pipeline.__call__` call `check_load` / `check_call` first, and the CLI calls `check_job`
for every line of a batch before the first image, so the command line, the Python API and the prompts-file
lines all answer a wrong type, a value out of range, a non-finite number, an unreadable image or mask, or a
size the model cannot draw with the same one-line `InputError`. Bounds, where a value could exhaust memory or
cannot mean anything:
* steps <= 1000: the schedule is defined on 1000 training timesteps (`samplers.schedule`); a billion steps
  would allocate gigabytes for the schedule alone;
* num_images <= 64: one call draws its images as one batch, so activations grow with the count; more images
  are more calls (or lines of a prompts file);
* max_sequence_length <= 512: the T5 length diffusers' SD3 pipelines accept (100,000 would allocate 80 GB);
* prompts of at most 100,000 characters: 50 times what the longest encoder keeps (T5, 512 tokens);
* seeds in torch's range, [-2⁶³, 2⁶⁴): what `torch.Generator.manual_seed` accepts;
* height and width multiples of 16 within the model's position table (`MMDiTConfig.pos_embed_max_size`);
* an init image setting the output size itself (no height/width given) of at most 4,194,304 pixels (2048²):
  larger is a photo's size, whose VAE encode would need tens of GB; give a size and the image is resized.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmdit.conditioning import Conditioning
from mmdit.errors import InputError
from samplers import SAMPLERS, first_step

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .pipeline import Pipeline

MAX_STEPS = 1000
MAX_IMAGES = 64
MAX_SEQUENCE_LENGTH = 512
MAX_PROMPT_CHARS = 100_000
SEEDS = (-(2**63), 2**64 - 1)
MULTIPLE = 16  # pixels: the VAE's 8× times the MM-DiT's 2×2 patches
AUTO_SIZE_PIXELS = 2048 * 2048


def _name(key: str) -> str:
    """How messages name an argument: as the API spells it (the CLI's flag is the same words, `--num-images`)."""
    return {"device": "device (--device)", "t5_device": "t5_device (--t5-device)"}.get(key, key)


def _real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: object, key: str, low: int, high: int, why: str = "") -> int:
    """`value` if it is a whole number in [low, high], else an InputError that names the argument."""
    if not _integer(value):
        raise InputError(f"{_name(key)} must be a whole number, got {value!r} ({type(value).__name__})")
    if not low <= value <= high:
        raise InputError(f"{_name(key)} must be between {low} and {high}, got {value}" + (f" ({why})" if why else ""))
    return value


def check_real(value: object, key: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, hint: str = "") -> float:
    """`value` if it is a finite number within the bounds given (NaN and infinity never pass), else an
    InputError that names the argument."""
    if not _real(value):
        raise InputError(f"{_name(key)} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise InputError(f"{_name(key)} must be a finite number, got {value}" + (f"; {hint}" if hint else ""))
    below = low is not None and (value <= low if low_open else value < low)
    if below or high is not None and value > high:
        lo, hi = low if low is not None else "-inf", high if high is not None else "inf"
        bounds = f"{'(' if low_open else '['}{lo}, {hi}]"
        raise InputError(f"{_name(key)} must be in {bounds}, got {value}" + (f"; {hint}" if hint else ""))
    return float(value)


def _check_type(value: object, key: str, types: tuple, wanted: str) -> None:
    if not isinstance(value, types):
        raise InputError(f"{_name(key)} must be {wanted}, got {value!r} ({type(value).__name__})")


def check_prompt(value: object, key: str, optional: bool = True) -> None:
    if value is None and optional:
        return
    _check_type(value, key, (str,), "a string" + (" or None" if optional else " ('' for none)"))
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"{_name(key)} has {len(value):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted (the "
                         "encoders keep at most 512 tokens, about 2,000 characters)")


def usable_device(name: object, key: str) -> torch.device:
    """`name` as a torch.device this machine can use, or an InputError saying what `key` takes."""
    if not isinstance(name, (str, torch.device)):
        raise InputError(f"{_name(key)} must be a device name like 'cpu' or 'cuda:0', got {name!r}")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{_name(key)} {name!r} is not a device; give e.g. 'cpu' or 'cuda:0'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{_name(key)} {name!r}: this machine has no CUDA device; use 'cpu'")
    if device.type == "meta":
        raise InputError(f"{_name(key)} 'meta' holds no data; give e.g. 'cpu' or 'cuda:0'")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # torch asserts when a backend was not compiled in
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{_name(key)} {name!r} cannot be used on this machine ({first}); use 'cpu'") from None
    return device


# ------------------------------------------------------------------------------------------------ loading


def check_load(args: Mapping[str, object]) -> None:
    """The arguments of `Pipeline.load` (its `locals()`), before anything is resolved or read."""
    from .checkpoint import check_offload
    from .fp8 import check_weights
    from .pipeline import DTYPES, PRESET_KINDS

    model = args.get("model")
    if model is not None:
        _check_type(model, "model", (str, Path), "a path, a Hugging Face repo id or None (the built-in model)")
    for key in ("dtype", "vae_dtype"):
        value = args.get(key)
        if value is not None and value not in DTYPES.values():
            raise InputError(f"{_name(key)} must be one of {', '.join(f'torch.{k}' for k in DTYPES)}, got {value!r}")
    for key in ("device", "t5_device"):
        if args.get(key) is not None:
            usable_device(args[key], key)
    for key in ("t5", "keep_loaded", "compile"):
        if key in args:
            _check_type(args[key], key, (bool,), "True or False")
    if args.get("tokenizers") is not None:
        _check_type(args["tokenizers"], "tokenizers", (str, Path), "a folder path")
    check_offload(args.get("offload", "none"))
    if args.get("weights") is not None:
        check_weights(args["weights"])
    preset = args.get("preset", "diffusers")
    if preset not in PRESET_KINDS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_KINDS)}")
    loras = args.get("loras", ())
    if isinstance(loras, (str, Path)) or not isinstance(loras, (list, tuple)):
        raise InputError(f"loras must be a list of LoRAs (each a path, a (path, scale) pair or a loaders.lora.LoRA), "
                         f"got {loras!r}")


def check_checkpoint(checkpoint: Checkpoint, weights: str | None) -> str:
    """The checks that need the checkpoint's headers (a diffusers folder's vae/config.json is read now, not after
    sampling), and the `weights` a run gets: as asked, or (None) as the file stores the MM-DiT's."""
    from .checkpoint import stored_weights, vae_config

    if not checkpoint.single_file and (checkpoint.path / "vae").is_dir():
        vae_config(checkpoint)
    return weights if weights is not None else stored_weights(checkpoint)


# ------------------------------------------------------------------------------------------------ a call


def check_call(pipe: Pipeline, args: Mapping[str, object]) -> None:
    """The arguments of `Pipeline.__call__` (its `locals()`), before any encoder or model runs: types, ranges,
    finiteness, the output size against the model, and the init image and mask read at that size."""
    from dense import PRESETS, DenseConfig, Layout
    from loaders.memory import MemoryLog

    from .images import check_image, read_mask

    check_prompt(args.get("prompt"), "prompt")
    check_prompt(args.get("negative_prompt", ""), "negative_prompt", optional=False)
    layout = args.get("layout")
    if layout is not None:
        _check_type(layout, "layout", (Layout, dict, str, Path), "a dense.Layout, a dict shaped like the layout "
                    "JSON, or the path of a layout file")
    check_int(args.get("seed", 0), "seed", *SEEDS, why="torch's seed range")
    if args.get("steps") is not None:
        check_int(args["steps"], "steps", 1, MAX_STEPS, "the schedule has 1000 training timesteps")
    if args.get("cfg") is not None:
        check_real(args["cfg"], "cfg", hint="<= 1 turns CFG off")
    if args.get("shift") is not None:
        check_real(args["shift"], "shift", low=0, low_open=True, hint="SD3 uses 3.0")
    for key in ("height", "width"):
        if args.get(key) is not None:
            check_int(args[key], key, MULTIPLE, 1 << 20)
    check_int(args.get("num_images", 1), "num_images", 1, MAX_IMAGES, "one call draws them as one batch; for more, "
              "call again or add lines to a prompts file")
    layers = args.get("slg_layers")
    if layers is not None and (not isinstance(layers, tuple) or not all(_integer(i) and i >= 0 for i in layers)):
        raise InputError(f"{_name('slg_layers')} must be a tuple of block indices >= 0, like (7, 8, 9), got {layers!r}")
    if args.get("slg_scale") is not None:
        check_real(args["slg_scale"], "slg_scale")
    for key in ("slg_start", "slg_stop"):
        if args.get(key) is not None:
            check_real(args[key], key, low=0, high=1, hint="a fraction of the run")
    if args.get("max_sequence_length") is not None:
        check_int(args["max_sequence_length"], "max_sequence_length", 1, MAX_SEQUENCE_LENGTH, "T5's limit")
    check_real(args.get("dense_strength", 1.0), "dense_strength", low=0, hint="0 turns the modulation off")
    preset = args.get("dense_preset", "faithful")
    if not isinstance(preset, DenseConfig) and preset not in PRESETS:
        raise InputError(f"{_name('dense_preset')} must be one of {', '.join(PRESETS)} or a dense.DenseConfig, "
                         f"got {preset!r}")
    _check_type(args.get("record_maps", False), "record_maps", (bool,), "True or False")
    callback = args.get("callback")
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be a function of (step, latents), got {callback!r}")
    for key in ("prompt_embeds", "negative_embeds"):
        if args.get(key) is not None:
            _check_type(args[key], key, (Conditioning,), "an mmdit.conditioning.Conditioning")
    if args.get("memory") is not None:
        _check_type(args["memory"], "memory", (MemoryLog,), "a loaders.memory.MemoryLog")
    sampler = args.get("sampler")
    if sampler is not None and sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    init_image, mask, strength = args.get("init_image"), args.get("mask"), args.get("strength")
    if init_image is None and (mask is not None or strength is not None):
        raise InputError(f"{'a mask' if mask is not None else 'strength'} needs an init image "
                         "(--init-image / init_image=...)")
    if strength is not None:
        check_real(strength, "strength")
        first_step(1, strength)  # its own message: strength must be in (0, 1]
    if init_image is not None:
        check_image(init_image, "init image")

    settings = pipe.settings(seed=args.get("seed", 0), height=args.get("height"), width=args.get("width"),
                             init_image=init_image, steps=args.get("steps"), cfg=args.get("cfg"),
                             shift=args.get("shift"), slg_layers=layers, slg_scale=args.get("slg_scale"),
                             slg_start=args.get("slg_start"), slg_stop=args.get("slg_stop"), sampler=sampler)
    if settings.slg_start > settings.slg_stop:
        raise InputError(f"need slg_start <= slg_stop (--slg-start, --slg-stop), got {settings.slg_start} > "
                         f"{settings.slg_stop}")
    check_size(pipe, settings.height, settings.width, from_image=init_image is not None and not (
        args.get("height") and args.get("width")))
    if init_image is not None and mask is not None:
        read_mask(mask, settings.height, settings.width)  # black everywhere, colours: said before any encoder runs


def check_size(pipe: Pipeline, height: int, width: int, from_image: bool = False) -> None:
    """An InputError unless the model can draw height × width: multiples of 16 within its position table (and,
    when an init image sets the size, at most AUTO_SIZE_PIXELS)."""
    config = pipe.config
    largest = config.pos_embed_max_size * config.patch_size * 8
    for key, value in (("height", height), ("width", width)):
        if value % MULTIPLE or value < MULTIPLE:
            raise InputError(f"{_name(key)} {value} is not a positive multiple of {MULTIPLE} (the VAE's 8× times the "
                             f"2×2 patches); try {max(MULTIPLE, value - value % MULTIPLE)}")
        if value > largest:
            source = " (the init image's size; give --height/--width to resize it)" if from_image else ""
            raise InputError(f"{_name(key)} {value}{source} is more than this model draws: its position table "
                             f"covers {largest}x{largest} pixels at most")
    if from_image and height * width > AUTO_SIZE_PIXELS:
        raise InputError(f"the init image sets the output size to {width}x{height} ({height * width / 1e6:.1f} "
                         f"megapixels), more than {AUTO_SIZE_PIXELS / 1e6:.1f}; give --height and --width "
                         "(height=, width=) and the image is resized to them")


def check_job(pipe: Pipeline, args: Mapping[str, object], keep: dict | None = None) -> None:
    """`check_call`, plus what a call only finds later: the layout read and matched against the prompt with the
    tokenizers (a phrase not in the prompt, a region too small for a token). The CLI runs it on every line of a
    batch before the first image is made. `keep`: a cache of loaded tokenizers shared by the lines."""
    from dense import layout_prompt, parse_layout, read_layout

    from .layout import match_layout, regional_layout

    check_call(pipe, args)
    layout, prompt = args.get("layout"), args.get("prompt")
    if args.get("prompt_embeds") is not None:
        return
    if layout is None:
        if prompt is None:
            raise InputError("give a prompt (or a layout that has one)")
        return
    if isinstance(layout, (str, Path)):
        layout = read_layout(layout)
    elif isinstance(layout, dict):
        layout = parse_layout(layout)
    prompt = layout_prompt(layout, prompt)
    settings = pipe.settings(seed=args.get("seed", 0), height=args.get("height"), width=args.get("width"),
                             init_image=args.get("init_image"))
    if args.get("layout_method") == "regional":  # phrases are prompts of their own: only the regions are checked
        regional_layout(layout, None, height=settings.height, width=settings.width)
        return
    length = args.get("max_sequence_length") or pipe.preset.max_sequence_length
    match_layout(layout, prompt, pipe.files, height=settings.height, width=settings.width,
                 max_sequence_length=length, keep=keep)


# ------------------------------------------------------------------------------------------------ results


def check_finite_step(x: Tensor, step: int, what: str) -> None:
    """Stop at the first sampling step whose model input or output is not finite (NaN or infinity), naming the
    step: decoding such latents would give a black image and nothing would say why. In float16 it is the dtype's
    range (an InputError that suggests bfloat16); otherwise the weights or the settings (a FloatingPointError)."""
    if bool(torch.isfinite(x).all()):
        return
    if x.dtype == torch.float16:
        raise InputError(f"the {what} became non-finite (inf or nan) at sampling step {step + 1} in float16: SD3's "
                         "activations can overflow its range; use bfloat16 (--dtype bfloat16) or float32")
    raise FloatingPointError(f"the {what} became non-finite (inf or nan) at sampling step {step + 1} in {x.dtype}")

