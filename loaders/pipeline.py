"""Text-to-image, put together: settings, the denoiser, sampling, decoding.

This is the top of the library (scripts -> loaders -> mmdit / samplers / dense). It only composes: the
networks are in `mmdit`, the loop in `samplers`, the layout control in `dense`. Each function takes what it
needs already loaded, so the caller decides when a component is loaded and freed (the CLI loads them one stage
at a time so that peak memory is about the largest component).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from dense import (AttentionMaps, DenseConfig, DensePlan, Layout, RegionalConfig, RegionalPlan, layout_prompt,
                   parse_layout, read_layout)
from mmdit.conditioning import Conditioning
from mmdit.errors import InputError
from mmdit.model import MMDiT, MMDiTConfig
from mmdit.vae import VAE, decode, encode, to_uint8
from samplers import (
    DEFAULT_SAMPLER, DEFAULT_STRENGTH, IMAGE_SIZE, PRESETS, REFERENCE_PRESETS, SLG_SCALE, SLG_START, SLG_STOP, Denoiser,
    Guidance, Inpaint, ModelCall, Preset, first_step, initial_noise, noised, sample, sigmas,
)

from .checkpoint import Checkpoint, load_transformer, load_vae, locate, transformer_config, variant
from .hub import ModelSource, resolve_model
from .layout import layout_record, match_layout, plan_layout, plan_regional, regional_layout
from .lora import LoRA, LoRAFile, check_transformer_loras, lora_records, merge_loras, read_lora
from .memory import MemoryLog, measure
from .text import TextFiles, encode_prompts, find_text_files
from .transformer_file import TransformerFile
from .validate import check_call, check_checkpoint, check_finite_step, check_load

LAYOUT_METHODS = ("dense", "regional")  # DenseDiffusion (docs/densediffusion.md), Regional Prompting
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # by their CLI names


def _device(name: str | torch.device, what: str) -> torch.device:
    """`name` as a torch.device, or an InputError saying what `what` takes."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"{what} {name!r} is not a device; give e.g. 'cpu' or 'cuda:0'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{what} {name!r}: this machine has no CUDA device; use 'cpu'")
    return device


