#!/usr/bin/env python
"""Our engine next to diffusers + transformers, component by component: `python scripts/parity.py`.

Each row runs one component of both engines on the same inputs and compares the outputs:

    CLIP-L, CLIP-G, T5   tokenizer + encoder on the prompt (and the negative prompt when CFG is on): our ids and
                         outputs vs transformers' tokenizer and `CLIPTextModelWithProjection` (hidden_states[-2],
                         text_embeds) / `T5EncoderModel` (last_hidden_state); differing token ids fail the row
    prompt encoding      the assembled context and pooled vectors vs diffusers' `encode_prompt`
    transformer one step the first model call of sampling (noise, t = 1000, [negative, positive] conditioning)
                         vs `SD3Transformer2DModel`
    sampling loop        final latents of the whole run (CFG, SLG, Euler) vs `StableDiffusion3Pipeline`, same seed
    VAE decode           the decoder on the final latents vs `AutoencoderKL.decode`
    PNG                  the 8-bit image vs the pipeline's image post-processing

The transformer, sampling, VAE and PNG rows are fed diffusers' values (its prompt embeddings, its final
latents), so every row measures one component, not the errors accumulated before it. When the text rows are
not selected, the conditioning is seeded random numbers of the right shape; without the sampling row, so are the
VAE's latents.

Which checkpoint each side reads: our engine reads `--model`; diffusers and transformers read `--reference`
(default: the same model). Checking one model against itself asks "do both engines compute the same thing from
these files?". A different reference asks it of a modified copy (converted, re-saved, quantised, or perturbed
on purpose): every row whose component's weights changed fails. The two must have the same architecture: the
configurations that both sides infer from their files (MM-DiT, and the VAE / text encoders when their rows run)
are compared before anything loads, and a difference stops the run (status 2) naming the fields that differ.
Tokenizers: each side uses its own model's tokenizer folders, or `--tokenizers` for both.

Where the diffusers side comes from (the reference checkpoint):
* a diffusers folder: `from_pretrained` on its own folders, which checks our config inference and key maps too;
* a single file (the built-in model included): diffusers has no config for it offline, so its models are built
  from our inferred configs (`MMDiTConfig`, `VAEConfig`, `CLIPConfig`, `T5Config`) and filled through our key
  maps (`transformer_to_diffusers`, `vae_to_diffusers`, `clip_state_dict`, `t5_state_dict`) from tensors read with
  `safetensors` directly (not our reader). SD3's CLIP-L projection is the identity for Stability files, as our
  loader makes it. Its tokenizers are transformers' `CLIPTokenizer` / `T5TokenizerFast` on the reference's folders.

Memory: one component is in memory at a time, ours and then diffusers', each freed before the next loads (also
with a separate `--reference`: only one side's copy of a component is ever loaded at a time); the
three text encoders run one after another (diffusers' `encode_prompt` is then answered from those runs, see
`RecordedEncoder`). So a model can be checked wherever one copy of its largest component fits.

Tolerances (relative: max |ours - diffusers| / max |diffusers|, per output, the worst output reported):

    dtype      components   sampling loop   PNG (8-bit levels)
    float32    1e-5         1e-4            1
    bfloat16   5e-2         1e-1            8
    float16    2e-2         5e-2            4

float32: the engines must agree to rounding. The loop gets 1e-4 because every step feeds the next; the PNG may
differ by one level where a value sits on a rounding edge. The built-in model agrees bit for bit in all three
dtypes on CPU, so the reduced-precision bounds come from wider random models instead. One bfloat16 / float16
rounding is 4e-3 / 5e-4 of a value, and two correct engines that round in a different order (fused vs split
q/k/v, other kernels) each land about one "precision noise" away from the float32 result. Measured on random
transformers of SD3.5-Medium width (24 heads of 64, CPU): bfloat16 vs float32 1.0e-2 (4 blocks) and 1.1e-2
(12 blocks), ours vs diffusers 0; float16 vs float32 4.3e-3 / 5.5e-3, ours vs diffusers 4.9e-3 / 5.8e-3
(4 / 12 blocks); scripts/bench/bench.py's SD3.5-Large-width check, ours vs diffusers in bfloat16: 6.2e-3. The bounds
are 3-5x those, for deeper models and GPU kernels. A wrong key or formula (swapped shift/scale, a missing norm)
gives differences of 1e-1 to 1; a slightly-off weight can hide inside the reduced-precision bounds, so check
float32 first.

Exit status: 0 all rows pass, 1 a row fails, 2 the run could not be done (missing files, missing packages).
Needs diffusers, transformers, accelerate and protobuf (the test extras): `pip install -e ".[test]"`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from loaders.memory import release_memory
from loaders.pipeline import DTYPES
from mmdit.errors import InputError

if TYPE_CHECKING:
    from loaders.checkpoint import Checkpoint
    from loaders.pipeline import Settings
    from loaders.text import EncoderFile, TextFiles
    from mmdit.conditioning import Conditioning
    from mmdit.model import MMDiTConfig


# name on the command line -> label in the table, in running order
COMPONENTS = {
    "clip-l": "CLIP-L",
    "clip-g": "CLIP-G",
    "t5": "T5",
    "prompt": "prompt encoding",
    "transformer": "transformer one step",
    "sampling": "sampling loop",
    "vae": "VAE decode",
    "png": "PNG",
}
TEXT = ("clip-l", "clip-g", "t5", "prompt")
REFERENCE_PACKAGES = {"diffusers": "diffusers", "transformers": "transformers", "accelerate": "accelerate",
                      "google.protobuf": "protobuf"}
INSTALL_HINT = 'pip install -e ".[test]"   (or: pip install diffusers transformers accelerate protobuf)'
DEFAULT_PROMPT = "a red fox sitting in a snowy forest at dawn, soft golden light"


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted relative difference, per kind of row (see the module docstring for the reasons)."""

    component: float
    sampling: float
    png_levels: int  # 8-bit levels, out of 255


