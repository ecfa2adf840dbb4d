"""Prompts -> conditioning: finding the tokenizers and text encoders of a model, and running them.

diffusers' `StableDiffusion3Pipeline.encode_prompt` (docs/numerics.md §7) is reproduced here from
its parts: tokenizers (`loaders.tokenizers`), encoders (`mmdit.clip`, `mmdit.t5`) and the assembly
(`mmdit.conditioning.assemble`). Precomputed embeddings (`--prompt-embeds`) also come in here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmdit.clip import CLIPOutput
from mmdit.conditioning import CLIP_TOKENS, Conditioning, assemble, repeat_for_images
from mmdit.errors import InputError, MissingInputError

from .memory import MemoryLog, measure, release_memory
from .lora import LoRAFile, merge_loras
from .safetensors import read_shapes
from .text_encoders import CLIP_G_PREFIX, CLIP_L_PREFIX, T5_PREFIX, load_clip, load_t5
from .tokenizers import ClipTokenizer, T5Tokenizer, TokenizerError

EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
NEGATIVE_KEYS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")


def conditioning_from_embeds(
    embeds: dict[str, Tensor], cfg_on: bool, num_images: int = 1, *, where: str = "the embeddings file"
) -> tuple[Conditioning, Conditioning | None]:
    """Positive (and, with CFG, negative) conditioning from a `--prompt-embeds` file's tensors.

    Each prompt row is repeated `num_images` times. (diffusers, given precomputed embeddings, does not repeat
    them and fails when num_images_per_prompt > 1; we repeat, which is what generating N images means.)
    """
    needed = EMBED_KEYS + (NEGATIVE_KEYS if cfg_on else ())
    missing = [k for k in needed if k not in embeds]
    if missing:
        hint = " (classifier-free guidance is on: add the negative embeddings, or use --cfg 1)" if cfg_on else ""
        raise InputError(f"{where} lacks {missing}; it has {sorted(embeds)}{hint}")

    def make(context_key: str, pooled_key: str) -> Conditioning:
        context, pooled = embeds[context_key], embeds[pooled_key]
        if context.ndim != 3 or pooled.ndim != 2 or context.shape[0] != pooled.shape[0]:
            raise InputError(
                f"{where}: {context_key} must be (B, L, D) and {pooled_key} (B, P) with the same B; "
                f"got {tuple(context.shape)} and {tuple(pooled.shape)}"
            )
        return repeat_for_images(Conditioning(context, pooled), num_images)

    positive = make(*EMBED_KEYS)
    negative = make(*NEGATIVE_KEYS) if cfg_on else None
    if negative is not None and (
        negative.context.shape != positive.context.shape or negative.pooled.shape != positive.pooled.shape
    ):
        raise InputError(f"{where}: the negative embeddings' shapes differ from the positive ones")
    return positive, negative


@dataclass(frozen=True)
class EncoderFile:
    """One text encoder's weights: a diffusers component folder, or a file (with a key prefix when combined)."""

    path: Path
    prefix: str = ""


@dataclass(frozen=True)
class TextFiles:
    """Where a model's tokenizers and text encoders are."""

    clip_l: EncoderFile
    clip_g: EncoderFile
    t5: EncoderFile | None
    tokenizer: Path
    tokenizer_2: Path
    tokenizer_3: Path | None


def _tokenizer_root(default: Path, override: Path | None, model: Path) -> Path:
    root = override if override is not None else default
    missing = [n for n in ("tokenizer", "tokenizer_2") if not (root / n).is_dir()]
    if missing:
        raise MissingInputError(
            f"no {' / '.join(missing)} folder in {root} for {model}; pass --tokenizers DIR, a folder holding "
            "tokenizer/, tokenizer_2/ and tokenizer_3/ (the official repos ship them beside the weights)"
        )
    return root


