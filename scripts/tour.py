#!/usr/bin/env python
"""One prompt through the whole pipeline, stage by stage: `python scripts/tour.py --save docs/tour`.

For every stage it prints the shapes and value ranges of what goes in and out, and the `module:function` that
does the work: tokenization, the CLIP-L / CLIP-G / T5 encoders, the assembled context and pooled vector,
patchify, the timestep embedding, one joint block taken apart (adaLN modulation chunks, the joint attention of
image and text tokens, with one image token's attention drawn), the schedule, every Euler update, and the VAE.

Nothing is restated: each number comes from calling the library's own functions, in the order the pipeline
calls them (`loaders.text.encode_texts`, `loaders.pipeline.generate_latents`, `decode_images`); the joint block
is run through the steps of `JointBlock.forward` (modulation, attention, gated residuals) and checked against
the block's `forward`. The `module:function` names are read off the objects that ran, so they follow the code.

With --save DIR it also writes DIR/tour.md, a page that ties it together, with the pictures beside it: latent
previews after every step (through the fixed linear latent-to-RGB map of `scripts/preview.py`), the
attention picture and the decoded image. Default: the built-in tiny model, trained on a world of coloured shapes,
with one of its captions. --model as in generate.py.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from loaders.memory import release_memory
from loaders.pipeline import DTYPES
from mmdit.errors import InputError

if __package__:  # imported as `scripts.tour` (the tests)
    from .preview import latent_preview
else:  # run as `python scripts/tour.py`: Python looks for imports in this folder first
    from preview import latent_preview

if TYPE_CHECKING:
    from loaders.pipeline import Pipeline, Settings
    from loaders.text import EncodedPrompts
    from loaders.tokenizers import ClipTokenizer, T5Tokenizer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPT = "a red fox sitting in a snowy forest at dawn, soft golden light"
BUILTIN_PROMPT = "a red circle"  # the built-in model knows only shapes, and draws one object reliably


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Code:
    """Where a step is implemented: `module:qualname`, and the source file when it is in this repository."""

    name: str
    file: Path | None


def where(fn: Callable) -> Code:
    """The code that runs when `fn` is called, read off the object (bound methods give their class's function)."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    try:
        source = Path(inspect.getsourcefile(fn) or "").resolve()
    except TypeError:  # built-ins
        source = None
    inside = source is not None and REPO in source.parents and ".venv" not in source.parts
    return Code(f"{fn.__module__}:{fn.__qualname__}", source if inside else None)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    min: float
    max: float
    mean: float
    std: float

    @classmethod
    def of(cls, name: str, t: Tensor) -> TensorInfo:
        f = t.detach().double()
        std = f.std().item() if f.numel() > 1 else 0.0
        return cls(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), f.min().item(), f.max().item(),
                   f.mean().item(), std)


@dataclass(frozen=True)
class Picture:
    file: str  # name inside the --save folder
    caption: str
    pixels: np.ndarray  # (H, W, 3) uint8


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    code_columns: tuple[int, ...] = ()  # shown as `code` on the page (token strings)


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    code: tuple[Code, ...]
    tensors: tuple[TensorInfo, ...]
    notes: tuple[str, ...] = ()
    tables: tuple[Table, ...] = ()
    pictures: tuple[Picture, ...] = ()
    summary: tuple[str, ...] = ()  # tensors named in the page's overview (default: the last two)

    def __post_init__(self) -> None:
        # Two calls may run the same function (both streams' modulation): list it once.
        object.__setattr__(self, "code", tuple(dict.fromkeys(self.code)))

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of the tensor called `name` in this stage (for tests and cross-references)."""
        for t in self.tensors:
            if t.name == name:
                return t.shape
        raise KeyError(f"stage {self.key!r} has no tensor {name!r}; it has {[t.name for t in self.tensors]}")


@dataclass
class Tour:
    header: dict
    stages: list[Stage] = field(default_factory=list)

    def stage(self, key: str) -> Stage:
        return next(s for s in self.stages if s.key == key)


# ------------------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers folder, .safetensors single file, or Hub repo id (default: built-in tiny model)")
    p.add_argument("--tokenizers", type=Path, help="folder holding tokenizer/, tokenizer_2/, tokenizer_3/ (for a single file)")
    p.add_argument("--prompt", help="default: a shapes caption on the built-in model, else a fox in the snow")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, help="default: the model's preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, help="pixels (default 128 on the built-in model, else 1024)")
    p.add_argument("--width", type=int, help="pixels (default 128 on the built-in model, else 1024)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: the model's preset, 256 or 16)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save", type=Path, help="write DIR/tour.md and its pictures here")
    p.add_argument("--quiet", action="store_true", help="no report on stdout (with --save: only the files)")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= 512:
        p.error("--max-sequence-length must be between 1 and 512")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tour = run(args)
    except InputError as e:  # what the user gave is wrong: one line; a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(render_text(tour))
    if args.save:
        page = write_page(tour, args.save, argv_for_page(argv))
        if not args.quiet:
            print(f"\nwrote {page} and {sum(len(s.pictures) for s in tour.stages)} pictures", file=sys.stderr)
    return 0


def argv_for_page(argv: list[str] | None) -> str:
    """The command that made the page (--quiet left out: it does not change the page)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--quiet"]
    return " ".join(["python", "scripts/tour.py", *args])