TOLERANCES = {
    "float32": Tolerance(component=1e-5, sampling=1e-4, png_levels=1),
    "bfloat16": Tolerance(component=5e-2, sampling=1e-1, png_levels=8),
    "float16": Tolerance(component=2e-2, sampling=5e-2, png_levels=4),
}


@dataclass(frozen=True)
class Row:
    """One line of the report."""

    component: str  # command-line name, e.g. "clip-l"
    label: str  # e.g. "CLIP-L"
    max_abs: float  # max |ours - diffusers| over every compared output
    relative: float  # the worst output's max_abs / max |diffusers output|; PNG: levels / 255
    tolerance: float  # on `relative`
    passed: bool
    compared: str  # which outputs, for the reader
    note: str = ""  # why it failed, when it is not just the numbers


@dataclass(frozen=True)
class Output:
    """One pair of tensors to compare: ours and the reference's, and a short name."""

    name: str
    ours: Tensor
    reference: Tensor


def compare(component: str, outputs: Sequence[Output], tolerance: float, *, compared: str | None = None,
            note: str = "") -> Row:
    """The worst relative difference over `outputs`. Shape mismatches and non-finite values fail the row."""
    problems = [note] if note else []
    worst_abs, worst_rel, worst = 0.0, 0.0, ""
    for o in outputs:
        if tuple(o.ours.shape) != tuple(o.reference.shape):
            problems.append(f"{o.name}: shapes differ, ours {tuple(o.ours.shape)} vs {tuple(o.reference.shape)}")
            worst_abs = worst_rel = math.inf
            continue
        ours, ref = o.ours.detach().double().cpu(), o.reference.detach().double().cpu()
        if not (torch.isfinite(ours).all() and torch.isfinite(ref).all()):
            problems.append(f"{o.name}: non-finite values (ours {bool(torch.isfinite(ours).all())}, "
                            f"diffusers {bool(torch.isfinite(ref).all())} all finite)")
            worst_abs = worst_rel = math.inf
            continue
        diff = (ours - ref).abs().max().item() if ours.numel() else 0.0
        scale = ref.abs().max().item() if ref.numel() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        if rel > worst_rel or not worst:
            worst = o.name
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
    passed = not problems and worst_rel <= tolerance
    if not passed and not problems:
        problems.append(f"largest difference in {worst}")
    names = compared or ", ".join(o.name for o in outputs)
    return Row(component, COMPONENTS[component], worst_abs, worst_rel, tolerance, passed, names, "; ".join(problems))


# ------------------------------------------------------------------------------------------------ arguments


