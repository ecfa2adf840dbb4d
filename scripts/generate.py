#!/usr/bin/env python
"""Text-to-image with SD3 / SD3.5: `python scripts/generate.py --prompt "..." --out image.png`.

A thin client of `loaders.Pipeline`: stages load one component at a time (text encoders -> MM-DiT -> VAE), so
peak memory is about the largest component. With no --model the built-in tiny model is used, so this runs
anywhere; point --model at the official weights for real images:
  --model stabilityai/stable-diffusion-3.5-medium          (Hugging Face repo id; needs access + HF_TOKEN)
  --model /path/to/stable-diffusion-3.5-large              (a downloaded diffusers folder)
  --model /path/to/sd3.5_large.safetensors                 (a Stability single file; text encoders from the
                                                             text_encoders/ folder next to it)
Many prompts, weights loaded once: --prompts FILE (one prompt per line, or JSON Lines with "prompt",
"negative_prompt", "seed", "layout", "out"); images it already made are skipped, so a rerun resumes.
The same command under `torchrun --nproc-per-node N` shares the prompts out by rank.
Every argument, file and line is checked before any weight is loaded (`loaders.validate`); every file is
written whole or not at all (`loaders.files`), and nothing this program did not make is replaced without
--overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dense import PRESETS, RegionalConfig
from loaders.checkpoint import OFFLOAD
from loaders.fp8 import WEIGHTS
from loaders.lora import LoRA
from loaders.pipeline import DTYPES, LAYOUT_METHODS, PRESET_KINDS
from loaders.validate import SEEDS
from mmdit.errors import InputError
from samplers import DEFAULT_STRENGTH, SAMPLERS, first_step

TEMPLATE = "out/{index:04d}.png"  # --out for --prompts when none is given


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model and prompt")
    src.add_argument("--model", help="diffusers folder, .safetensors single file, or Hub repo id (default: built-in tiny model)")
    src.add_argument("--transformer", type=Path, help="the MM-DiT from this file instead: a GGUF file (Q8_0, Q4_0, "
                     "...; docs/gguf.md) or a .safetensors file holding the MM-DiT alone; --model gives the rest")
    src.add_argument("--tokenizers", type=Path, help="folder holding tokenizer/, tokenizer_2/, tokenizer_3/ (for a single file)")
    src.add_argument("--prompt", help="the text to draw")
    src.add_argument("--prompts", type=Path, help="a file of prompts: one per line, or JSON Lines (see above)")
    src.add_argument("--negative-prompt", default="", help='what to steer away from (default: "")')
    src.add_argument("--prompt-embeds", type=Path, help="precomputed embeddings (.safetensors) instead of --prompt")
    src.add_argument("--num-images", type=int, default=1, help="images per prompt (one noise draw for all)")
    src.add_argument("--max-sequence-length", type=int,
                     help="T5 tokens (at most 512; default 256, 16 for the built-in model)")
    src.add_argument("--no-t5", action="store_true", help="skip T5-XXL (zeros in its place, as diffusers does)")
    src.add_argument("--lora", action="append", type=_lora, default=[], metavar="PATH[:SCALE]",
                     help="merge a LoRA (.safetensors: diffusers/PEFT, kohya or ComfyUI keys) at SCALE (default 1); "
                          "repeatable (docs/lora.md)")
    smp = p.add_argument_group("sampling (defaults: the detected model's preset)")
    smp.add_argument("--steps", type=int)
    smp.add_argument("--cfg", type=float, help="classifier-free guidance scale; <= 1 turns CFG off")
    smp.add_argument("--shift", type=float, help="timestep schedule shift")
    smp.add_argument("--seed", type=int, default=0, help="noise seed (with --prompts: for every line without one)")
    smp.add_argument("--height", type=int, help="pixels, a multiple of 16 (default 1024; 128 for the built-in model)")
    smp.add_argument("--width", type=int, help="pixels, a multiple of 16 (default 1024; 128 for the built-in model)")
    smp.add_argument("--slg-layers", type=_int_list, help="skip-layer guidance blocks, e.g. 7,8,9 ('' for none)")
    smp.add_argument("--slg-scale", type=float)
    smp.add_argument("--slg-start", type=float)
    smp.add_argument("--slg-stop", type=float)
    smp.add_argument("--sampler", choices=list(SAMPLERS), help="euler (diffusers', the default) or dpmpp_2m "
                     "(Stability's reference sampler)")
    smp.add_argument("--preset", choices=list(PRESET_KINDS), default="diffusers",
                     help="defaults from the diffusers model cards (Euler) or from Stability's reference code (dpmpp_2m)")
    img = p.add_argument_group("image to image and inpainting")
    img.add_argument("--init-image", type=Path, help="start from this image (resized to --height/--width; default: "
                     "its own size, rounded down to a multiple of 16)")
    img.add_argument("--strength", type=float, help="how much of the init image is redrawn, in (0, 1] (default 0.6)")
    img.add_argument("--mask", type=Path, help="with --init-image: greyscale mask, white = repaint, black = keep")
    lay = p.add_argument_group("layout control (DenseDiffusion, or Regional Prompting: docs/layout-control.md)")
    lay.add_argument("--layout", type=Path, help="layout JSON: a phrase per region (mask or box)")
    lay.add_argument("--layout-method", choices=list(LAYOUT_METHODS), default="dense",
                     help="dense: DenseDiffusion's score edit; regional: each phrase a prompt of its own, masked")
    lay.add_argument("--dense-strength", type=float, default=1.0, help="score-edit strength (0: off, maps still recorded)")
    lay.add_argument("--dense-preset", choices=list(PRESETS), default="faithful")
    lay.add_argument("--attention-maps", type=Path, help="write per-phrase attention maps and stats.json here")
    regional = RegionalConfig()
    lay.add_argument("--base-ratio", type=float, help="regional: the base prompt's share β of the image tokens' "
                     f"attention, in [0, 1] (default {regional.base_ratio})")
    lay.add_argument("--inject-steps", type=int, help="regional: the first steps that use the regional prompts "
                     f"(default {regional.inject_steps}; 0: off)")
    lay.add_argument("--inject-interval", type=int, help="regional: mask the blocks k with k %% interval == 0 "
                     f"(default {regional.inject_interval}: every block)")
    lay.add_argument("--background-prompt", help="regional: the prompt of the tokens in no worded region (default: "
                     "the layout's \"background\", else the empty prompt)")
    run = p.add_argument_group("run and output")
    run.add_argument("--dtype", choices=list(DTYPES), default="float32")
    run.add_argument("--compile", action="store_true", help="torch.compile the MM-DiT's blocks (the first image "
                     "compiles them: slow; later ones are faster)")
    run.add_argument("--vae-dtype", choices=list(DTYPES), help="the VAE's dtype (default: --dtype; float32 helps "
                     "CPUs whose 16-bit convolutions are slow)")
    run.add_argument("--device", help="default: cuda if available (under torchrun: cuda:LOCAL_RANK), else cpu")
    mem = p.add_argument_group("memory (docs/performance.md)")
    mem.add_argument("--offload", choices=list(OFFLOAD), default="none",
                     help="blocks: keep the MM-DiT's joint blocks in CPU memory, streamed to the GPU as they run")
    mem.add_argument("--t5-device", help="run T5 on this device instead (e.g. cpu), in --dtype; its output "
                                         "moves to --device")
    mem.add_argument("--report-memory", action="store_true",
                     help="print each stage's weight bytes and peak memory as a table (stdout)")
    mem.add_argument("--weights", choices=list(WEIGHTS),
                     help="fp8: the MM-DiT's and T5's linear layers in float8 with a per-tensor scale, computed in "
                          "--dtype (about half the memory of 16-bit); full: every weight in --dtype. Default: as "
                          "the file stores them (a float8 file, e.g. ComfyUI's *_fp8_scaled, stays float8)")
    run.add_argument("--out", help="PNG path; with --num-images N: name_0.png ...; with --prompts a template with "
                                   f"{{index}} and {{seed}} (default {TEMPLATE}) [default out.png]")
    run.add_argument("--save-latents", type=Path, help="also write the final latents (key 'latents') here")
    run.add_argument("--overwrite", action="store_true", help="replace existing output files (without it, nothing "
                     "this program did not make is replaced; a batch remakes only what is missing or unfinished)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    args = p.parse_args(argv)
    given = [name for name in ("prompt", "prompts", "prompt_embeds") if getattr(args, name) is not None]
    if len(given) > 1:
        p.error(f"give one of --prompt, --prompts, --prompt-embeds, not {' and '.join('--' + g.replace('_', '-') for g in given)}")
    if not given and args.layout is None:
        p.error("give --prompt (or --prompts, --prompt-embeds, or a --layout whose JSON has a prompt)")
    if args.prompts and (args.save_latents or args.attention_maps or args.layout):
        p.error("with --prompts, give layouts per line (\"layout\"); --save-latents and --attention-maps are per image")
    if args.num_images < 1:
        p.error("--num-images must be at least 1")
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= 512:
        p.error("--max-sequence-length must be between 1 and 512")
    if args.dense_strength < 0:
        p.error("--dense-strength must be >= 0")
    if args.layout and args.prompt_embeds:
        p.error("--layout needs the prompt text (--prompt), not --prompt-embeds")
    regional_flags = [f for f in ("base_ratio", "inject_steps", "inject_interval", "background_prompt")
                      if getattr(args, f) is not None]
    if regional_flags and args.layout_method != "regional":
        p.error(f"--{regional_flags[0].replace('_', '-')} is a Regional Prompting setting: add --layout-method regional")
    if args.layout_method == "regional" and args.attention_maps:
        p.error("--attention-maps records DenseDiffusion's maps; it does not go with --layout-method regional")
    if args.attention_maps and not args.layout:
        p.error("--attention-maps needs a --layout (its regions and phrases are what is measured); "
                "for a baseline without the score edit add --dense-strength 0")
    return args


def _regional(args: argparse.Namespace) -> dict:
    """The Regional Prompting keywords of a `Pipeline` call (none for DenseDiffusion)."""
    if args.layout_method != "regional":
        return {}
    given = {f: getattr(args, f) for f in ("base_ratio", "inject_steps", "inject_interval") if getattr(args, f) is not None}
    return dict(layout_method="regional", regional=RegionalConfig(**given), background_prompt=args.background_prompt)


def _lora(text: str) -> LoRA:
    try:
        return LoRA.parse(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers like 7,8,9, got {text!r}") from None


@dataclass(frozen=True)
class Job:
    """One prompt to draw and where its images go."""

    index: int  # its line in the prompts file (0 for a single --prompt)
    prompt: str | None
    negative_prompt: str
    seed: int
    layout: Path | dict | None
    outputs: tuple[Path, ...]
    where: str = "--out"  # how messages name where its outputs come from


def image_paths(out: Path, count: int) -> list[Path]:
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def read_jobs(args: argparse.Namespace, count: int) -> list[Job]:
    """The jobs of a run: one for --prompt / --prompt-embeds / --layout, one per line of --prompts (each line's
    keys and their types checked here; everything else about it by `check_job` before the first image)."""
    if args.prompts is None:
        out = _png(args.out or "out.png", "--out")
        return [Job(0, args.prompt, args.negative_prompt, args.seed, args.layout, tuple(image_paths(out, count)))]
    try:
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read --prompts {args.prompts}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--prompts {args.prompts} is not UTF-8 text (byte {e.start} cannot be decoded); save it "
                         "as UTF-8") from None
    template = args.out or TEMPLATE
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{args.prompts}:{number}"
        entry = _json_line(line, where) if line.lstrip().startswith("{") else {"prompt": line.strip()}
        index, seed = len(jobs), entry.get("seed", args.seed)
        layout = entry.get("layout")
        if isinstance(layout, str):  # a layout file, relative to the prompts file
            layout = args.prompts.parent / layout
        out = entry.get("out")
        if out is None:
            try:
                out = template.format(index=index, seed=seed)
            except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
                raise InputError(f"--out {template!r} is not a template of {{index}} and {{seed}}: {e}") from None
        what = f'{where} "out"' if "out" in entry else f"--out (line {number})"
        jobs.append(Job(index, entry.get("prompt"), entry.get("negative_prompt", args.negative_prompt), seed, layout,
                        tuple(image_paths(_png(out, what), count)), what))
    if not jobs:
        raise InputError(f"--prompts {args.prompts} holds no prompts")
    return jobs


def _png(out: str, what: str) -> Path:
    """An image output path; only PNG carries the settings that made the image."""
    if not out or not out.strip():
        raise InputError(f"{what} is empty; give a .png path")
    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise InputError(f"{what} {out!r}: images are written as PNG (it carries the settings that made them); give "
                         "a name ending in .png and convert it afterwards if you need another format")
    return path


LINE_KEYS = {"prompt": (str,), "negative_prompt": (str,), "seed": (int,), "layout": (str, dict), "out": (str,)}


def _json_line(line: str, where: str) -> dict:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(entry, dict):
        raise InputError(f"{where}: a JSON line must be an object like {{\"prompt\": \"a red circle\"}}")
    unknown = sorted(set(entry) - set(LINE_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; a line may have prompt, negative_prompt, seed, layout, out")
    if not isinstance(entry.get("prompt", ""), str) or ("prompt" not in entry and "layout" not in entry):
        raise InputError(f"{where}: needs a \"prompt\" string (or a \"layout\" that has one)")
    for key, types in LINE_KEYS.items():
        value = entry.get(key)
        if key in entry and (not isinstance(value, types) or isinstance(value, bool)):
            wanted = {"layout": "a layout file path or a layout object", "seed": "a whole number"}.get(key, "a string")
            raise InputError(f"{where}: \"{key}\" must be {wanted}, got {json.dumps(value)}")
    if "seed" in entry and not SEEDS[0] <= entry["seed"] <= SEEDS[1]:
        raise InputError(f"{where}: \"seed\" {entry['seed']} is outside torch's seed range [{SEEDS[0]}, {SEEDS[1]}]")
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    try:
        return run(args, say)
    except InputError as e:  # what the user gave is wrong: one line; anything else is a bug and keeps its traceback
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every file is written atomically: what is on disk is complete
        print("interrupted: the images finished so far are kept; run the same command again to make the rest",
              file=sys.stderr)
        return 130


@dataclass(frozen=True)
class Outputs:
    """What a run will write, checked before any weight is loaded."""

    todo: list[Job]  # this rank's jobs that have something to make
    pending: list[Job]  # every rank's (checked on every rank, so that all of them fail alike)
    write: set[Path]  # the image paths to write (missing, unfinished, or --overwrite)
    manifest: Path | None  # where a batch's manifest goes
    notes: list[str]  # what the user should know (files left alone)


def plan_outputs(args: argparse.Namespace, jobs: list[Job], rank: int, world: int) -> Outputs:
    """Which files the run writes, and the checks that protect what is there: every path writable and none of
    them the same file twice; a single run replaces nothing without --overwrite; a batch skips the images it
    already made, remakes ones it did not finish, and leaves anyone else's file alone (its manifest.json too)."""
    from dense import parse_layout, read_layout
    from loaders.files import check_outputs
    from loaders.layout import attention_map_paths
    from loaders.pngmeta import made_here

    paths = [(p, job.where) for job in jobs for p in job.outputs]
    extra: list[tuple[Path, str]] = []
    if args.save_latents:
        extra.append((args.save_latents, "--save-latents"))
    if args.attention_maps:
        layout = jobs[0].layout
        layout = read_layout(layout) if isinstance(layout, (str, Path)) else parse_layout(layout) if layout else None
        if layout is not None:
            extra += [(p, "--attention-maps") for p in attention_map_paths(args.attention_maps, layout)]
    manifest = None
    if args.prompts is not None:
        folder = Path(os.path.commonpath([str(p.parent.resolve()) for p, _ in paths]))
        manifest = folder / "manifest.json"  # rewritten each run: it describes the whole batch as it now stands
        extra.append((manifest, "the batch's manifest"))
    check_outputs(paths + extra, hint="put {index} in --out or give each line its own \"out\"" if args.prompts
                  else "give each output its own path")
    notes: list[str] = []
    if args.prompts is None:
        existing = [str(p) for p, _ in paths + extra if p.exists()]
        if existing and not args.overwrite:
            raise InputError(f"{', '.join(existing)} already exist(s); choose another --out or pass --overwrite")
        return Outputs(jobs, jobs, {p for p, _ in paths}, None, notes)
    if manifest.exists() and not args.overwrite and not _our_manifest(manifest):
        raise InputError(f"{manifest} exists and is not a manifest this program wrote; the batch writes its "
                         "manifest.json there: move that file, or pass --overwrite")
    write: set[Path] = set()
    for p, _ in paths:
        state = made_here(p) if p.exists() else False
        if args.overwrite or state is False:  # missing, or an image of ours that was cut short
            write.add(p)
        elif state is None:
            notes.append(f"{p} exists and was not made by this program; left alone (--overwrite replaces it)")
    pending = [job for job in jobs if any(p in write for p in job.outputs)]
    todo = [job for job in jobs[rank::world] if job in pending]
    return Outputs(todo, pending, write, manifest, notes)