# ------------------------------------------------------------------------------------------------ the run


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def run(args: argparse.Namespace) -> Tour:
    from loaders import Pipeline
    from loaders.pipeline import Settings

    # Loads nothing yet (keep_loaded off): each stage loads its component, and frees it before the next.
    pipe = Pipeline.load(args.model, dtype=DTYPES[args.dtype], device=args.device, tokenizers=args.tokenizers)
    preset, size = pipe.preset, pipe.defaults.size
    # Not pipe.settings, which also insists that the preset's skip-layer blocks exist (a tiny --model may lack them).
    settings = Settings.from_preset(preset, steps=args.steps, seed=args.seed, height=args.height or size,
                                    width=args.width or size)
    args.prompt = args.prompt or (BUILTIN_PROMPT if pipe.source.builtin else DEFAULT_PROMPT)
    args.max_sequence_length = args.max_sequence_length or preset.max_sequence_length
    negative = args.negative_prompt if settings.guidance.cfg_on else None
    tour = Tour({
        "model": pipe.source.label, "variant": pipe.defaults.variant, "prompt": args.prompt,
        "negative_prompt": negative, "dtype": args.dtype, "device": str(pipe.device), **settings.to_dict(),
        "max_sequence_length": args.max_sequence_length,
    })
    with torch.inference_mode():
        text = text_stages(tour, pipe, args.prompt, negative, args.max_sequence_length)
        latents = transformer_stages(tour, pipe, settings, text)
        vae_stage(tour, pipe, latents)
    return tour


# ------------------------------------------------------------------------------------------------ text


def _token_rows(tokenizer: ClipTokenizer | T5Tokenizer, ids: list[int], pad_id: int) -> tuple[tuple[str, ...], ...]:
    """Table rows (position, id, token) up to the trailing run of padding ids, one of them, then a count.

    (CLIP-L pads with its end-of-text id, so the one shown is the real end-of-text token.)
    """
    end = len(ids)
    while end > 0 and ids[end - 1] == pad_id:
        end -= 1
    shown = min(end + 1, len(ids))
    rows = [(str(i), str(ids[i]), tokenizer.id_to_token(ids[i])) for i in range(shown)]
    if shown < len(ids):
        rows.append(("…", f"{len(ids) - shown} more × {pad_id}", "(padding)"))
    return tuple(rows)