def _components(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown component(s) {unknown}; choose from {', '.join(COMPONENTS)}")
    return tuple(n for n in COMPONENTS if n in names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers folder, .safetensors single file, or Hub repo id (default: built-in tiny model)")
    p.add_argument("--reference", metavar="MODEL",
                   help="what diffusers/transformers load, in the same forms as --model (default: --model itself); "
                        "it must have the same architecture")
    p.add_argument("--tokenizers", type=Path,
                   help="folder holding tokenizer/, tokenizer_2/, tokenizer_3/ (for a single file), used by both sides")
    p.add_argument("--components", type=_components, default=tuple(COMPONENTS),
                   help=f"comma-separated rows to check (default all): {','.join(COMPONENTS)}")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, help="sampling steps (default: 6 on the built-in model, else 2)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, help="pixels (default 128 on the built-in model, else 512)")
    p.add_argument("--width", type=int, help="pixels (default 128 on the built-in model, else 512)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: the model's preset, 256 or 16)")
    p.add_argument("--json", type=Path, help="also write the table (and the run's settings) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="only the table")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= 512:
        p.error("--max-sequence-length must be between 1 and 512")
    return args


def missing_reference_packages() -> list[str]:
    return [pip for module, pip in REFERENCE_PACKAGES.items() if importlib.util.find_spec(module.split(".")[0]) is None
            or importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    say = (lambda *a: None) if args.quiet else (
        lambda *a: print(f"[{time.perf_counter() - started:6.1f}s]", *a, file=sys.stderr))
    missing = missing_reference_packages()
    if missing:
        print(f"error: parity.py compares against {', '.join(missing)}, which are not installed. Install them with\n"
              f"  {INSTALL_HINT}", file=sys.stderr)
        return 2
    import transformers

    transformers.logging.set_verbosity_error()  # truncation warnings and optional-backend notes are noise here
    transformers.logging.disable_progress_bar()  # weight-loading bars; our own messages say what loads
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    import_reference_classes()
    # Park everything imported so far outside the garbage collector's reach: the collections that free each
    # component then only walk objects made after this point (seconds saved on every release_memory()).
    gc.freeze()
    try:
        report = run(args, say)
    except InputError as e:  # what the user gave is wrong: one line; a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        gc.unfreeze()
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.passed else 1


def import_reference_classes() -> None:
    """Import (once, up front) the diffusers / transformers classes the checks use; their packages load lazily."""
    from diffusers import (  # noqa: F401
        AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
    )
    from diffusers.image_processor import VaeImageProcessor  # noqa: F401
    from transformers import (  # noqa: F401
        CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast,
    )


# ------------------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class Report:
    header: dict
    rows: list[Row]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_json(self) -> dict:
        rows = [{**asdict(r), "max_abs": _finite(r.max_abs), "relative": _finite(r.relative)} for r in self.rows]
        return {**self.header, "passed": self.passed, "rows": rows}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf


@dataclass(frozen=True)
class Setup:
    """Everything the stages share. Our engine reads `checkpoint` / `files`, the reference `reference` /
    `reference_files` (the same objects when no --reference was given)."""

    checkpoint: Checkpoint
    reference: Checkpoint
    config: MMDiTConfig  # both sides' (checked equal)
    settings: Settings
    files: TextFiles | None  # when a text row runs
    reference_files: TextFiles | None
    prompt: str
    negative: str | None  # None: CFG off, no negative prompt
    max_sequence_length: int
    dtype: torch.dtype
    device: torch.device
    tolerance: Tolerance


def run(args: argparse.Namespace, say: Callable[..., None]) -> Report:
    import diffusers
    import transformers

    from loaders.checkpoint import locate, transformer_config
    from loaders.hub import resolve_model
    from loaders.pipeline import Settings, model_defaults

    source = resolve_model(args.model, say=say)
    checkpoint = locate(source.diffusion)
    same = args.reference is None
    ref_source = source if same else resolve_model(args.reference, say=say)
    reference = checkpoint if same else locate(ref_source.diffusion)
    config = transformer_config(checkpoint)
    defaults = model_defaults(source, checkpoint, config)
    name, preset = defaults.variant, defaults.preset
    args.max_sequence_length = args.max_sequence_length or preset.max_sequence_length
    size = defaults.size if source.builtin else 512
    # 6 on the built-in model: the fewest steps with one inside the skip-layer-guidance window (step 1).
    steps = args.steps or (6 if source.builtin else 2)
    settings = Settings.from_preset(preset, steps=steps, seed=args.seed, height=args.height or size,
                                    width=args.width or size)
    files = reference_files = None
    if any(c in args.components for c in TEXT):
        from loaders.text import find_text_files

        files = find_text_files(source.diffusion, tokenizers=args.tokenizers)
        reference_files = files if same else find_text_files(ref_source.diffusion, tokenizers=args.tokenizers)
    if not same:
        say(f"checking that {ref_source.label} has the architecture of {source.label}")
        vae_rows = bool({"vae", "png"} & set(args.components))
        check_same_architecture(
            architecture(checkpoint, files, vae=vae_rows, transformer=config),
            architecture(reference, reference_files, vae=vae_rows), source.label, ref_source.label)
    setup = Setup(checkpoint, reference, config, settings, files, reference_files, args.prompt,
                  args.negative_prompt if settings.guidance.cfg_on else None, args.max_sequence_length,
                  DTYPES[args.dtype], torch.device(args.device), TOLERANCES[args.dtype])
    header = {
        "model": source.label, "variant": name,
        "layout": "single file" if checkpoint.single_file else "diffusers folder",
        "reference": ref_source.label,
        "reference_layout": "single file" if reference.single_file else "diffusers folder",
        "dtype": args.dtype, "device": str(setup.device), "steps": settings.steps, "cfg": settings.cfg,
        "shift": settings.shift, "slg_layers": list(settings.slg_layers), "height": settings.height,
        "width": settings.width, "seed": settings.seed, "prompt": args.prompt,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }
    against = "" if same else f" against {ref_source.label} ({header['reference_layout']})"
    say(f"parity: {source.label} ({name}, {header['layout']}){against}, {args.dtype} on {setup.device}; "
        f"rows: {', '.join(args.components)}")

    rows: list[Row] = []
    wanted = set(args.components)
    with torch.inference_mode():
        conditioning = None
        if wanted & set(TEXT):
            text_rows, conditioning = check_text(setup, wanted, say)
            rows += text_rows
        latents = None
        if wanted & {"transformer", "sampling"}:
            if conditioning is None:
                conditioning = random_conditioning(setup)
            transformer_rows, latents = check_transformer(setup, wanted, conditioning, say)
            rows += transformer_rows
        if wanted & {"vae", "png"}:
            if latents is None:
                latents = random_latents(setup)
            rows += check_vae(setup, wanted, latents, say)
    return Report(header, rows)


# ------------------------------------------------------------------------------------------------ architecture


def architecture(checkpoint: Checkpoint, files: TextFiles | None, *, vae: bool,
                 transformer: MMDiTConfig | None = None) -> dict[str, object]:
    """Component label -> the configuration our loaders infer for it (no tensor data is read): the MM-DiT always,
    the VAE when `vae`, the text encoders when `files` (the text rows run), each the configuration the loader
    would build (`transformer_config`, `vae_config`, `clip_config`, `t5_config`)."""
    from loaders.checkpoint import transformer_config, vae_config
    from loaders.text_encoders import clip_config, t5_config

    configs: dict[str, object] = {"MM-DiT": transformer or transformer_config(checkpoint)}
    if vae:  # `has_encoder` set True: only the decoder runs here, so a decoder-only file still fits AutoencoderKL
        configs["VAE"] = replace(vae_config(checkpoint), has_encoder=True)
    if files is not None:
        configs["CLIP-L"] = clip_config(files.clip_l.path, activation="quick_gelu", prefix=files.clip_l.prefix)
        configs["CLIP-G"] = clip_config(files.clip_g.path, activation="gelu", prefix=files.clip_g.prefix)
        if files.t5 is not None:
            configs["T5"] = t5_config(files.t5.path, prefix=files.t5.prefix)
    return configs


def check_same_architecture(ours: dict[str, object], reference: dict[str, object], model: str, ref: str) -> None:
    """Raise a ValueError naming every configuration field in which --model and --reference differ."""
    differences = []
    for label, mine in ours.items():
        theirs = reference[label]
        if mine == theirs:
            continue
        fields = [f"{k} {v!r} vs {getattr(theirs, k)!r}" for k, v in asdict(mine).items() if getattr(theirs, k) != v]
        differences.append(f"  {label}: " + "; ".join(fields))
    if differences:
        raise InputError(
            f"--model {model} and --reference {ref} are not the same architecture (--model's value first):\n"
            + "\n".join(differences) + "\nparity.py compares two engines on one architecture: give --reference "
            "the model that --model was made from (or leave it out to check --model against itself)"
        )


# ------------------------------------------------------------------------------------------------ text


class RecordedEncoder(torch.nn.Module):
    """Stands in for a transformers text encoder inside diffusers' `encode_prompt`.

    `encode_prompt` needs all three encoders in one pipeline, which would hold three models at once. Instead
    each real encoder runs alone (loaded, run, freed) on exactly the ids the pipeline's tokenizers give, and its
    outputs are recorded here; `encode_prompt` then runs its own assembly code against these stand-ins, which
    answer each call with the recorded output for the same ids (and fail loudly for ids never seen).
    """

    def __init__(self, name: str, dtype: torch.dtype):
        super().__init__()
        self.name = name
        self.recorded_dtype = dtype
        self.answers: dict[tuple, object] = {}

    @property
    def dtype(self) -> torch.dtype:  # the pipeline casts embeddings to its encoders' dtype
        return self.recorded_dtype

    @staticmethod
    def _key(ids: Tensor) -> tuple:
        return tuple(ids.shape), ids.cpu().numpy().tobytes()

    def record(self, ids: Tensor, output: object) -> None:
        self.answers[self._key(ids)] = output

    def forward(self, input_ids: Tensor, output_hidden_states: bool = False) -> object:
        try:
            return self.answers[self._key(input_ids)]
        except KeyError:
            raise RuntimeError(
                f"diffusers' encode_prompt asked {self.name} for token ids it was never run on") from None


def _read_file(path: Path, prefix: str = "") -> dict[str, Tensor]:
    """All tensors under `prefix` (stripped) of one safetensors file, read with safetensors itself."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def reference_clip(where: EncoderFile, activation: str, setup: Setup) -> torch.nn.Module:
    """transformers' CLIPTextModelWithProjection for one of our EncoderFiles."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from loaders.safetensors import load_weights
    from loaders.text_encoders import clip_config, clip_state_dict

    if where.path.is_dir():
        model = CLIPTextModelWithProjection.from_pretrained(where.path, torch_dtype=setup.dtype)
        return model.to(setup.device).eval()
    state = clip_state_dict(_read_file(where.path, where.prefix), identity_projection=activation == "quick_gelu")
    cfg = clip_config(where.path, activation=activation, prefix=where.prefix)
    # eos_token_id 2 is transformers' legacy value that selects argmax pooling, SD3's rule (mmdit/clip.py).
    eos = 2 if cfg.eos_token_id is None else cfg.eos_token_id
    hf = CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.activation, projection_dim=cfg.projection_dim, layer_norm_eps=cfg.eps,
        bos_token_id=0, eos_token_id=eos, pad_token_id=1,
    )
    with init_empty_weights():
        model = CLIPTextModelWithProjection(hf)
    return load_weights(model, state, what=f"transformers CLIP from {where.path}", dtype=setup.dtype, device=setup.device)


def reference_t5(where: EncoderFile, setup: Setup) -> torch.nn.Module:
    """transformers' T5EncoderModel for one of our EncoderFiles (float16: `wo` kept float32, as transformers does)."""
    from accelerate import init_empty_weights
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    from loaders.safetensors import load_weights
    from loaders.text_encoders import t5_config, t5_state_dict

    if where.path.is_dir():
        return T5EncoderModel.from_pretrained(where.path, torch_dtype=setup.dtype).to(setup.device).eval()
    state = t5_state_dict(_read_file(where.path, where.prefix))
    cfg = t5_config(where.path, prefix=where.prefix)
    hf = HFT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        layer_norm_epsilon=cfg.eps, is_encoder_decoder=False, use_cache=False,
    )
    with init_empty_weights():
        model = T5EncoderModel(hf)
    fp32 = tuple(model._keep_in_fp32_modules or ()) if setup.dtype == torch.float16 else ()
    state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in transformers: one tensor for both
    model = load_weights(model, state, what=f"transformers T5 from {where.path}", dtype=setup.dtype,
                         device=setup.device, fp32_keys=lambda k: any(f".{m}." in f".{k}" for m in fp32))
    model.encoder.embed_tokens = model.shared  # cast separately above; tie them again
    return model


def _first_difference(a: Tensor, b: Tensor) -> str:
    if a.shape != b.shape:
        return f"token ids have different shapes, ours {tuple(a.shape)} vs transformers {tuple(b.shape)}"
    where = (a != b).nonzero()
    row, pos = where[0].tolist()
    return (f"token ids differ at {len(where)} position(s), first in text {row} position {pos}: "
            f"ours {a[row, pos].item()} vs transformers {b[row, pos].item()}")


def check_text(setup: Setup, wanted: set[str], say: Callable[..., None]
               ) -> tuple[list[Row], tuple[Conditioning, Conditioning | None]]:
    """CLIP-L, CLIP-G, T5 and prompt-encoding rows; returns them and diffusers' conditioning (pos, neg)."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    from loaders.text import clip_length, encode_texts
    from loaders.tokenizers import ClipTokenizer, T5Tokenizer
    from mmdit.conditioning import assemble

    files, ref_files = setup.files, setup.reference_files
    # The groups encode_prompt encodes: the prompt, then (CFG on) the negative prompt, one call each.
    groups = [[setup.prompt]] + ([[setup.negative]] if setup.negative is not None else [])
    L = setup.max_sequence_length
    say("ours: CLIP-L, CLIP-G, T5 (one at a time)")
    ours, _, _ = encode_texts(files, groups, max_sequence_length=L, dtype=setup.dtype, device=setup.device)
    tok_l, tok_g = ClipTokenizer.from_folder(files.tokenizer), ClipTokenizer.from_folder(files.tokenizer_2)
    clip = clip_length(files, tok_l, tok_g)  # model_max_length, as diffusers' tokenizer_max_length (77)
    our_tokenizers = {"clip-l": (tok_l, clip), "clip-g": (tok_g, clip),
                      "t5": (T5Tokenizer.from_folder(files.tokenizer_3), L)}
    hf_tokenizers = {"clip-l": CLIPTokenizer.from_pretrained(ref_files.tokenizer),
                     "clip-g": CLIPTokenizer.from_pretrained(ref_files.tokenizer_2),
                     "t5": T5TokenizerFast.from_pretrained(ref_files.tokenizer_3)}
    encoders = {"clip-l": (ref_files.clip_l, "quick_gelu"), "clip-g": (ref_files.clip_g, "gelu"),
                "t5": (ref_files.t5, None)}
    recorded: dict[str, RecordedEncoder] = {}
    rows: list[Row] = []
    for name, (where, activation) in encoders.items():
        label = COMPONENTS[name]
        say(f"diffusers side: {label}")
        model = reference_t5(where, setup) if activation is None else reference_clip(where, activation, setup)
        recorded[name] = RecordedEncoder(label, model.dtype)
        tok, length = our_tokenizers[name]
        hf_tok = hf_tokenizers[name]
        outputs, notes = [], []
        for g, texts in enumerate(groups):
            which = "prompt" if g == 0 else "negative"
            # The exact call diffusers' pipeline makes (special tokens on by default).
            ids = hf_tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            our_ids = tok.encode(texts, length).ids
            if not torch.equal(our_ids, ids):
                notes.append(f"{which}: {_first_difference(our_ids, ids)}")
            if activation is None:
                out = model(ids.to(setup.device))
                recorded[name].record(ids, out)
                outputs.append(Output(f"{which} last_hidden_state", ours[g].t5, out.last_hidden_state))
            else:
                out = model(ids.to(setup.device), output_hidden_states=True)
                recorded[name].record(ids, out)
                mine = ours[g].clip_l if name == "clip-l" else ours[g].clip_g
                outputs += [Output(f"{which} hidden_states[-2]", mine.penultimate, out.hidden_states[-2]),
                            Output(f"{which} text_embeds", mine.pooled, out.text_embeds)]
        del model, out
        release_memory()
        if name in wanted:
            what = "last_hidden_state" if activation is None else "hidden_states[-2], text_embeds"
            rows.append(compare(name, outputs, setup.tolerance.component, note="; ".join(notes),
                                compared=f"{what} ({' and '.join(g for g in ('prompt', 'negative')[:len(groups)])})"))

    # diffusers' own assembly, answered from the runs above.
    say("diffusers side: encode_prompt")
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=recorded["clip-l"], tokenizer=hf_tokenizers["clip-l"],
        text_encoder_2=recorded["clip-g"], tokenizer_2=hf_tokenizers["clip-g"],
        text_encoder_3=recorded["t5"], tokenizer_3=hf_tokenizers["t5"],
    )
    cfg_on = setup.negative is not None
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=setup.prompt, prompt_2=None, prompt_3=None, device=setup.device, num_images_per_prompt=1,
        do_classifier_free_guidance=cfg_on, negative_prompt=setup.negative, max_sequence_length=L,
    )
    context_dim = setup.config.context_dim
    mine = [assemble(e.clip_l, e.clip_g, e.t5, t5_length=L, context_dim=context_dim) for e in ours]
    outputs = [Output("prompt_embeds", mine[0].context, pe), Output("pooled_prompt_embeds", mine[0].pooled, ppe)]
    if cfg_on:
        outputs += [Output("negative_prompt_embeds", mine[1].context, npe),
                    Output("negative_pooled_prompt_embeds", mine[1].pooled, nppe)]
    if "prompt" in wanted:
        rows.append(compare("prompt", outputs, setup.tolerance.component,
                            compared="context and pooled" + (" (prompt and negative)" if cfg_on else " (prompt)")))
    from mmdit.conditioning import Conditioning

    positive = Conditioning(pe, ppe)
    negative = Conditioning(npe, nppe) if cfg_on else None
    return rows, (positive, negative)


def random_conditioning(setup: Setup) -> tuple[Conditioning, Conditioning | None]:
    """Seeded stand-in prompt embeddings (the text rows were not run): 77 CLIP + L T5 tokens, N(0, 1).

    77: the CLIP length of every released model (the tokenizers are not read for a stand-in).
    """
    from mmdit.conditioning import CLIP_TOKENS, Conditioning

    g = torch.Generator().manual_seed(setup.settings.seed + 1)
    tokens, cfg = CLIP_TOKENS + setup.max_sequence_length, setup.config

    def draw() -> Conditioning:
        return Conditioning(torch.randn(1, tokens, cfg.context_dim, generator=g).to(setup.device, setup.dtype),
                            torch.randn(1, cfg.pooled_dim, generator=g).to(setup.device, setup.dtype))

    positive = draw()
    return positive, (draw() if setup.negative is not None else None)


# ------------------------------------------------------------------------------------------------ transformer


def reference_transformer(setup: Setup) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from loaders.checkpoint import TRANSFORMER_PREFIX
    from loaders.safetensors import load_weights
    from loaders.transformer_keys import is_diffusers_layout, transformer_to_diffusers

    checkpoint = setup.reference
    if not checkpoint.single_file:
        model = SD3Transformer2DModel.from_pretrained(checkpoint.path, subfolder="transformer", torch_dtype=setup.dtype)
        return model.to(setup.device).eval()
    state = _read_file(checkpoint.path, TRANSFORMER_PREFIX) or _read_file(checkpoint.path)  # else a bare transformer
    if not is_diffusers_layout(state):
        state = transformer_to_diffusers(state)
    config = setup.config
    with init_empty_weights():  # our MMDiTConfig in SD3Transformer2DModel's terms
        model = SD3Transformer2DModel(
            sample_size=128, patch_size=config.patch_size, in_channels=config.in_channels,
            out_channels=config.out_channels, num_layers=config.depth, attention_head_dim=config.head_dim,
            num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
            caption_projection_dim=config.dim, pooled_projection_dim=config.pooled_dim,
            pos_embed_max_size=config.pos_embed_max_size, qk_norm="rms_norm" if config.qk_norm else None,
            dual_attention_layers=tuple(config.dual_attention_layers),
        )
    return load_weights(model, state, what=f"diffusers transformer from {checkpoint.path}", dtype=setup.dtype,
                        device=setup.device)


def check_transformer(setup: Setup, wanted: set[str], conditioning: tuple[Conditioning, Conditioning | None],
                      say: Callable[..., None]) -> tuple[list[Row], Tensor | None]:
    """The one-step and sampling-loop rows; returns them and diffusers' final latents (when sampling ran)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from loaders.checkpoint import load_transformer
    from loaders.pipeline import generate_latents
    from samplers import initial_noise, sigmas, timesteps

    s, dtype, device = setup.settings, setup.dtype, setup.device
    positive, negative = conditioning
    context, pooled = positive.context, positive.pooled
    if negative is not None:  # the model call's batch under CFG is [negative, positive], as both pipelines batch it
        context, pooled = torch.cat([negative.context, context]), torch.cat([negative.pooled, pooled])
    noise = initial_noise(1, s.height, s.width, s.seed, channels=setup.config.in_channels, dtype=dtype, device=device)
    x = noise.expand(context.shape[0], -1, -1, -1)  # (B, C, h, w): the same noise for both CFG rows
    t = timesteps(sigmas(s.steps, s.shift))[0].to(device).expand(x.shape[0])  # first call: t = 1000

    say("ours: MM-DiT")
    model = load_transformer(setup.checkpoint, dtype=dtype, device=device)
    v_ours = model(x, t, context, pooled) if "transformer" in wanted else None
    latents_ours = generate_latents(model, positive, negative, s) if "sampling" in wanted else None
    del model
    release_memory()

    say("diffusers side: SD3Transformer2DModel")
    ref = reference_transformer(setup)
    rows: list[Row] = []
    if "transformer" in wanted:
        v_ref = ref(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled,
                    return_dict=False)[0]
        rows.append(compare("transformer", [Output("velocity", v_ours, v_ref)], setup.tolerance.component))
    if "sampling" not in wanted:
        del ref
        release_memory()
        return rows, None
    pipe = StableDiffusion3Pipeline(
        transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(shift=s.shift), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt_embeds=positive.context, pooled_prompt_embeds=positive.pooled, guidance_scale=s.cfg,
                  num_inference_steps=s.steps, height=s.height, width=s.width, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(s.seed))
    if negative is not None:
        kwargs.update(negative_prompt_embeds=negative.context, negative_pooled_prompt_embeds=negative.pooled)
    if s.slg_layers:
        kwargs.update(skip_guidance_layers=list(s.slg_layers), skip_layer_guidance_scale=s.slg_scale,
                      skip_layer_guidance_start=s.slg_start, skip_layer_guidance_stop=s.slg_stop)
    latents_ref = pipe(**kwargs)[0]
    rows.append(compare("sampling", [Output("final latents", latents_ours, latents_ref)], setup.tolerance.sampling))
    del pipe, ref
    release_memory()
    return rows, latents_ref


def random_latents(setup: Setup) -> Tensor:
    """Seeded stand-in final latents (the sampling row was not run), N(0, 1) like the model's latent space."""
    s = setup.settings
    g = torch.Generator().manual_seed(s.seed + 2)
    shape = (1, setup.config.out_channels, s.height // 8, s.width // 8)
    return torch.randn(shape, generator=g).to(setup.device, setup.dtype)


# ------------------------------------------------------------------------------------------------ VAE


def reference_vae(setup: Setup) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from loaders.checkpoint import VAE_PREFIX, vae_config
    from loaders.vae_keys import vae_to_diffusers

    checkpoint = setup.reference
    if not checkpoint.single_file:
        model = AutoencoderKL.from_pretrained(checkpoint.path, subfolder="vae", torch_dtype=setup.dtype)
        return model.to(setup.device).eval()
    state = vae_to_diffusers(_read_file(checkpoint.path, VAE_PREFIX))
    config = vae_config(checkpoint)
    levels = len(config.widths)
    with init_empty_weights():  # our VAEConfig in AutoencoderKL's terms
        model = AutoencoderKL(
            in_channels=config.image_channels, out_channels=config.image_channels,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(config.widths), layers_per_block=config.num_res_blocks,
            latent_channels=config.latent_channels, norm_num_groups=config.norm_groups,
            scaling_factor=config.scaling_factor, shift_factor=config.shift_factor,
            use_quant_conv=False, use_post_quant_conv=False,
        )
    state = {k: v.to(setup.device, setup.dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    result = model.load_state_dict(state, strict=config.has_encoder, assign=True)
    unfit = result.unexpected_keys or [k for k in result.missing_keys if not k.startswith("encoder.")]
    if not config.has_encoder and unfit:  # a decoder-only file leaves only diffusers' encoder empty
        raise InputError(f"diffusers VAE does not fit {checkpoint.path}: {result}")
    return model.eval()  # already on the device; no .to(): an empty (meta) encoder cannot be moved


def check_vae(setup: Setup, wanted: set[str], latents: Tensor, say: Callable[..., None]) -> list[Row]:
    from diffusers.image_processor import VaeImageProcessor
    import numpy as np

    from loaders.checkpoint import load_vae
    from mmdit.vae import decode, to_uint8

    say("ours: VAE")
    vae = load_vae(setup.checkpoint, dtype=setup.dtype, device=setup.device)
    image_ours = decode(vae, latents)  # (B, 3, H, W)
    png_ours = to_uint8(image_ours).cpu()  # (B, H, W, 3), what decode_images returns
    del vae
    release_memory()

    say("diffusers side: AutoencoderKL")
    ref = reference_vae(setup)
    z = latents / ref.config.scaling_factor + ref.config.shift_factor  # the pipeline's un-normalisation
    image_ref = ref.decode(z, return_dict=False)[0]
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(ref.config.block_out_channels) - 1))
    png_ref = torch.from_numpy(np.stack([np.asarray(im) for im in processor.postprocess(image_ref, output_type="pil")]))
    del ref
    release_memory()
    rows = []
    if "vae" in wanted:
        rows.append(compare("vae", [Output("decoded image", image_ours, image_ref)], setup.tolerance.component))
    if "png" in wanted:
        levels = (png_ours.int() - png_ref.int()).abs().max().item() if png_ours.shape == png_ref.shape else math.inf
        same = png_ours.shape == png_ref.shape
        note = "" if same else f"shapes differ: {tuple(png_ours.shape)} vs {tuple(png_ref.shape)}"
        tol = setup.tolerance.png_levels
        rows.append(Row("png", COMPONENTS["png"], float(levels), levels / 255, tol / 255,
                        levels <= tol and not note, "8-bit RGB (levels / 255)", note))
    return rows


# ------------------------------------------------------------------------------------------------ output


def format_table(report: Report) -> str:
    h = report.header
    lines = [
        f"model {h['model']} ({h['variant']}, {h['layout']}), {h['dtype']} on {h['device']}, "
        f"{h['width']}x{h['height']}, {h['steps']} steps, cfg {h['cfg']}, seed {h['seed']}",
        f"reference: {h['reference']} ({h['reference_layout']}) in diffusers {h['versions']['diffusers']}, "
        f"transformers {h['versions']['transformers']}; torch {h['versions']['torch']}",
        "",
        f"{'component':<22}{'max abs diff':>14}{'relative':>12}{'tolerance':>12}  {'result':<6}  compared",
        "-" * 100,
    ]
    for r in report.rows:
        lines.append(f"{r.label:<22}{r.max_abs:>14.3e}{r.relative:>12.3e}{r.tolerance:>12.1e}  "
                     f"{'pass' if r.passed else 'FAIL':<6}  {r.compared}")
        if r.note:
            lines.append(f"{'':<22}  ! {r.note}")
    failed = [r.label for r in report.rows if not r.passed]
    lines += ["", "all rows pass" if not failed else f"FAILED: {', '.join(failed)}"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