def find_text_files(model: Path, *, use_t5: bool = True, tokenizers: Path | None = None) -> TextFiles:
    """The text side of a diffusers folder, or of a single file (`text_encoders/` beside it, or inside it)."""
    model = Path(model)
    if model.is_dir():
        root = _tokenizer_root(model, tokenizers, model)
        missing = [n for n in ("text_encoder", "text_encoder_2") + (("text_encoder_3",) if use_t5 else ())
                   if not (model / n).is_dir()]
        if missing:
            raise MissingInputError(f"{model} lacks {missing}; download them too" +
                                    (" (or pass --no-t5 to run without T5)" if missing == ["text_encoder_3"] else ""))
        t5 = EncoderFile(model / "text_encoder_3") if use_t5 else None
        return TextFiles(EncoderFile(model / "text_encoder"), EncoderFile(model / "text_encoder_2"), t5,
                         root / "tokenizer", root / "tokenizer_2", root / "tokenizer_3" if use_t5 else None)
    root = _tokenizer_root(model.parent, tokenizers, model)
    if read_shapes(model, CLIP_L_PREFIX):  # an "incl_clips" single file: encoders inside it
        t5 = EncoderFile(model, T5_PREFIX) if use_t5 and read_shapes(model, T5_PREFIX) else None
        clip_l, clip_g = EncoderFile(model, CLIP_L_PREFIX), EncoderFile(model, CLIP_G_PREFIX)
    else:
        folder = model.parent / "text_encoders"
        clip_l, clip_g = EncoderFile(folder / "clip_l.safetensors"), EncoderFile(folder / "clip_g.safetensors")
        t5 = None
        if use_t5:
            names = ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors")
            t5 = next((EncoderFile(folder / n) for n in names if (folder / n).is_file()),
                      EncoderFile(folder / "t5xxl_fp16.safetensors"))
    missing = [str(f.path) for f in (clip_l, clip_g, t5) if f is not None and not f.path.is_file()]
    if missing:
        raise MissingInputError(
            f"text encoders for {model.name} not found: {missing}. Download text_encoders/ from the same repo "
            "into the folder beside the model file" + (", or pass --no-t5 to run without T5" if use_t5 else "")
        )
    if use_t5 and t5 is None:
        raise MissingInputError(f"{model} carries CLIP but no T5; pass --no-t5")
    return TextFiles(clip_l, clip_g, t5, root / "tokenizer", root / "tokenizer_2", root / "tokenizer_3" if use_t5 else None)


def clip_length(files: TextFiles, clip_l: ClipTokenizer, clip_g: ClipTokenizer) -> int:
    """How many CLIP tokens the joint text sequence holds: the CLIP tokenizers' `model_max_length`.

    diffusers' `StableDiffusion3Pipeline` sets `tokenizer_max_length = tokenizer.model_max_length` and pads and
    truncates both CLIP prompts to it (`_get_clip_prompt_embeds`); every released model says 77. A tokenizer
    config that gives no length (or transformers' "unlimited" 1e30, which `ClipTokenizer` reads as None) counts
    as 77, the length diffusers falls back to. CLIP-L and CLIP-G must agree: their outputs are joined position
    by position. (diffusers pads both to CLIP-L's length and never reads CLIP-G's; two lengths in one model's
    files are a mistake in them, so here they are an error rather than one of them being ignored.)
    """
    lengths = [t.model_max_length if t.model_max_length is not None else CLIP_TOKENS for t in (clip_l, clip_g)]
    if lengths[0] != lengths[1]:
        raise TokenizerError(
            f"the CLIP tokenizers disagree on the CLIP length: model_max_length {lengths[0]} in "
            f"{files.tokenizer / 'tokenizer_config.json'}, {lengths[1]} in "
            f"{files.tokenizer_2 / 'tokenizer_config.json'}; both CLIPs must be padded to the same length, so fix "
            "one of the two files (every released model says 77)"
        )
    if lengths[0] < clip_l.num_special_tokens:
        raise TokenizerError(
            f"model_max_length {lengths[0]} in {files.tokenizer / 'tokenizer_config.json'} leaves no room for "
            f"CLIP's {clip_l.num_special_tokens} special tokens (start and end of text); every released model says 77"
        )
    return lengths[0]