def text_stages(tour: Tour, pipe: Pipeline, prompt: str, negative: str | None, length: int) -> EncodedPrompts:
    """Tokenization, the three encoders and the assembly, run by the library's `encode_prompts`; the stages
    show its intermediate values (each encoder's own outputs) and the configurations its loaders inferred."""
    from loaders.text import encode_prompts, encode_texts
    from loaders.text_encoders import clip_config, load_clip, load_t5, t5_config
    from loaders.tokenizers import ClipTokenizer, T5Tokenizer
    from mmdit.clip import CLIPTextModel
    from mmdit.conditioning import assemble, repeat_for_images
    from mmdit.t5 import T5Encoder

    files, config = pipe.files, pipe.config
    encoded = encode_prompts(files, [prompt], [negative] if negative is not None else None, max_sequence_length=length,
                             context_dim=config.context_dim, dtype=pipe.dtype, device=pipe.device)
    tok_l, tok_t5 = encoded.tokens.clip_tokenizer, encoded.tokens.t5_tokenizer
    tok_g = ClipTokenizer.from_folder(files.tokenizer_2)
    clip_ids, t5_ids = encoded.tokens.clip, encoded.tokens.t5
    n_clip = len(clip_ids)  # the CLIP length the pipeline padded to (the tokenizers' model_max_length, 77)
    g_ids = tok_g.encode([prompt], n_clip).ids[0].tolist()

    # 1. Tokenization
    eot = clip_ids.index(max(clip_ids))  # argmax = the first end-of-text token: where CLIP pools
    words_t5 = len(t5_ids)
    while words_t5 > 0 and t5_ids[words_t5 - 1] == tok_t5.pad_id:
        words_t5 -= 1
    differs = [i for i, (a, b) in enumerate(zip(clip_ids, g_ids)) if a != b]
    tour.stages.append(Stage(
        "tokenize", "Tokenization",
        (where(tok_l.encode), where(ClipTokenizer.from_folder), where(T5Tokenizer.from_folder)),
        tuple(TensorInfo.of(name, torch.tensor([ids])) for name, ids in
              (("CLIP-L ids", clip_ids), ("CLIP-G ids", g_ids), ("T5 ids", t5_ids))),
        (f"The prompt becomes {eot + 1} CLIP tokens (start and end-of-text included), padded to {n_clip}; CLIP-L pads "
         f"with id {tok_l.pad_id}, CLIP-G with id {tok_g.pad_id}, so the two id rows differ at {len(differs)} "
         f"padding positions and agree on the words.",
         f"T5 (SentencePiece, ▁ marks the start of a word) gives {words_t5} tokens ending in `</s>` (id "
         f"{t5_ids[words_t5 - 1]}), padded with {tok_t5.pad_id} to the {length} tokens the pipeline always uses.",
         f"With classifier-free guidance on, the negative prompt {negative!r} is tokenized the same way, "
         "in a call of its own." if negative is not None else "CFG is off: no negative prompt is encoded."),
        (Table(("position", "CLIP id", "CLIP token"), _token_rows(tok_l, clip_ids, tok_l.pad_id), (2,)),
         Table(("position", "T5 id", "T5 token"), _token_rows(tok_t5, t5_ids, tok_t5.pad_id), (2,))),
        summary=("CLIP-L ids", "CLIP-G ids", "T5 ids"),
    ))

    # 2. The three encoders (encode_texts loads them one at a time, each group in its own call).
    first = encoded.encoders[0]
    for label, output, where_file, activation in (("CLIP-L", first.clip_l, files.clip_l, "quick_gelu"),
                                                  ("CLIP-G", first.clip_g, files.clip_g, "gelu"),
                                                  ("T5", first.t5, files.t5, None)):
        if activation is None:
            cfg = t5_config(where_file.path, prefix=where_file.prefix)
            tensors = (TensorInfo.of("last_hidden_state", output),)
            notes = (f"{cfg.num_layers} blocks, {cfg.num_heads} heads of {cfg.d_kv}, width {cfg.d_model}: every "
                     f"one of the {length} tokens (padding too) gets a {cfg.d_model}-wide vector; no attention mask.",)
            code = (where(load_t5), where(T5Encoder.forward), where(encode_texts))
        else:
            cfg = clip_config(where_file.path, activation=activation, prefix=where_file.prefix)
            tensors = (TensorInfo.of("penultimate", output.penultimate), TensorInfo.of("pooled", output.pooled))
            notes = (f"{cfg.num_layers} layers, width {cfg.width}, {cfg.num_heads} head(s), {activation}, causal "
                     f"attention. SD3 keeps the sequence entering the last layer (penultimate, not final-normed) and "
                     f"the final-normed state at the end-of-text token (position {eot}), projected: the pooled "
                     "vector.",)
            code = (where(load_clip), where(CLIPTextModel.forward), where(encode_texts))
        tour.stages.append(Stage(label.lower(), label, code, tensors, notes))

    # 3. Assembly into the conditioning.
    positive, negative_c = encoded.positive, encoded.negative
    wl, wg = first.clip_l.penultimate.shape[-1], first.clip_g.penultimate.shape[-1]
    zeros = max(config.context_dim - wl - wg, 0)
    tensors = [TensorInfo.of("context", positive.context), TensorInfo.of("pooled", positive.pooled)]
    if negative_c is not None:
        tensors += [TensorInfo.of("negative context", negative_c.context),
                    TensorInfo.of("negative pooled", negative_c.pooled)]
    tour.stages.append(Stage(
        "conditioning", "Context and pooled vector", (where(assemble), where(repeat_for_images)), tuple(tensors),
        (f"Tokens 0-{n_clip - 1} of the context are CLIP: channels 0-{wl - 1} CLIP-L, {wl}-{wl + wg - 1} CLIP-G"
         + (f", {zeros} zero channels up to {config.context_dim}" if zeros else "")
         + (f", cropped to {config.context_dim}" if wl + wg > config.context_dim else "")
         + f"; tokens {n_clip}-{n_clip - 1 + length} "
         f"are T5. pooled = CLIP-L pooled ‖ CLIP-G pooled ({wl} + {wg} = {positive.pooled.shape[-1]}).",),
        summary=("context", "pooled"),
    ))
    return encoded


# ------------------------------------------------------------------------------------------------ MM-DiT