def _our_manifest(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and {"prompts", "world_size", "images"} <= set(data)


def job_call(args: argparse.Namespace, job: Job) -> dict:
    """The `Pipeline.__call__` arguments of a job (besides the progress callback and the memory log)."""
    return dict(prompt=job.prompt, layout=job.layout, negative_prompt=job.negative_prompt, seed=job.seed,
                num_images=args.num_images, max_sequence_length=args.max_sequence_length,
                dense_strength=args.dense_strength, dense_preset=args.dense_preset,
                record_maps=args.attention_maps is not None, init_image=args.init_image, strength=args.strength,
                mask=args.mask, steps=args.steps, cfg=args.cfg, shift=args.shift, height=args.height,
                width=args.width, slg_layers=args.slg_layers, slg_scale=args.slg_scale, slg_start=args.slg_start,
                slg_stop=args.slg_stop, sampler=args.sampler, **_regional(args))


def run(args: argparse.Namespace, say) -> int:
    from safetensors.torch import save as safetensors_bytes

    from loaders import Pipeline
    from loaders.files import write_bytes
    from loaders.layout import save_attention_maps
    from loaders.memory import MemoryLog, memory_table
    from loaders.pngmeta import save_png
    from loaders.safetensors import read_tensors
    from loaders.validate import check_call, check_job

    rank, world = _distributed()
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    embeds = read_tensors(args.prompt_embeds) if args.prompt_embeds is not None else None
    rows = embeds["prompt_embeds"].shape[0] if embeds is not None and "prompt_embeds" in embeds else 1
    jobs = read_jobs(args, rows * args.num_images)

    # Everything is checked before any weight is loaded: the outputs (so nothing the user has is lost), then
    # every job that has work to do, against the model's headers (a Pipeline that has loaded no weights yet).
    plan = plan_outputs(args, jobs, rank, world)
    for note in plan.notes:
        say(f"note: {note}")
    options = dict(dtype=DTYPES[args.dtype], device=device, t5=not args.no_t5, tokenizers=args.tokenizers,
                   offload=args.offload, t5_device=args.t5_device, weights=args.weights, loras=args.lora,
                   preset=args.preset, vae_dtype=DTYPES[args.vae_dtype] if args.vae_dtype else None,
                   compile=args.compile, transformer=args.transformer)
    pipe = Pipeline.load(args.model, keep_loaded=False, **options)
    tokenizers: dict = {}  # loaded once for all the lines' layouts
    for job in plan.pending:
        if embeds is not None:
            check_call(pipe, {**job_call(args, job), "prompt": None})
        else:
            check_job(pipe, job_call(args, job), keep=tokenizers)
    if len(plan.todo) > 1:  # the same model, now kept loaded for the whole batch
        pipe = Pipeline.load(args.model, keep_loaded=True, **options)
    todo = plan.todo

    memory = MemoryLog() if args.report_memory else None
    if pipe.defaults.note:
        say(f"note: {pipe.defaults.note}")
    for lora in pipe.loras:
        say(f"LoRA {lora.describe()}")
    if pipe.source.builtin:
        say("Using the built-in tiny model: it only knows 128x128 scenes of circles, squares and triangles in red, "
            "green, blue and yellow, e.g. 'a red circle and a blue square'.")
        say("For real images give the official weights, e.g. --model stabilityai/stable-diffusion-3.5-medium")
    call = job_call(args, jobs[0])
    settings = pipe.settings(seed=args.seed, init_image=args.init_image,
                             **{k: call[k] for k in ("steps", "cfg", "shift", "height", "width", "slg_layers",
                                                     "slg_scale", "slg_start", "slg_stop", "sampler")})
    steps = settings.steps
    if args.init_image is not None:
        steps -= first_step(settings.steps, DEFAULT_STRENGTH if args.strength is None else args.strength)
    weights = f", weights {pipe.weights}"
    if args.weights is None:  # chosen by the file: say so, and how to choose the other
        weights += (" (the file stores float8; --weights full dequantises it)" if pipe.weights == "fp8" else
                    " (the file is not float8; --weights fp8 quantises it)")
    say(f"model {pipe.checkpoint.name}"
        + (f" with the MM-DiT of {args.transformer.name}" if args.transformer else "")
        + f" ({pipe.defaults.variant}), {settings.steps} steps, cfg {settings.cfg}, "
        f"shift {settings.shift}, {settings.sampler}, {settings.width}x{settings.height}, {args.dtype} on {device}"
        + weights
        + (f"; {len(jobs)} prompts, {len(jobs) - len(plan.pending)} already made" if args.prompts else ""))

    conditioning = None  # --prompt-embeds: checked and repeated once, before any weight is loaded
    if embeds is not None:
        from loaders.text import conditioning_from_embeds

        conditioning = conditioning_from_embeds(embeds, settings.guidance.cfg_on, args.num_images,
                                                where=str(args.prompt_embeds))
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=steps * len(todo), desc="sampling", unit="step", file=sys.stderr)
    started, made = time.perf_counter(), []
    for job in todo:
        call = dict(job_call(args, job), callback=(lambda i, x: bar.update(1)) if bar else None, memory=memory)
        if conditioning is not None:
            del call["prompt"], call["layout"]
            result = pipe(prompt_embeds=conditioning[0], negative_embeds=conditioning[1], **call)
            result.record["prompt_embeds"] = str(args.prompt_embeds)
        else:
            result = pipe(**call)
        for note in result.warnings:
            say(f"warning: {note}")
        if args.compile and not made:
            say(f"--compile: the first image took {time.perf_counter() - started:.1f} s, compiling included")
        for i, path in enumerate(job.outputs):
            if path in plan.write:  # missing, unfinished, or --overwrite: never someone else's file without it
                save_png(path, np.asarray(result.images[i]), {**result.record, "image_index": i}, overwrite=True)
        if args.save_latents:
            write_bytes(args.save_latents, safetensors_bytes({"latents": result.latents.float().cpu().contiguous()}))
        if result.maps is not None:
            save_attention_maps(args.attention_maps, result.maps, (settings.height, settings.width))
        made.append({"index": job.index, "prompt": result.record["prompt"], "seed": job.seed, "rank": rank,
                     "images": [str(p) for p in job.outputs]})
    if bar:
        bar.close()
    elapsed = time.perf_counter() - started
    if plan.manifest is not None:
        _write_manifest(plan.manifest, jobs, made, rank, world, args)
        say(f"manifest: {plan.manifest}")
    if world > 1:
        _leave_process_group()
    if memory is not None:  # what was asked for, so on stdout and not silenced by --quiet
        print(memory_table(memory.stages))
    images = sum(len(m["images"]) for m in made)
    say(f"{images} image(s) in {elapsed:.1f} s" + (f"; wrote {', '.join(made[0]['images'])}" if len(made) == 1 else ""))
    return 0


def _distributed() -> tuple[int, int]:
    """(rank, world size): under torchrun, join its process group (NCCL on GPUs, gloo on CPUs); else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _leave_process_group() -> None:
    """Destroy the process group before Python exits: a gloo group left to the interpreter's shutdown can abort
    the process ("terminate called without an active exception", pytorch/pytorch#190489). The barrier lets no
    rank leave while another still talks to it."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _write_manifest(path: Path, jobs: list[Job], made: list[dict], rank: int, world: int,
                    args: argparse.Namespace) -> None:
    """Rank 0 writes manifest.json beside the prompts' outputs: every job, and which run (and rank) made it."""
    from loaders.files import write_json

    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, made)  # gloo and NCCL both carry Python objects
        made = [m for part in gathered for m in part]
    if rank != 0:
        return
    done = {m["index"]: m for m in made}
    entries = [{"index": j.index, "prompt": j.prompt, "seed": j.seed, "images": [str(p) for p in j.outputs],
                "made_by_rank": done[j.index]["rank"] if j.index in done else None,
                "status": "made" if j.index in done else "existed"} for j in jobs]
    write_json(path, {"prompts": str(args.prompts), "world_size": world, "images": entries})


if __name__ == "__main__":
    raise SystemExit(main())