@dataclass(frozen=True)
class Encoded:
    """Each encoder's output for one group of texts (rows in the group's order)."""

    clip_l: CLIPOutput
    clip_g: CLIPOutput
    t5: Tensor | None


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of the positive prompt, for DenseDiffusion's phrase matching, with the tokenizers that made them."""

    clip: list[int]  # the CLIP length's CLIP-L ids (CLIP-G shares the BPE; only its pad differs)
    t5: list[int] | None
    clip_tokenizer: ClipTokenizer
    t5_tokenizer: T5Tokenizer | None


@dataclass(frozen=True)
class EncodedPrompts:
    positive: Conditioning
    negative: Conditioning | None
    tokens: PromptTokens
    truncated: list[str]  # one message per cut prompt, for the CLI to show
    phrases: Encoded | None = None  # the extra texts' encodings, when asked for
    encoders: tuple[Encoded, ...] = ()  # each encoder's own outputs, per group (prompts, negatives, extra texts)


def encode_texts(
    files: TextFiles,
    groups: Sequence[Sequence[str]],
    *,
    max_sequence_length: int = 256,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    keep: dict | None = None,
    t5_device: str | torch.device | None = None,
    memory: MemoryLog | None = None,
    weights: str = "full",
    loras: Sequence[LoRAFile] = (),
    labels: Sequence[str] = ("prompt",),
) -> tuple[list[Encoded], list[str], PromptTokens]:
    """Run every group of texts through CLIP-L, CLIP-G and T5, one encoder in memory at a time.

    Each group is one encoder call, as diffusers encodes the prompts and the negative prompts separately.
    Both CLIPs run at `clip_length` (the tokenizers' model_max_length, 77 in every released model), T5 at
    `max_sequence_length`.
    Returns the encodings per group, the truncation messages of the first `len(labels)` groups (each text named
    by its group's label), and group 0's first prompt's ids.
    With `keep` (a dict owned by the caller) the tokenizers and encoders are loaded once, kept in it and
    reused by later calls, instead of being loaded and freed each time.
    `t5_device`: where T5 runs, in `dtype` like the others (default `device`); its output is moved to `device`.
    `memory`: a log that gets one stage per encoder. `weights`: "fp8" keeps T5's linear layers in float8
    (`loaders.fp8`); the CLIPs are small and stay in `dtype`. `loras`: their CLIP-L / CLIP-G parts are merged
    into those encoders as they load (`loaders.lora`).
    """
    device = torch.device(device)
    t5_device = device if t5_device is None else torch.device(t5_device)
    notes: list[str] = []
    outputs: dict[str, list] = {}
    cache = keep if keep is not None else {}

    def kept(key: str, make):
        if key not in cache:
            cache[key] = make()
        return cache[key]

    tok_l = kept("tokenizer", lambda: ClipTokenizer.from_folder(files.tokenizer))
    tok_g = kept("tokenizer_2", lambda: ClipTokenizer.from_folder(files.tokenizer_2))
    tok_t5 = kept("tokenizer_3", lambda: T5Tokenizer.from_folder(files.tokenizer_3)) if files.t5 is not None else None
    first_ids: dict[str, list[int]] = {}
    clip = clip_length(files, tok_l, tok_g)
    stages = [("CLIP-L", tok_l, clip, files.clip_l, "quick_gelu"), ("CLIP-G", tok_g, clip, files.clip_g, "gelu")]
    if files.t5 is not None:
        stages.append(("T5", tok_t5, max_sequence_length, files.t5, None))
    for name, tokenizer, length, where, activation in stages:
        runs_on = t5_device if activation is None else device
        with measure(memory, name, device) as stage:
            tokens = [tokenizer.encode(list(texts), length) for texts in groups]
            for label, texts, group in zip(labels, groups, tokens):
                for text, cut in zip(texts, group.truncated):
                    if cut:
                        notes.append(f"{name} keeps {length} tokens: the end of the {label} {_quoted(text)} was cut: "
                                     f"{_quoted(cut)}")
            first_ids[name] = tokens[0].ids[0].tolist()
            if name in cache:
                encoder = cache[name]
            elif activation is None:
                encoder = load_t5(where.path, prefix=where.prefix, dtype=dtype, device=runs_on, weights=weights)
            else:
                encoder = load_clip(where.path, prefix=where.prefix, activation=activation, dtype=dtype, device=device)
                if loras:
                    merge_loras(encoder, loras, "clip_l" if name == "CLIP-L" else "clip_g")
            if activation is not None and length > encoder.cfg.max_positions:
                raise InputError(
                    f"the CLIP tokenizers pad to {length} tokens (model_max_length in {files.tokenizer}), but "
                    f"{name} in {where.path} has only {encoder.cfg.max_positions} positions; use the tokenizers "
                    "that came with these encoders"
                )
            stage.weights(encoder)
            with torch.inference_mode():
                outputs[name] = [encoder(t.ids.to(runs_on)) for t in tokens]
                if runs_on != device:  # T5 ran elsewhere: its (B, L, D) output joins the CLIP outputs
                    outputs[name] = [h.to(device) for h in outputs[name]]
            if keep is not None:
                keep[name] = encoder
            # Drop our only reference before the next encoder is loaded, so one encoder is in memory at a time
            # (a helper that `del`s its own argument would leave this name holding it).
            del encoder
            if keep is None:
                release_memory()
    encoded = [
        Encoded(outputs["CLIP-L"][i], outputs["CLIP-G"][i], outputs["T5"][i] if "T5" in outputs else None)
        for i in range(len(groups))
    ]
    ids = PromptTokens(first_ids["CLIP-L"], first_ids.get("T5"), tok_l, tok_t5)
    return encoded, notes, ids