def viridis(values: np.ndarray) -> np.ndarray:
    """[0, 1] values -> uint8 RGB through a five-anchor approximation of the viridis colour map."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
    x = np.clip(values, 0, 1) * (len(anchors) - 1)
    i = np.minimum(x.astype(int), len(anchors) - 2)
    frac = (x - i)[..., None]
    return (anchors[i] * (1 - frac) + anchors[i + 1] * frac).round().astype(np.uint8)


def attention_picture(image_part: np.ndarray, clip_part: np.ndarray, t5_part: np.ndarray,
                      query: tuple[int, int]) -> np.ndarray:
    """One query's attention: the image keys as a grid (query cell outlined), then the CLIP and T5 keys as strips.

    Each part has its own colour scale (its largest weight is yellow), so the layout within each part shows.
    """
    from PIL import Image, ImageDraw

    gh, gw = image_part.shape
    cell = max(1, 256 // max(gh, gw))
    width = max(gw * cell, 512)
    grid = viridis(image_part / max(image_part.max(), 1e-12)).repeat(cell, 0).repeat(cell, 1)
    strip_h, label_h, gap = 24, 14, 6
    height = gh * cell + 2 * (label_h + strip_h + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    left = (width - gw * cell) // 2
    canvas.paste(Image.fromarray(grid), (left, 0))
    draw = ImageDraw.Draw(canvas)
    r, c = query
    draw.rectangle([left + c * cell, r * cell, left + (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(255, 0, 0))
    y = gh * cell + gap
    for label, part in (("CLIP tokens", clip_part), ("T5 tokens", t5_part)):
        draw.text((2, y), f"{label} 0..{len(part) - 1}", fill=(0, 0, 0))
        y += label_h
        cols = viridis(part / max(part.max(), 1e-12))  # (n, 3)
        index = (np.arange(width) * len(part) // width).clip(0, len(part) - 1)
        canvas.paste(Image.fromarray(np.repeat(cols[index][None], strip_h, axis=0)), (0, y))
        y += strip_h + gap
    return np.asarray(canvas)


def transformer_stages(tour: Tour, pipe: Pipeline, settings: Settings, text: EncodedPrompts) -> Tensor:
    from loaders.pipeline import generate_latents
    from mmdit.attention import attention, merge_heads
    from mmdit.block import clamp_fp16, gated_residual, layer_norm, modulate
    from mmdit.embed import cropped_pos_embed, timestep_frequencies
    from samplers import cfg as cfg_fn
    from samplers import euler_step, initial_noise, sample, shifted, sigmas, slg, slg_active, timesteps

    model, dtype, device = pipe.transformer(), pipe.dtype, pipe.device
    config = model.config
    positive = text.positive
    context = positive.context.to(dtype)
    pooled = positive.pooled.to(dtype)
    noise = initial_noise(1, settings.height, settings.width, settings.seed, channels=config.in_channels, dtype=dtype,
                          device=device)
    schedule = sigmas(settings.steps, settings.shift)
    times = timesteps(schedule)
    t = times[:1].to(device)  # the first model call: σ = 1, t = 1000

    # 4. Patchify.
    p = config.patch_size
    gh, gw = noise.shape[-2] // p, noise.shape[-1] // p
    patches = model.x_embedder(noise)  # (1, N, D)
    pos = cropped_pos_embed(model.pos_embed, gh, gw)
    tokens = (patches + pos).to(patches.dtype)  # as MMDiT.forward adds them
    m = int(model.pos_embed.shape[1] ** 0.5)
    tour.stages.append(Stage(
        "patchify", "Noise and patchify",
        (where(initial_noise), where(model.x_embedder.forward), where(cropped_pos_embed)),
        (TensorInfo.of("noise latents", noise), TensorInfo.of("patch tokens", patches),
         TensorInfo.of("position table", model.pos_embed), TensorInfo.of("cropped positions", pos),
         TensorInfo.of("image tokens", tokens)),
        (f"Seed {settings.seed}: noise drawn on the CPU in float32. A {p}x{p} stride-{p} convolution turns the "
         f"{noise.shape[-2]}x{noise.shape[-1]} latent into a {gh}x{gw} grid of {gh * gw} tokens of width "
         f"{config.dim}; the centre {gh}x{gw} window of the stored {m}x{m} sin-cos table is added.",),
        pictures=(Picture("noise.png", "the initial noise through the latent-to-RGB map",
                          latent_preview(noise, _preview_scale(noise))[0].numpy()),),
        summary=("noise latents", "image tokens"),
    ))

    # 5. Timestep and pooled embedding -> the conditioning vector; text tokens to the model width.
    freqs = timestep_frequencies(t)
    t_emb = model.t_embedder(freqs.to(pooled.dtype))
    y_emb = model.y_embedder(pooled)
    vec = t_emb + y_emb
    c = model.context_embedder(context)
    tour.stages.append(Stage(
        "timestep", "Timestep and pooled embedding",
        (where(timestep_frequencies), where(model.t_embedder.forward), where(model.context_embedder.forward),
         where(model.forward)),
        (TensorInfo.of("t", t), TensorInfo.of("frequencies", freqs), TensorInfo.of("t embedding", t_emb),
         TensorInfo.of("pooled embedding", y_emb), TensorInfo.of("vec", vec), TensorInfo.of("text tokens", c)),
        (f"t = σ·1000 = {_fmt(t.item())} becomes {freqs.shape[-1]} sinusoid features (cos first), then an MLP; the "
         f"pooled text vector gets its own MLP; their sum `vec` ({config.dim} wide) drives every adaLN modulation. "
         f"The context is projected from {context.shape[-1]} to {config.dim} channels by `context_embedder`.",),
    ))

    # 6-7. Joint block 0 through the steps of its forward.
    block = model.joint_blocks[0]
    x_block, context_block = block.x_block, block.context_block
    x_mod, c_mod = x_block.modulation(vec), context_block.modulation(vec)
    rows = []
    for stream, mods in (("image", x_mod), ("text", c_mod)):
        for sub, mod in (("attention", mods.attn), ("MLP", mods.mlp), ("image-only attention", mods.attn2)):
            for part in ("shift", "scale", "gate"):
                v = None if mod is None else getattr(mod, part)
                if v is not None:
                    rows.append((stream, sub, part, str(tuple(v.shape)), _fmt(v.min().item()),
                                 _fmt(v.max().item())))
    pre_only = context_block.pre_only  # a one-block model: nothing reads the text rows
    if pre_only:
        rows.append(("text", "attention", "shift, scale", "(last block: no gates, no MLP)", "", ""))
    x_normed = layer_norm(tokens)
    x_qkv = x_block.attn.qkv_heads(modulate(x_normed, x_mod.attn))
    c_in = modulate(layer_norm(c), c_mod.attn)
    c_qkv = (None, *context_block.attn.kv_heads(c_in)) if pre_only else context_block.attn.qkv_heads(c_in)
    x_chunks = block.x_block.adaLN_modulation[1].out_features // config.dim
    c_chunks = block.context_block.adaLN_modulation[1].out_features // config.dim
    tour.stages.append(Stage(
        "modulation", "Joint block 0: adaLN modulation",
        (where(x_block.modulation), where(layer_norm), where(modulate)),
        (TensorInfo.of("image adaLN output", x_block.adaLN_modulation(vec)),
         TensorInfo.of("text adaLN output", context_block.adaLN_modulation(vec)),
         TensorInfo.of("image q", x_qkv[0]), *(() if pre_only else (TensorInfo.of("text q", c_qkv[0]),))),
        (f"SiLU(vec) -> Linear gives {x_chunks} vectors of width {config.dim} for the image stream"
         + (" (the third triple feeds SD3.5-Medium's extra image-only attention)" if x_chunks == 9 else "")
         + f" and {c_chunks} for the text stream. Each sub-layer sees LayerNorm(x)·(1 + scale) + shift and its "
         "output is multiplied by gate before it joins the residual.",
         f"Then each stream projects its tokens to q, k, v: {config.num_heads} heads of {config.head_dim}"
         + (", with RMS-normalised q and k per head." if config.qk_norm else ".")),
        (Table(("stream", "sub-layer", "vector", "shape", "min", "max"), tuple(rows)),),
        summary=("image adaLN output", "text adaLN output"),
    ))

    n_img = tokens.shape[1]
    q = x_qkv[0] if pre_only else torch.cat([x_qkv[0], c_qkv[0]], dim=2)  # (1, H, N+S, Dh): image first
    k, v = (torch.cat([a, b], dim=2) for a, b in zip(x_qkv[1:], c_qkv[1:]))
    out = attention(q, k, v)
    out_x, out_c = merge_heads(out[:, :, :n_img]), merge_heads(out[:, :, n_img:])
    # The picture: one image token's attention weights, recomputed explicitly from the same q and k.
    qi = (gh // 2) * gw + gw // 2
    scores = (q[0, :, qi, None].float() @ k[0].float().transpose(-1, -2)).squeeze(1) * q.shape[-1] ** -0.5  # (H, N+S)
    probs = scores.softmax(-1)
    recomputed = (probs[:, None] @ v[0].float()).squeeze(1)  # (H, Dh)
    check = (recomputed - out[0, :, qi].float()).abs().max().item()
    mean = probs.mean(0).cpu().numpy()  # over heads
    n_clip = len(text.tokens.clip)  # the CLIP part of the text tokens (77 in every released model)
    img, clip_part, t5_part = mean[:n_img], mean[n_img:n_img + n_clip], mean[n_img + n_clip:]
    top = np.argsort(-mean)[:8]
    top_rows = []
    for j in top:
        if j < n_img:
            kind, what = "image", f"cell ({j // gw}, {j % gw})"
        elif j < n_img + n_clip:
            token = text.tokens.clip_tokenizer.id_to_token(text.tokens.clip[j - n_img])
            kind, what = "CLIP", f"`{_md(token)}` (position {j - n_img})"
        else:
            token = text.tokens.t5_tokenizer.id_to_token(text.tokens.t5[j - n_img - n_clip])
            kind, what = "T5", f"`{_md(token)}` (position {j - n_img - n_clip})"
        top_rows.append((str(int(j)), kind, what, f"{mean[j]:.4f}"))
    picture = attention_picture(img.reshape(gh, gw), clip_part, t5_part, (gh // 2, gw // 2))
    tour.stages.append(Stage(
        "attention", "Joint block 0: attention over image and text tokens",
        (where(x_block.attn.qkv_heads), where(attention), where(merge_heads)),
        (TensorInfo.of("q", q), TensorInfo.of("k", k), TensorInfo.of("v", v), TensorInfo.of("output", out),
         TensorInfo.of("image rows", out_x), *(() if pre_only else (TensorInfo.of("text rows", out_c),))),
        (f"One softmax attention over all {q.shape[2]} tokens: {n_img} image tokens first, then {c.shape[1]} text "
         f"tokens, so image and text read each other in both directions.",
         f"Drawn: image token {qi} (grid cell ({gh // 2}, {gw // 2}), outlined), weights averaged over the "
         f"{q.shape[1]} heads. Its attention goes {img.sum():.1%} to image tokens, {clip_part.sum():.1%} to CLIP "
         f"tokens and {t5_part.sum():.1%} to T5 tokens. (Recomputing softmax(q kᵀ/√{q.shape[-1]}) v for this "
         f"token reproduces the kernel's output to {check:.1e}.)"),
        (Table(("key", "kind", "token", "weight"), tuple(top_rows)),),
        (Picture("attention.png", f"attention of image token {qi} (red outline) over image, CLIP and T5 keys",
                 picture),),
        summary=("q", "output"),
    ))

    x1 = clamp_fp16(gated_residual(tokens, x_mod.attn.gate, x_block.attn.proj(out_x)))
    if x_block.attn2 is not None:
        x1 = clamp_fp16(gated_residual(x1, x_mod.attn2.gate, x_block.attn2(modulate(x_normed, x_mod.attn2))))
    x1 = clamp_fp16(gated_residual(x1, x_mod.mlp.gate, x_block.mlp(modulate(layer_norm(x1), x_mod.mlp))))
    c1 = None
    if not pre_only:
        c1 = clamp_fp16(gated_residual(c, c_mod.attn.gate, context_block.attn.proj(out_c)))
        c1 = clamp_fp16(gated_residual(c1, c_mod.mlp.gate, context_block.mlp(modulate(layer_norm(c1), c_mod.mlp))))
    x_ref, c_ref = block(tokens, c, vec)
    diff = (x1 - x_ref).abs().max().item()
    if c1 is not None:
        diff = max(diff, (c1 - c_ref).abs().max().item())
    tensors = [TensorInfo.of("image tokens out", x1)]
    if c1 is not None:
        tensors.append(TensorInfo.of("text tokens out", c1))
    tour.stages.append(Stage(
        "block", "Joint block 0: after attention", (where(gated_residual), where(block.forward)),
        tuple(tensors),
        ("Each stream: x + gate·proj(its rows of the attention output)"
         + (", then x + gate·attn2(...) (the image-only attention)" if block.x_block.attn2 is not None else "")
         + ", then x + gate·MLP(modulated LayerNorm(x)).",
         f"The sub-steps above, run by hand, give the block's own forward to max |Δ| = {diff:.1e}."),
    ))

    # The rest of the network, through the real blocks, and the model's own forward for the velocity.
    x, cc = x1, c1
    for later in model.joint_blocks[1:]:
        x, cc = later(x, cc, vec)
    final = model.final_layer(x, vec)
    velocity = model(noise, t, context, pooled)
    tour.stages.append(Stage(
        "output", "The other blocks, final layer, unpatchify",
        (where(model.joint_blocks[-1].forward), where(model.final_layer.forward), where(model.forward)),
        (TensorInfo.of("image tokens after the last block", x), TensorInfo.of("final layer", final),
         TensorInfo.of("velocity", velocity)),
        (f"{config.depth - 1} more joint blocks (dual attention in blocks "
         f"{list(config.dual_attention_layers) or 'none'}; the last block's text stream is pre-only), then adaLN "
         f"+ a linear map to {p}·{p}·{config.out_channels} values per token, folded back into the latent grid: "
         f"the velocity v = noise - x0.",),
    ))

    # 8. The schedule.
    sched_rows = []
    batch = "1 × [negative, positive]" if settings.guidance.cfg_on else "1 × [positive]"
    for i in range(settings.steps):
        active = settings.guidance.slg_on and slg_active(i, settings.steps, settings.slg_start, settings.slg_stop)
        passes = f"{batch} + 1 skip-layer × [positive]" if active else batch
        sched_rows.append((str(i), f"{schedule[i].item():.6f}", f"{times[i].item():.4f}",
                           f"{schedule[i + 1].item():.6f}", passes))
    tour.stages.append(Stage(
        "schedule", "The schedule", (where(sigmas), where(timesteps), where(shifted)),
        (TensorInfo.of("sigmas", schedule), TensorInfo.of("timesteps", times)),
        (f"{settings.steps} steps from σ = 1 (pure noise) to σ = 0, spaced evenly in t and then shifted with "
         f"shift = {settings.shift}, which spends more steps at high noise. Each step evaluates the model on the "
         f"batch [negative, positive] (CFG scale {settings.cfg})"
         + (f"; skip-layer guidance (blocks {list(settings.slg_layers)}) adds a pass inside its window."
            if settings.slg_layers else ".") if settings.guidance.cfg_on else
         f"{settings.steps} steps from σ = 1 to σ = 0, shift {settings.shift}; CFG is off, one model pass per "
         "step.",),
        (Table(("step", "σ", "t = σ·1000", "next σ", "model passes"), tuple(sched_rows)),),
    ))

    # 9. Sampling: the real loop, watched through its callback.
    seen: list[Tensor] = [noise.float().cpu()]
    latents = generate_latents(model, positive, text.negative, settings,
                               callback=lambda i, xi: seen.append(xi.float().cpu()))
    scale = _preview_scale(noise)
    step_rows, pictures = [], []
    for i in range(settings.steps):
        s0, s1 = schedule[i].item(), schedule[i + 1].item()
        before, after = seen[i], seen[i + 1]
        v_eff = (after - before) / (s1 - s0)  # the guided velocity this step used
        x0 = before - s0 * v_eff  # where the straight line from here lands at σ = 0
        gap = np.full((after.shape[-2] * scale, 4, 3), 255, np.uint8)
        panel = np.concatenate([latent_preview(after, scale)[0].numpy(), gap, latent_preview(x0, scale)[0].numpy()],
                               axis=1)
        file = f"step_{i + 1:02d}.png"
        pictures.append(Picture(file, f"after step {i + 1}: the latent (left) and its x0 estimate (right)", panel))
        step_rows.append((str(i + 1), f"{s0:.4f} → {s1:.4f}", _fmt(after.std().item()),
                          _fmt((after - before).abs().max().item()), _fmt(v_eff.std().item()),
                          f"![step {i + 1}]({file})"))
    del model
    release_memory()
    tour.stages.append(Stage(
        "sampling", "Sampling: the Euler updates",
        (where(generate_latents), where(sample), where(cfg_fn), where(slg), where(euler_step)),
        (TensorInfo.of("initial latents", noise), TensorInfo.of("final latents", latents)),
        ("Per step: the model's velocities for [negative, positive] are combined by CFG (v_u + g·(v_c - v_u))"
         + (", skip-layer guidance adds (v_c - v_skip)·s inside its window" if settings.slg_layers else "")
         + ", and the latent moves along the line: x ← x + (σ_next - σ)·v, in float32.",
         "The table's velocity is (x_after - x_before)/(σ_next - σ), recovered from the latents the loop hands its "
         "callback; the x0 estimate x - σ·v is where the current line ends. Previews go through the fixed "
         "latent-to-RGB map (scripts/preview.py)."),
        (Table(("step", "σ", "latent std", "max |Δx|", "velocity std", "latent and x0 estimate"), tuple(step_rows)),),
        tuple(pictures),
    ))
    return latents


def _preview_scale(latents: Tensor) -> int:
    return max(1, 128 // min(latents.shape[-2:]))


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


# ------------------------------------------------------------------------------------------------ VAE


def vae_stage(tour: Tour, pipe: Pipeline, latents: Tensor) -> None:
    from loaders.pipeline import decode_images
    from mmdit.vae import decode, to_uint8

    vae = pipe.autoencoder()
    cfg = vae.config
    image = decode(vae, latents)  # (B, 3, H, W), about [-1, 1]
    pixels = to_uint8(image)  # (B, H, W, 3)
    del vae
    release_memory()
    tour.stages.append(Stage(
        "vae", "VAE decode", (where(decode_images), where(decode), where(to_uint8)),
        (TensorInfo.of("latents", latents),
         TensorInfo.of("decoder input z", latents / cfg.scaling_factor + cfg.shift_factor),
         TensorInfo.of("decoded", image), TensorInfo.of("image", pixels)),
        (f"z = latents / {cfg.scaling_factor} + {cfg.shift_factor}, then the decoder: {len(cfg.widths)} levels "
         f"(widths {list(cfg.widths)}), {cfg.downsampling}x upsampling. [-1, 1] -> [0, 255], rounded.",),
        pictures=(Picture("image.png", "the decoded image", pixels[0].cpu().numpy()),),
    ))


# ------------------------------------------------------------------------------------------------ output


def render_text(tour: Tour) -> str:
    h = tour.header
    lines = [f"Tour of {h['model']} ({h['variant']}): {h['prompt']!r}, {h['width']}x{h['height']}, {h['steps']} steps, "
             f"cfg {h['cfg']}, seed {h['seed']}, {h['dtype']} on {h['device']}"]
    for n, s in enumerate(tour.stages, 1):
        lines += ["", f"{n}. {s.title}", "   code: " + ", ".join(c.name for c in s.code)]
        width = max(len(t.name) for t in s.tensors)
        for t in s.tensors:
            lines.append(f"   {t.name:<{width}}  {str(t.shape):<22} {t.dtype:<8} "
                         f"[{_fmt(t.min)}, {_fmt(t.max)}]  mean {_fmt(t.mean)} std {_fmt(t.std)}")
        lines += [f"   {note}" for note in s.notes]
        for table in s.tables:
            keep = [i for i, cell in enumerate(table.rows[0]) if not cell.startswith("![")] if table.rows else []
            lines.append("   " + " | ".join(table.header[i] for i in keep))
            lines += ["   " + " | ".join(r[i] for i in keep) for r in table.rows]
    return "\n".join(lines)


def write_page(tour: Tour, folder: Path, command: str) -> Path:
    """DIR/tour.md and every picture beside it; returns the page's path."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for s in tour.stages:
        for pic in s.pictures:
            Image.fromarray(pic.pixels).save(folder / pic.file)
    h = tour.header

    def link(code: Code) -> str:
        if code.file is None:
            return f"`{code.name}`"
        return f"[`{code.name}`]({Path(os.path.relpath(code.file, folder.resolve())).as_posix()})"

    lines = [
        "# A tour of the SD3 pipeline",
        "",
        f"One prompt through `{h['model']}` ({h['variant']}), stage by stage. Every shape and number on this page "
        "was measured by running the code named under each stage; regenerate it with",
        "",
        f"    {command}",
        "",
        f"Prompt: *{h['prompt']}*"
        + (f"; negative prompt: *{h['negative_prompt']!r}*" if h["negative_prompt"] is not None else "")
        + f". {h['width']}x{h['height']} pixels, {h['steps']} steps, CFG {h['cfg']}, shift {h['shift']}, "
        f"seed {h['seed']}, {h['dtype']} on {h['device']}."
        + (" The built-in model was trained on a world of coloured shapes (`scripts/builtin/train.py`), so "
           "that is all it draws." if h["model"] == "builtin" else ""),
        "",
        "| # | stage | main outputs | code |",
        "|---|---|---|---|",
    ]
    for n, s in enumerate(tour.stages, 1):
        shown = [t for t in s.tensors if t.name in s.summary] if s.summary else list(s.tensors[-2:])
        outs = ", ".join(f"{t.name} {t.shape}" for t in shown)
        lines.append(f"| {n} | [{s.title}](#{_anchor(n, s.title)}) | {outs} | `{s.code[0].name}` |")
    for n, s in enumerate(tour.stages, 1):
        lines += ["", f"## {n}. {s.title}", "", "Code: " + ", ".join(link(c) for c in s.code), ""]
        lines += ["| tensor | shape | dtype | min | max | mean | std |", "|---|---|---|---:|---:|---:|---:|"]
        for t in s.tensors:
            lines.append(f"| {t.name} | {t.shape} | {t.dtype} | {_fmt(t.min)} | {_fmt(t.max)} | "
                         f"{_fmt(t.mean)} | {_fmt(t.std)} |")
        for note in s.notes:
            lines += ["", note]
        for table in s.tables:
            lines += ["", "| " + " | ".join(_md(h) for h in table.header) + " |", "|" + "---|" * len(table.header)]
            lines += ["| " + " | ".join(_cell(c, i in table.code_columns) for i, c in enumerate(r)) + " |"
                      for r in table.rows]
        if s.key != "sampling":  # the sampling stage's table shows its own pictures
            for pic in s.pictures:
                lines += ["", f"![{pic.caption}]({pic.file})", "", f"*{pic.caption}*"]
    page = folder / "tour.md"
    page.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return page


def _cell(text: str, code: bool = False) -> str:
    if code and not text.startswith("("):
        return f"`{_md(text)}`"
    return text if text.startswith("![") or "`" in text else _md(text)


def _anchor(n: int, title: str) -> str:
    """GitHub's heading anchor for '## n. title'."""
    keep = "".join(ch for ch in f"{n}. {title}".lower() if ch.isalnum() or ch in " -_")
    return keep.replace(" ", "-")


if __name__ == "__main__":
    raise SystemExit(main())