@dataclass(frozen=True)
class Settings:
    """Everything besides the prompt and the weights that decides the image."""

    steps: int
    cfg: float
    shift: float
    seed: int = 0
    height: int = IMAGE_SIZE
    width: int = IMAGE_SIZE
    slg_layers: tuple[int, ...] = ()
    slg_scale: float = SLG_SCALE
    slg_start: float = SLG_START
    slg_stop: float = SLG_STOP
    sampler: str = DEFAULT_SAMPLER  # one of samplers.SAMPLERS

    @classmethod
    def from_preset(cls, preset: Preset, **overrides) -> Settings:
        """The preset's values, with every override that is not None taking precedence."""
        values = {k: getattr(preset, k) for k in ("steps", "cfg", "shift", "slg_layers", "slg_scale", "slg_start",
                                                   "slg_stop", "sampler")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def guidance(self) -> Guidance:
        return Guidance(self.cfg, self.slg_layers, self.slg_scale, self.slg_start, self.slg_stop)

    def to_dict(self) -> dict:
        return {**asdict(self), "slg_layers": list(self.slg_layers)}


def denoiser(model: MMDiT, dense: DensePlan | RegionalPlan | None = None) -> Denoiser:
    """The MM-DiT as the sampler calls it; with a layout, each call gets its layout attention: DenseDiffusion's, or
    Regional Prompting's, whose steps also append the regional prompts to the context (docs/layout-control.md)."""

    def denoise(x: Tensor, t: Tensor, cond: Conditioning, call: ModelCall) -> Tensor:
        attention, context = None, cond.context
        if isinstance(dense, RegionalPlan):
            attention = dense.for_call(call.step, call.positive)
            if attention is not None:
                context = dense.context(context, call.positive)  # (B, S·(1 + prompts), D)
        elif dense is not None:
            attention = dense.for_call(call.step, call.positive, skip_layers=call.skip_layers)
        check_finite_step(x, call.step, "latents")
        v = model(x, t, context, cond.pooled, skip_layers=call.skip_layers, dense=attention)
        check_finite_step(v, call.step, "MM-DiT's output")
        return v

    return denoise


def generate_latents(
    model: MMDiT,
    positive: Conditioning,
    negative: Conditioning | None,
    settings: Settings,
    *,
    callback: Callable[[int, Tensor], None] | None = None,
    dense: DensePlan | RegionalPlan | None = None,
    start: ImageStart | None = None,
) -> Tensor:
    """Final latents (B, C, H/8, W/8) for the B rows of `positive`, in the model's dtype and device.

    Text-to-image: the noise is drawn once for the whole batch from a CPU generator seeded with
    `settings.seed`, as diffusers does with one generator, so the same seed gives the same image. Image-to-image
    and inpainting start from `start` (see `image_start`).
    """
    param = next(model.parameters())
    if start is None:
        x = initial_noise(
            positive.context.shape[0], settings.height, settings.width, settings.seed,
            channels=model.config.in_channels, dtype=param.dtype, device=param.device,
        )
    else:
        x = start.latents
    cast = lambda c: None if c is None else Conditioning(c.context.to(param), c.pooled.to(param))  # noqa: E731
    schedule = sigmas(settings.steps, settings.shift)
    return sample(denoiser(model, dense), x, schedule, cast(positive), cast(negative), settings.guidance,
                  callback=callback, sampler=settings.sampler, first_step=start.first_step if start else 0,
                  inpaint=start.inpaint if start else None)


@dataclass(frozen=True, eq=False)
class ImageStart:
    """Where an image-to-image or inpainting run starts: the init image's latent, noised to the first step's σ."""

    latents: Tensor  # (B, C, h, w)
    first_step: int
    inpaint: Inpaint | None = None


def image_start(vae: VAE, image: Tensor, mask: Tensor | None, settings: Settings, strength: float, batch: int,
                dtype: torch.dtype) -> ImageStart:
    """diffusers' `StableDiffusion3Img2ImgPipeline.prepare_latents` (and the inpainting pipeline's, with `mask`).

    `image` (1, 3, H, W) in [-1, 1], `mask` (1, 1, H, W) of 0/1 (`loaders.images`). One CPU generator seeded with
    `settings.seed` draws, in this order, the VAE posterior sample and then the noise (in `dtype`), as diffusers
    does with the one generator it is given; the latent is noised to σ at step `first_step(steps, strength)`.
    """
    steps = settings.steps
    first = first_step(steps, strength)
    device = next(vae.parameters()).device
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    x0 = encode(vae, image.to(device), generator=generator).to(dtype)  # (1, C, h, w), in the VAE's dtype first
    x0 = x0.repeat(batch, 1, 1, 1)  # (B, C, h, w)
    noise = torch.randn(x0.shape, generator=generator, dtype=dtype).to(device)
    latents = noise if strength == 1 else noised(x0, noise, sigmas(steps, settings.shift)[first])
    inpaint = None
    if mask is not None:
        small = torch.nn.functional.interpolate(mask, size=x0.shape[-2:])  # nearest, as the inpainting pipeline
        inpaint = Inpaint(x0, small.to(device=device, dtype=dtype).repeat(batch, 1, 1, 1), noise)
    return ImageStart(latents, first, inpaint)


def decode_images(vae: VAE, latents: Tensor) -> Tensor:
    """Latents -> (B, H, W, 3) uint8 images, rounded as diffusers' image processor rounds."""
    return to_uint8(decode(vae, latents.to(next(vae.parameters()).device)))


# ----------------------------------------------------------------------------------------------------------
# Load once, generate many


@dataclass(frozen=True)
class ModelDefaults:
    """What a model is and how it samples by default: the one place that decides presets and sizes."""

    variant: str  # the released model the architecture is ("sd3.5-medium", ...)
    preset: Preset
    size: int  # default image side in pixels
    note: str | None = None  # something the user should be told about the choice


PRESET_KINDS = ("diffusers", "reference")


def model_defaults(source: ModelSource, checkpoint: Checkpoint, config: MMDiTConfig,
                   kind: str = "diffusers") -> ModelDefaults:
    """The built-in model's tuned preset, or the release's preset for the architecture the weights have.

    `kind` "diffusers" (the default): the model cards' diffusers settings, Euler; "reference": Stability's
    reference settings and sampler (`samplers.REFERENCE_PRESETS`; for the built-in model, its own preset with
    DPM-Solver++(2M)). A checkpoint with a release's architecture but another depth (a tiny test model, a pruned
    or distilled one) keeps that release's steps, CFG and shift, but gets no skip-layer guidance: the release's
    skip-layer blocks were chosen for its own depth.
    """
    from .builtin import PRESET, SIZE

    if kind not in PRESET_KINDS:
        raise InputError(f"unknown preset {kind!r}; choose one of {', '.join(PRESET_KINDS)}")
    name = variant(checkpoint, config)
    if source.builtin:
        return ModelDefaults(name, replace(PRESET, sampler="dpmpp_2m") if kind == "reference" else PRESET, SIZE)
    preset = (REFERENCE_PRESETS if kind == "reference" else PRESETS)[name]
    if any(i >= config.depth for i in preset.slg_layers):
        note = (f"{checkpoint.name} has the {name} architecture with {config.depth} blocks instead of the "
                f"release's; its skip-layer guidance (blocks {list(preset.slg_layers)}) is off unless you choose "
                "blocks (--slg-layers)")
        return ModelDefaults(name, replace(preset, slg_layers=()), IMAGE_SIZE, note)
    return ModelDefaults(name, preset, IMAGE_SIZE)


@dataclass(frozen=True, eq=False)
class InitImage:
    """Where image-to-image starts: the image (a path or PIL image), how much of it is redrawn, and the
    inpainting mask (white = repaint), if any."""

    image: str | Path | object
    strength: float
    mask: str | Path | object | None = None


def _init_image(image: str | Path | object | None, strength: float | None,
                mask: str | Path | object | None) -> InitImage | None:
    """A call's image-to-image input (None: text-to-image); `strength` None is diffusers' default."""
    if image is None:
        if mask is not None or strength is not None:
            raise InputError(f"{'a mask' if mask is not None else 'strength'} needs an init image "
                             "(--init-image / init_image=...)")
        return None
    return InitImage(image, DEFAULT_STRENGTH if strength is None else strength, mask)


@dataclass(frozen=True, eq=False)
class LayoutControl:
    """A layout and how it steers. DenseDiffusion: `strength`, `preset` (a name or a `dense.DenseConfig`), and
    whether the per-phrase attention maps are recorded. Regional Prompting (`regional` not None): its
    `dense.RegionalConfig` and the background prompt given by the caller (docs/layout-control.md)."""

    layout: Layout
    strength: float
    preset: str | DenseConfig
    record_maps: bool
    regional: RegionalConfig | None = None
    background: str | None = None


def _layout_control(layout: Layout | dict | str | Path | None, strength: float, preset: str | DenseConfig,
                    record_maps: bool, method: str = "dense", regional: RegionalConfig | None = None,
                    background: str | None = None) -> LayoutControl | None:
    """A call's layout, read from its file or parsed from its dict (None: no layout)."""
    if method not in LAYOUT_METHODS:
        raise InputError(f"unknown layout method {method!r}; choose one of {', '.join(LAYOUT_METHODS)}")
    if isinstance(layout, (str, Path)):
        layout = read_layout(layout)
    elif isinstance(layout, dict):
        layout = parse_layout(layout)
    if layout is None:
        if record_maps:
            raise InputError("record_maps needs a layout (its regions and phrases are what is measured)")
        return None
    if method == "regional":
        if record_maps:
            raise InputError("attention maps are recorded for DenseDiffusion only (layout_method='dense')")
        return LayoutControl(layout, strength, preset, False, regional or RegionalConfig(), background)
    return LayoutControl(layout, strength, preset, record_maps)


@dataclass(frozen=True, eq=False)
class Conditions:
    """What the sampler is conditioned on: one row per image (negative rows only under CFG), the layout's
    attention plan, and what the user should be told about the text (e.g. a prompt the tokenizers truncated)."""

    positive: Conditioning
    negative: Conditioning | None
    plan: DensePlan | RegionalPlan | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Result:
    """One call's output: `images` (PIL, one per row), the final `latents` (B, 16, H/8, W/8), the attention maps
    when they were recorded, `record` (the settings, as the CLI writes them into the PNG metadata) and
    `warnings` (e.g. a prompt the tokenizers truncated)."""

    images: list
    latents: Tensor
    record: dict
    maps: AttentionMaps | None = None
    warnings: tuple[str, ...] = ()


@dataclass(eq=False)
class Pipeline:
    """Text-to-image (with an optional DenseDiffusion layout) on one model: `Pipeline.load(...)`, then call it.

    `keep_loaded=False` loads each component for the call that needs it and drops it afterwards, so the peak
    memory is about the largest component (what the CLI does); `True` keeps every component resident once it
    has been used, so repeated calls read nothing from disk.
    `offload="blocks"` keeps the MM-DiT's joint blocks in CPU memory and streams them to the device as they run
    (`mmdit.streaming`); `t5_device` runs T5 elsewhere (e.g. "cpu"), in `dtype`. Neither changes the numbers
    on a CPU-only machine (tests/test_memory.py); docs/performance.md says when they help.
    `weights="fp8"` keeps the MM-DiT's and T5's linear layers in float8 with a per-tensor scale, computed in
    `dtype` (`loaders.fp8`); ComfyUI's scaled-float8 files load with either setting.
    `loras`: LoRA files (`loaders.lora`) merged into the MM-DiT and the CLIP encoders each time they load.
    `transformer_file`: the MM-DiT's own file (`--transformer`, GGUF or safetensors), in place of the model's.
    """

    source: ModelSource
    checkpoint: Checkpoint
    config: MMDiTConfig
    defaults: ModelDefaults
    use_t5: bool = True
    tokenizers: Path | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    keep_loaded: bool = False
    offload: str = "none"  # one of loaders.checkpoint.OFFLOAD
    t5_device: torch.device | None = None  # None: T5 runs on `device`
    weights: str = "full"  # one of loaders.fp8.WEIGHTS
    loras: tuple[LoRAFile, ...] = ()  # read and checked against the MM-DiT by `load`
    vae_dtype: torch.dtype | None = None  # None: `dtype` (see `load`)
    compile: bool = False  # torch.compile the MM-DiT's joint blocks (see `load`)
    transformer_file: TransformerFile | None = None  # None: the MM-DiT of `checkpoint`
    _model: MMDiT | None = None
    _vae: VAE | None = None
    _text: dict | None = None  # tokenizers and text encoders, when kept loaded
    _files: TextFiles | None = None

    @classmethod
    def load(cls, model: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
             device: str | torch.device | None = None, t5: bool = True, tokenizers: Path | None = None,
             keep_loaded: bool = False, offload: str = "none",
             t5_device: str | torch.device | None = None, weights: str | None = None,
             loras: Sequence[LoRA | str | Path | tuple[str | Path, float]] = (),
             preset: str = "diffusers", vae_dtype: torch.dtype | None = None, compile: bool = False,
             transformer: str | Path | None = None) -> Pipeline:
        """`model` is what `--model` takes (None: the built-in model). `vae_dtype`: the VAE's own dtype (None:
        `dtype`, as diffusers runs it); float32 for CPUs whose 16-bit convolutions are slow (docs/performance.md).
        `preset`: "diffusers" (default settings, Euler) or "reference" (Stability's reference settings and
        DPM-Solver++(2M); see `model_defaults`). `loras`: each a `loaders.lora.LoRA`, a path (scale 1), a string
        spelt as `--lora PATH[:SCALE]`, or a (path, scale) pair; their MM-DiT keys are checked here, before any
        weight is read, their CLIP keys when the encoders load. `weights`: None (the default) keeps a float8 file
        in float8 ("fp8") and loads any other in `dtype` ("full"). `compile`: `torch.compile` each joint block of
        the MM-DiT when it loads; the first call of each block shape compiles, later ones run the compiled
        kernels, whose outputs differ from eager ones by rounding only (docs/performance.md). `transformer`: a
        GGUF or safetensors file whose MM-DiT replaces the model's (`loaders.transformer_file`; docs/gguf.md)."""
        check_load(locals())  # every argument's type and range, before anything is resolved or read
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if compile:
            check_compiler(device, offload)
        t5_device = None if t5_device is None else _device(t5_device, "t5_device (--t5-device)")
        source = resolve_model(None if model is None else str(model), need_t5=t5)
        checkpoint = locate(source.diffusion)
        config = transformer_config(checkpoint)
        weights = check_checkpoint(checkpoint, weights)  # None: float8 if the file stores float8, else full
        own = None
        if transformer is not None:
            own = TransformerFile.open(transformer)
            own.check_fits(config, source.label)
            config = own.config
        defaults = model_defaults(source, own.checkpoint if own else checkpoint, config, preset)
        lora_files = tuple(read_lora(lora) for lora in loras)
        if lora_files:
            with torch.device("meta"):  # names and shapes only: a mismatch is reported before anything loads
                check_transformer_loras(MMDiT(config), lora_files)
        pipe = cls(source, checkpoint, config, defaults, t5, tokenizers, dtype, device, keep_loaded,
                   offload=offload, t5_device=t5_device, weights=weights, loras=lora_files,
                   vae_dtype=vae_dtype, compile=compile, transformer_file=own,
                   _text={} if keep_loaded else None)
        if keep_loaded:
            pipe.transformer(), pipe.autoencoder()
        return pipe

    @property
    def preset(self) -> Preset:
        return self.defaults.preset

    @property
    def files(self) -> TextFiles:
        """The text encoders' and tokenizers' files, found when a prompt first needs them (precomputed
        embeddings need none)."""
        if self._files is None:
            self._files = find_text_files(self.source.diffusion, use_t5=self.use_t5, tokenizers=self.tokenizers)
        return self._files

    def transformer(self) -> MMDiT:
        model = self._model
        if model is None:
            if self.transformer_file is not None:
                model = self.transformer_file.load(dtype=self.dtype, device=self.device, offload=self.offload,
                                                   weights=self.weights)
            else:
                model = load_transformer(self.checkpoint, dtype=self.dtype, device=self.device,
                                         offload=self.offload, weights=self.weights)
            if self.loras:
                merge_loras(model, self.loras, "transformer")  # into the fresh weights
            if self.compile:
                for block in model.joint_blocks:
                    block.compile()  # in place; compiled lazily, at the block's first call
        if self.keep_loaded:
            self._model = model
        return model

    def autoencoder(self) -> VAE:
        vae = self._vae or load_vae(self.checkpoint, dtype=self.vae_dtype or self.dtype, device=self.device)
        if self.keep_loaded:
            self._vae = vae
        return vae

    def settings(self, *, seed: int = 0, height: int | None = None, width: int | None = None, init_image=None,
                 **overrides) -> Settings:
        """The preset with every override that is not None applied; checks the skip-layer blocks exist. A side
        not given is the model's default size, or, with an `init_image`, the image's, rounded down to 16."""
        from .images import output_size

        size = (self.defaults.size,) * 2
        if init_image is not None and not (height and width):
            size = output_size(init_image)  # (height, width)
        settings = Settings.from_preset(self.preset, seed=seed, height=height or size[0], width=width or size[1],
                                        **overrides)
        missing = [i for i in settings.slg_layers if i >= self.config.depth]
        if missing:
            raise InputError(f"skip-layer guidance blocks {missing} do not exist: this model has blocks "
                             f"0..{self.config.depth - 1}; choose others (--slg-layers 3,4 / slg_layers=(3, 4)) "
                             "or none (--slg-layers '' / slg_layers=())")
        return settings

    def __call__(
        self,
        prompt: str | None = None,
        *,
        negative_prompt: str = "",
        layout: Layout | dict | str | Path | None = None,
        seed: int = 0,
        steps: int | None = None,
        cfg: float | None = None,
        shift: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        slg_layers: tuple[int, ...] | None = None,
        slg_scale: float | None = None,
        slg_start: float | None = None,
        slg_stop: float | None = None,
        max_sequence_length: int | None = None,
        dense_strength: float = 1.0,
        dense_preset: str | DenseConfig = "faithful",
        record_maps: bool = False,
        layout_method: str = "dense",
        regional: RegionalConfig | None = None,
        background_prompt: str | None = None,
        callback: Callable[[int, Tensor], None] | None = None,
        prompt_embeds: Conditioning | None = None,
        negative_embeds: Conditioning | None = None,
        memory: MemoryLog | None = None,
        sampler: str | None = None,
        init_image: str | Path | object | None = None,
        strength: float | None = None,
        mask: str | Path | object | None = None,
    ) -> Result:
        """Generate `num_images` images of `prompt` (one noise draw for the batch, seeded by `seed`).

        `layout` is a parsed `dense.Layout`, a dict shaped like the layout JSON, or the path of a layout file;
        its regions steer the image with DenseDiffusion (`dense_strength`, `dense_preset`: a preset name or a
        `dense.DenseConfig`). `record_maps` records the per-phrase attention maps (needs a layout).
        `layout_method="regional"` steers with Regional Prompting instead (docs/layout-control.md): each region's
        phrase is its own prompt, `regional` (a `dense.RegionalConfig`: base ratio, inject steps and interval;
        None: its defaults) says how, and `background_prompt` (else the layout's "background", else "") covers the
        image tokens of no worded region.
        Precomputed conditioning replaces the prompt: `prompt_embeds` (and `negative_embeds` when CFG is on), one
        row per image; then no text encoder runs.
        `memory`: a `loaders.memory.MemoryLog` that gets each stage's weight bytes and peak memory.
        `sampler`: "euler" (diffusers') or "dpmpp_2m" (Stability's reference); None: the preset's.
        `init_image` (a path or PIL image) makes it image-to-image: the run starts from the image noised to the
        step `strength` selects (default 0.6, diffusers'; 1 ignores its content); the output size defaults to the
        image's, rounded down to a multiple of 16, and the image is resized (Lanczos) to the size asked for.
        `mask` (greyscale: white = repaint, black = keep) with an init image makes it inpainting.
        """
        check_call(self, locals())  # every argument, the size, the init image and mask: before anything runs
        init = _init_image(init_image, strength, mask)
        settings = self.settings(seed=seed, height=height, width=width, init_image=init_image, steps=steps, cfg=cfg,
                                 shift=shift, slg_layers=slg_layers, slg_scale=slg_scale, slg_start=slg_start,
                                 slg_stop=slg_stop, sampler=sampler)
        length = max_sequence_length or self.preset.max_sequence_length
        control = _layout_control(layout, dense_strength, dense_preset, record_maps, layout_method, regional,
                                  background_prompt)
        if control is not None:
            prompt = layout_prompt(control.layout, prompt)
        if prompt_embeds is not None:
            if control is not None or prompt is not None:
                raise InputError("give prompt_embeds or a prompt / layout, not both (a layout needs the prompt's text)")
            conditions = self._given(prompt_embeds, negative_embeds, settings)
        elif prompt is None:
            raise InputError("give a prompt (or a layout that has one)")
        else:
            conditions = self._encode(prompt, negative_prompt, num_images, length, control, settings, memory)
        batch = conditions.positive.context.shape[0]
        start = self._image_start(init, settings, batch, memory) if init is not None else None
        latents = self._sample(conditions, settings, callback, memory, start)
        record = self._record(prompt, negative_prompt, settings, length, batch, control, init)
        if prompt_embeds is not None:
            record["prompt_embeds"] = True
        maps = conditions.plan.maps if isinstance(conditions.plan, DensePlan) else None
        return self._result(latents, record, maps, conditions.warnings, memory)

    def _given(self, positive: Conditioning, negative: Conditioning | None, settings: Settings) -> Conditions:
        """Precomputed embeddings as the sampler's conditions (no text encoder runs)."""
        if settings.guidance.cfg_on and negative is None:
            raise InputError(f"cfg {settings.cfg} > 1 needs negative_embeds too (or cfg=1)")
        skipped = tuple(f"LoRA {f.lora.path.name} also adapts the text encoders; precomputed embeddings do not "
                        "run them, so that part of it does not apply" for f in self.loras
                        if set(f.components) - {"transformer"})
        return Conditions(positive, negative, warnings=skipped)

    def _encode(self, prompt: str, negative_prompt: str, num_images: int, length: int,
                control: LayoutControl | None, settings: Settings, memory: MemoryLog | None) -> Conditions:
        """The text stage: the prompts encoded (`num_images` rows each) and, with a layout, its attention plan."""
        match = regions = extra = None
        if control is not None and control.regional is not None:  # Regional Prompting: every phrase its own prompt
            regions = regional_layout(control.layout, control.background, height=settings.height,
                                      width=settings.width)
            if control.regional.inject_steps > 0:  # 0: the plain run, bit for bit, not even encoding them
                extra = list(regions.texts)
        elif control is not None:
            match = match_layout(control.layout, prompt, self.files, height=settings.height, width=settings.width,
                                 max_sequence_length=length, keep=self._text)
            extra = match.texts_to_encode if control.strength > 0 else None
        encoded = encode_prompts(
            self.files, [prompt], [negative_prompt] if settings.guidance.cfg_on else None, num_images=num_images,
            max_sequence_length=length, context_dim=self.config.context_dim, dtype=self.dtype, device=self.device,
            extra_texts=extra, keep=self._text, t5_device=self.t5_device, memory=memory, weights=self.weights,
            loras=self.loras,
        )
        positive, plan = encoded.positive, None
        if regions is not None and extra is not None:
            plan = plan_regional(regions, encoded, control.regional, max_sequence_length=length,
                                 context_dim=self.config.context_dim, device=self.device)
        if match is not None:
            positive, plan = plan_layout(match, encoded, steps=settings.steps, shift=settings.shift,
                                         strength=control.strength, preset=control.preset,
                                         record_maps=control.record_maps, max_sequence_length=length,
                                         device=self.device)
        return Conditions(positive, encoded.negative, plan, tuple(encoded.truncated))

    def _sample(self, conditions: Conditions, settings: Settings, callback: Callable[[int, Tensor], None] | None,
                memory: MemoryLog | None, start: ImageStart | None) -> Tensor:
        """The sampling stage: the MM-DiT (loaded, or the kept one) runs the loop; the final latents."""
        with measure(memory, "sampling", self.device) as stage:
            model = self.transformer()
            stage.weights(model)
            return generate_latents(model, conditions.positive, conditions.negative, settings, dense=conditions.plan,
                                    callback=callback, start=start)

    def _image_start(self, init: InitImage, settings: Settings, batch: int, memory: MemoryLog | None) -> ImageStart:
        """The VAE-encode stage of image-to-image / inpainting (before the MM-DiT is loaded)."""
        from .images import read_init_image, read_mask

        image = read_init_image(init.image, settings.height, settings.width)
        pixels = read_mask(init.mask, settings.height, settings.width) if init.mask is not None else None
        with measure(memory, "VAE encode", self.device) as stage:
            vae = self.autoencoder()
            stage.weights(vae)
            if vae.encoder is None:
                raise InputError(f"{self.checkpoint.name} has no VAE encoder (decoder-only weights); "
                                 "image-to-image and inpainting need the encoder")
            return image_start(vae, image, pixels, settings, init.strength, batch, self.dtype)

    def _record(self, prompt: str | None, negative_prompt: str, settings: Settings, length: int, count: int,
                control: LayoutControl | None, init: InitImage | None) -> dict:
        """What made the image, as it goes into the PNG metadata (enough to make it again)."""
        dense = control is not None and control.regional is None
        regional = control is not None and control.regional is not None
        return {
            "model": self.source.label,
            **({"transformer": str(self.transformer_file.path)} if self.transformer_file else {}),
            "variant": self.defaults.variant, "prompt": prompt,
            "negative_prompt": negative_prompt, "prompt_embeds": None, **settings.to_dict(),
            "dtype": str(self.dtype).removeprefix("torch."), "max_sequence_length": length,
            **({"vae_dtype": str(self.vae_dtype).removeprefix("torch.")} if self.vae_dtype not in (None, self.dtype)
               else {}),
            **({"compile": True} if self.compile else {}),
            "t5": self.use_t5, "num_images": count,
            **({"weights": self.weights} if self.weights != "full" else {}),  # "full" records nothing, as before
            **({"loras": lora_records(self.loras)} if self.loras else {}),  # likewise without LoRAs
            "layout": layout_record(control.layout) if control is not None else None,
            "dense_strength": control.strength if dense else None,
            "dense_preset": (control.preset if isinstance(control.preset, str) else asdict(control.preset))
            if dense else None,
            **({"init_image": _name(init.image), "strength": init.strength} if init is not None else {}),
            **({"mask": _name(init.mask)} if init is not None and init.mask is not None else {}),
            **({"layout_method": "regional", "regional": asdict(control.regional),
                "background_prompt": control.background} if regional else {}),  # DenseDiffusion: keys as before
        }

    def _result(self, latents: Tensor, record: dict, maps: AttentionMaps | None, warnings: tuple[str, ...],
                memory: MemoryLog | None) -> Result:
        from PIL import Image

        if not torch.isfinite(latents).all():  # decoding would give a black image, and nothing would say why
            if self.dtype == torch.float16:
                raise InputError("the latents became non-finite (inf or nan) while sampling in float16: SD3's "
                                 "activations can overflow its range; use bfloat16 (--dtype bfloat16) or float32")
            raise FloatingPointError(f"the latents became non-finite (inf or nan) while sampling in {self.dtype}")
        with measure(memory, "VAE", self.device) as stage:
            vae = self.autoencoder()
            stage.weights(vae)
            images = decode_images(vae, latents).cpu()
        return Result([Image.fromarray(im.numpy()) for im in images], latents, record, maps, warnings)


def _name(image) -> str:
    """How an init image or mask is recorded: its path, or a placeholder for an in-memory image."""
    return str(image) if isinstance(image, (str, Path)) else f"<{type(image).__name__}>"


def check_compiler(device: torch.device, offload: str) -> None:
    """What `torch.compile` (its default backend, inductor) needs, checked before anything loads: a C++ compiler
    to build CPU kernels, Triton for GPU ones; and whole blocks that stay where they are (not `offload="blocks"`,
    whose per-call weight copies would make every call compile again)."""
    import importlib.util
    import os
    import shutil

    if offload != "none":
        raise InputError("--compile and --offload blocks do not go together (streamed weights change at every call, "
                         "so the compiled blocks would recompile each time); choose one")
    if device.type == "cpu":
        compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
        if not any(shutil.which(c) for c in compilers):
            raise InputError("--compile on a CPU needs a C++ compiler (torch.compile builds its kernels with one): "
                             "install g++ (e.g. `apt install g++`) or set CXX, or run without --compile")
    elif importlib.util.find_spec("triton") is None:
        raise InputError("--compile on a GPU needs Triton (`pip install triton`; CUDA builds of torch bring it), "
                         "or run without --compile")