def _quoted(text: str, limit: int = 80) -> str:
    """`text` in quotes for a message, its middle left out when long (a 20,000-character prompt is not echoed)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[: limit - 20]!r}…{text[-12:]!r} ({len(text):,} characters)"


def encode_prompts(
    files: TextFiles,
    prompts: list[str],
    negative_prompts: list[str] | None,
    *,
    num_images: int = 1,
    max_sequence_length: int = 256,
    context_dim: int = 4096,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    extra_texts: list[str] | None = None,
    keep: dict | None = None,
    t5_device: str | torch.device | None = None,
    memory: MemoryLog | None = None,
    weights: str = "full",
    loras: Sequence[LoRAFile] = (),
) -> EncodedPrompts:
    """diffusers' `encode_prompt`: positive (and negative, for CFG) conditioning, each prompt `num_images` times.

    `negative_prompts` None means CFG is off (no negative is encoded). `extra_texts` (DenseDiffusion's phrases)
    are encoded alone, in their own call, with the same settings. `t5_device`, `memory`, `weights`, `loras`: see
    `encode_texts`.
    """
    groups = [prompts] + ([negative_prompts] if negative_prompts is not None else [])
    if extra_texts:
        groups.append(extra_texts)
    labels = ("prompt", "negative prompt") if negative_prompts is not None else ("prompt",)  # cuts to report
    encoded, notes, ids = encode_texts(files, groups, max_sequence_length=max_sequence_length, dtype=dtype,
                                       device=device, keep=keep, t5_device=t5_device, memory=memory,
                                       weights=weights, loras=loras, labels=labels)
    length = max_sequence_length

    def conditioning(e: Encoded) -> Conditioning:
        c = assemble(e.clip_l, e.clip_g, e.t5, t5_length=length, context_dim=context_dim)
        return repeat_for_images(c, num_images)

    positive = conditioning(encoded[0])
    negative = conditioning(encoded[1]) if negative_prompts is not None else None
    return EncodedPrompts(positive, negative, ids, notes, encoded[-1] if extra_texts else None, tuple(encoded))
