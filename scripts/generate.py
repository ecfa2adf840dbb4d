#!/usr/bin/env python
"""Text-to-image with SD3 / SD3.5: `python scripts/generate.py --prompt "..." --out image.png`.

Stages, one component in memory at a time: text encoders -> (freed) -> MM-DiT sampling -> (freed) -> VAE.
With no --model the built-in tiny random model is used (made once, cached), so this runs anywhere; point
--model at the official weights for real images:
  --model stabilityai/stable-diffusion-3.5-medium          (Hugging Face repo id; needs access + HF_TOKEN)
  --model /path/to/stable-diffusion-3.5-large              (a downloaded diffusers folder)
  --model /path/to/sd3.5_large.safetensors                 (a Stability single file; text encoders from the
                                                             text_encoders/ folder next to it)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model and prompt")
    src.add_argument("--model", help="diffusers folder, .safetensors single file, or Hub repo id (default: built-in tiny model)")
    src.add_argument("--tokenizers", type=Path, help="folder holding tokenizer/, tokenizer_2/, tokenizer_3/ (for a single file)")
    src.add_argument("--prompt", help="the text to draw")
    src.add_argument("--negative-prompt", default="", help='what to steer away from (default: "")')
    src.add_argument("--prompt-embeds", type=Path, help="precomputed embeddings (.safetensors) instead of --prompt")
    src.add_argument("--num-images", type=int, default=1, help="images per prompt (one noise draw for all)")
    src.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (at most 512; default 256)")
    src.add_argument("--no-t5", action="store_true", help="skip T5-XXL (zeros in its place, as diffusers does)")
    smp = p.add_argument_group("sampling (defaults: the detected model's preset)")
    smp.add_argument("--steps", type=int)
    smp.add_argument("--cfg", type=float, help="classifier-free guidance scale; <= 1 turns CFG off")
    smp.add_argument("--shift", type=float, help="timestep schedule shift")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--height", type=int, help="pixels, a multiple of 16 (default 1024; 128 for the built-in model)")
    smp.add_argument("--width", type=int, help="pixels, a multiple of 16 (default 1024; 128 for the built-in model)")
    smp.add_argument("--slg-layers", type=_int_list, help="skip-layer guidance blocks, e.g. 7,8,9 ('' for none)")
    smp.add_argument("--slg-scale", type=float)
    smp.add_argument("--slg-start", type=float)
    smp.add_argument("--slg-stop", type=float)
    lay = p.add_argument_group("layout control (DenseDiffusion)")
    lay.add_argument("--layout", type=Path, help="layout JSON: a phrase per region (mask or box)")
    lay.add_argument("--dense-strength", type=float, default=1.0, help="modulation strength (0: off, maps still recorded)")
    lay.add_argument("--dense-preset", choices=["faithful", "joint", "hard"], default="faithful")
    lay.add_argument("--attention-maps", type=Path, help="write per-phrase attention maps and stats.json here")
    run = p.add_argument_group("run and output")
    run.add_argument("--dtype", choices=list(DTYPES), default="float32")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--out", type=Path, default=Path("out.png"), help="PNG path; with --num-images N: name_0.png ...")
    run.add_argument("--save-latents", type=Path, help="also write the final latents (key 'latents') here")
    run.add_argument("--overwrite", action="store_true", help="replace existing output files")
    run.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    args = p.parse_args(argv)
    if args.prompt is not None and args.prompt_embeds is not None:
        p.error("give --prompt or --prompt-embeds, not both")
    if args.prompt is None and args.prompt_embeds is None and args.layout is None:
        p.error("give --prompt (or --prompt-embeds, or a --layout whose JSON has a prompt)")
    if args.num_images < 1:
        p.error("--num-images must be at least 1")
    if not 1 <= args.max_sequence_length <= 512:
        p.error("--max-sequence-length must be between 1 and 512")
    if args.dense_strength < 0:
        p.error("--dense-strength must be >= 0")
    if args.layout and args.prompt_embeds:
        p.error("--layout needs the prompt text (--prompt), not --prompt-embeds")
    return args


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers like 7,8,9, got {text!r}") from None


def image_paths(out: Path, count: int) -> list[Path]:
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def refuse_overwrite(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise SystemExit(f"error: {', '.join(existing)} already exist(s); choose another --out or pass --overwrite")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    try:
        return run(args, say)
    except (ValueError, FileNotFoundError, OSError) as e:  # our loaders' errors say what to do
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, say) -> int:
    from loaders.checkpoint import load_transformer, load_vae, locate, transformer_config, variant
    from loaders.hub import resolve_model
    from loaders.layout import layout_record, save_attention_maps
    from loaders.pipeline import Settings, decode_images, generate_latents
    from loaders.pngmeta import save_png
    from loaders.safetensors import read_tensors
    from samplers import PRESETS
    from safetensors.torch import save_file

    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    source = resolve_model(args.model, need_t5=not args.no_t5, say=say)
    checkpoint = locate(source.diffusion)
    config = transformer_config(checkpoint)
    name = variant(checkpoint, config)
    if source.builtin:
        from loaders.builtin import PRESET as preset, SIZE as default_size
    else:
        preset, default_size = PRESETS[name], 1024
    settings = Settings.from_preset(
        preset, steps=args.steps, cfg=args.cfg, shift=args.shift, seed=args.seed,
        height=args.height or default_size, width=args.width or default_size, slg_layers=args.slg_layers,
        slg_scale=args.slg_scale, slg_start=args.slg_start, slg_stop=args.slg_stop,
    )
    missing = [i for i in settings.slg_layers if i >= config.depth]
    if missing:
        raise ValueError(f"skip-layer guidance blocks {missing} do not exist: this model has blocks 0..{config.depth - 1}; "
                         "choose others with --slg-layers, or --slg-layers '' for none")
    layout = None
    if args.layout:
        from dense import layout_prompt, read_layout

        layout = read_layout(args.layout)
        args.prompt = layout_prompt(layout, args.prompt)
    elif args.attention_maps:
        raise ValueError("--attention-maps needs a --layout (its regions and phrases are what is measured); "
                         "for a baseline without modulation add --dense-strength 0")

    # Check every output path before any heavy work, so nothing the user has is lost.
    embeds = read_tensors(args.prompt_embeds) if args.prompt_embeds is not None else None
    prompts = embeds["prompt_embeds"].shape[0] if embeds is not None and "prompt_embeds" in embeds else 1
    count = prompts * args.num_images
    outputs = image_paths(args.out, count)
    extra = [args.save_latents] if args.save_latents else []
    if args.attention_maps:
        extra.append(args.attention_maps / "stats.json")
    refuse_overwrite(outputs + extra, args.overwrite)

    if source.builtin:
        say("Using the built-in tiny model: its weights are RANDOM, so the image is noise-like by design.")
        say("For real images give the official weights, e.g. --model stabilityai/stable-diffusion-3.5-medium")
    say(f"model {checkpoint.name} ({name}), seed {settings.seed}, {settings.steps} steps, cfg {settings.cfg}, "
        f"shift {settings.shift}, {settings.width}x{settings.height}, {args.dtype} on {device}")

    # Stage 1: conditioning.
    plan = None
    if args.prompt_embeds is not None:
        from loaders.text import conditioning_from_embeds

        positive, negative = conditioning_from_embeds(embeds, settings.guidance.cfg_on, args.num_images,
                                                      where=str(args.prompt_embeds))
    else:
        from loaders.text import encode_prompts, find_text_files

        files = find_text_files(source.diffusion, use_t5=not args.no_t5, tokenizers=args.tokenizers)
        match = None
        if layout is not None:  # every layout problem is found here, before any encoder is loaded
            from loaders.layout import match_layout

            match = match_layout(layout, args.prompt, files, height=settings.height, width=settings.width,
                                 max_sequence_length=args.max_sequence_length)
        encoded = encode_prompts(
            files, [args.prompt], [args.negative_prompt] if settings.guidance.cfg_on else None,
            num_images=args.num_images, max_sequence_length=args.max_sequence_length,
            context_dim=config.context_dim, dtype=dtype, device=device,
            extra_texts=match.texts_to_encode if match is not None and args.dense_strength > 0 else None,
        )
        for note in encoded.truncated:
            say(f"warning: {note}")
        positive, negative = encoded.positive, encoded.negative
        if match is not None:
            from loaders.layout import plan_layout

            positive, plan = plan_layout(
                match, encoded, steps=settings.steps, shift=settings.shift, strength=args.dense_strength,
                preset=args.dense_preset, record_maps=args.attention_maps is not None,
                max_sequence_length=args.max_sequence_length, device=device,
            )

    # Stage 2: the MM-DiT.
    model = load_transformer(checkpoint, dtype=dtype, device=device)
    started = time.perf_counter()
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, desc="sampling", unit="step", file=sys.stderr)
    latents = generate_latents(model, positive, negative, settings, dense=plan,
                               callback=(lambda i, x: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    elapsed = time.perf_counter() - started
    del model  # free the transformer before the VAE comes in
    if args.save_latents:
        args.save_latents.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": latents.float().cpu().contiguous()}, str(args.save_latents))

    # Stage 3: the VAE.
    vae = load_vae(checkpoint, dtype=dtype, device=device)
    images = decode_images(vae, latents).cpu()
    del vae
    record = {
        "model": source.label, "variant": name, "prompt": args.prompt, "negative_prompt": args.negative_prompt,
        "prompt_embeds": str(args.prompt_embeds) if args.prompt_embeds else None, **settings.to_dict(),
        "dtype": args.dtype, "max_sequence_length": args.max_sequence_length, "t5": not args.no_t5,
        "num_images": count, "layout": layout_record(layout) if layout is not None else None,
        "dense_strength": args.dense_strength if layout is not None else None,
        "dense_preset": args.dense_preset if layout is not None else None,
    }
    for i, path in enumerate(outputs):
        save_png(path, images[i].numpy(), {**record, "image_index": i})
    if plan is not None and plan.maps is not None:
        save_attention_maps(args.attention_maps, plan.maps, (settings.height, settings.width))
    say(f"{settings.steps / elapsed:.2f} steps/s; wrote {', '.join(map(str, outputs))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
