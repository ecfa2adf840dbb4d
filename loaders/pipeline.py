"""Text-to-image, put together: settings, the denoiser, sampling, decoding.

This is the top of the library (scripts -> loaders -> mmdit / samplers / dense). It only composes: the
networks are in `mmdit`, the loop in `samplers`, the layout control in `dense`. Each function takes what it
needs already loaded, so the caller decides when a component is loaded and freed (the CLI loads them one stage
at a time so that peak memory is about the largest component).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from dense import AttentionMaps, DenseConfig, DensePlan, Layout
from mmdit.conditioning import Conditioning
from mmdit.errors import InputError
from mmdit.model import MMDiT, MMDiTConfig
from mmdit.vae import VAE, decode, to_uint8
from samplers import PRESETS, Denoiser, Guidance, ModelCall, Preset, initial_noise, sample, sigmas

from .checkpoint import Checkpoint, load_transformer, load_vae, locate, transformer_config, variant
from .hub import ModelSource, resolve_model
from .layout import layout_record, match_layout, plan_layout
from .text import TextFiles, encode_prompts, find_text_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # by their CLI names


@dataclass(frozen=True)
class Settings:
    """Everything besides the prompt and the weights that decides the image."""

    steps: int
    cfg: float
    shift: float
    seed: int = 0
    height: int = 1024
    width: int = 1024
    slg_layers: tuple[int, ...] = ()
    slg_scale: float = 2.8
    slg_start: float = 0.01
    slg_stop: float = 0.2

    @classmethod
    def from_preset(cls, preset: Preset, **overrides) -> Settings:
        """The preset's values, with every override that is not None taking precedence."""
        values = {k: getattr(preset, k) for k in ("steps", "cfg", "shift", "slg_layers", "slg_scale", "slg_start", "slg_stop")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def guidance(self) -> Guidance:
        return Guidance(self.cfg, self.slg_layers, self.slg_scale, self.slg_start, self.slg_stop)

    def to_dict(self) -> dict:
        return {**asdict(self), "slg_layers": list(self.slg_layers)}


def denoiser(model: MMDiT, dense: DensePlan | None = None) -> Denoiser:
    """The MM-DiT as the sampler calls it; with a layout, each call gets its DenseDiffusion attention."""

    def denoise(x: Tensor, t: Tensor, cond: Conditioning, call: ModelCall) -> Tensor:
        attention = None
        if dense is not None:
            attention = dense.for_call(call.step, call.positive, skip_layers=call.skip_layers)
        return model(x, t, cond.context, cond.pooled, skip_layers=call.skip_layers, dense=attention)

    return denoise


def generate_latents(
    model: MMDiT,
    positive: Conditioning,
    negative: Conditioning | None,
    settings: Settings,
    *,
    callback: Callable[[int, Tensor], None] | None = None,
    dense: DensePlan | None = None,
) -> Tensor:
    """Final latents (B, C, H/8, W/8) for the B rows of `positive`, in the model's dtype and device.

    The noise is drawn once for the whole batch from a CPU generator seeded with `settings.seed`, as
    diffusers does with one generator, so the same seed gives the same image.
    """
    param = next(model.parameters())
    noise = initial_noise(
        positive.context.shape[0], settings.height, settings.width, settings.seed,
        channels=model.config.in_channels, dtype=param.dtype, device=param.device,
    )
    cast = lambda c: None if c is None else Conditioning(c.context.to(param), c.pooled.to(param))  # noqa: E731
    schedule = sigmas(settings.steps, settings.shift)
    return sample(denoiser(model, dense), noise, schedule, cast(positive), cast(negative), settings.guidance,
                  callback=callback)


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


def model_defaults(source: ModelSource, checkpoint: Checkpoint, config: MMDiTConfig) -> ModelDefaults:
    """The built-in model's tuned preset, or the release's preset for the architecture the weights have.

    A checkpoint with a release's architecture but another depth (a tiny test model, a pruned or distilled one)
    keeps that release's steps, CFG and shift, but gets no skip-layer guidance: the release's skip-layer blocks
    were chosen for its own depth.
    """
    from .builtin import PRESET, SIZE

    name = variant(checkpoint, config)
    if source.builtin:
        return ModelDefaults(name, PRESET, SIZE)
    preset = PRESETS[name]
    if any(i >= config.depth for i in preset.slg_layers):
        note = (f"{checkpoint.name} has the {name} architecture with {config.depth} blocks instead of the "
                f"release's; its skip-layer guidance (blocks {list(preset.slg_layers)}) is off unless you choose "
                "blocks (--slg-layers)")
        return ModelDefaults(name, replace(preset, slg_layers=()), 1024, note)
    return ModelDefaults(name, preset, 1024)


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
    _model: MMDiT | None = None
    _vae: VAE | None = None
    _text: dict | None = None  # tokenizers and text encoders, when kept loaded
    _files: TextFiles | None = None

    @classmethod
    def load(cls, model: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
             device: str | torch.device | None = None, t5: bool = True, tokenizers: Path | None = None,
             keep_loaded: bool = False) -> Pipeline:
        """`model` is what `--model` takes (None: the built-in model)."""
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        source = resolve_model(None if model is None else str(model), need_t5=t5)
        checkpoint = locate(source.diffusion)
        config = transformer_config(checkpoint)
        defaults = model_defaults(source, checkpoint, config)
        pipe = cls(source, checkpoint, config, defaults, t5, tokenizers, dtype, device, keep_loaded,
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
        model = self._model or load_transformer(self.checkpoint, dtype=self.dtype, device=self.device)
        if self.keep_loaded:
            self._model = model
        return model

    def autoencoder(self) -> VAE:
        vae = self._vae or load_vae(self.checkpoint, dtype=self.dtype, device=self.device)
        if self.keep_loaded:
            self._vae = vae
        return vae

    def settings(self, *, seed: int = 0, height: int | None = None, width: int | None = None, **overrides) -> Settings:
        """The preset with every override that is not None applied; checks the skip-layer blocks exist."""
        size = self.defaults.size
        settings = Settings.from_preset(self.preset, seed=seed, height=height or size, width=width or size,
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
        callback: Callable[[int, Tensor], None] | None = None,
        prompt_embeds: Conditioning | None = None,
        negative_embeds: Conditioning | None = None,
    ) -> Result:
        """Generate `num_images` images of `prompt` (one noise draw for the batch, seeded by `seed`).

        `layout` is a parsed `dense.Layout`, a dict shaped like the layout JSON, or the path of a layout file;
        its regions steer the image with DenseDiffusion (`dense_strength`, `dense_preset`: a preset name or a
        `dense.DenseConfig`). `record_maps` records the per-phrase attention maps (needs a layout).
        Precomputed conditioning replaces the prompt: `prompt_embeds` (and `negative_embeds` when CFG is on), one
        row per image; then no text encoder runs.
        """
        from dense import layout_prompt, parse_layout, read_layout

        settings = self.settings(seed=seed, height=height, width=width, steps=steps, cfg=cfg, shift=shift,
                                 slg_layers=slg_layers, slg_scale=slg_scale, slg_start=slg_start, slg_stop=slg_stop)
        length = max_sequence_length or self.preset.max_sequence_length
        if isinstance(layout, (str, Path)):
            layout = read_layout(layout)
        elif isinstance(layout, dict):
            layout = parse_layout(layout)
        if layout is not None:
            prompt = layout_prompt(layout, prompt)
        elif record_maps:
            raise InputError("record_maps needs a layout (its regions and phrases are what is measured)")
        if prompt_embeds is not None:
            if layout is not None or prompt is not None:
                raise InputError("give prompt_embeds or a prompt / layout, not both (a layout needs the prompt's text)")
            if settings.guidance.cfg_on and negative_embeds is None:
                raise InputError(f"cfg {settings.cfg} > 1 needs negative_embeds too (or cfg=1)")
            latents = generate_latents(self.transformer(), prompt_embeds, negative_embeds, settings, callback=callback)
            record = self._record(None, negative_prompt, settings, None, length, prompt_embeds.context.shape[0],
                                  dense_strength, dense_preset)
            return self._result(latents, {**record, "prompt_embeds": True}, None, ())
        if prompt is None:
            raise InputError("give a prompt (or a layout that has one)")
        match = None
        if layout is not None:
            match = match_layout(layout, prompt, self.files, height=settings.height, width=settings.width,
                                 max_sequence_length=length, keep=self._text)
        encoded = encode_prompts(
            self.files, [prompt], [negative_prompt] if settings.guidance.cfg_on else None, num_images=num_images,
            max_sequence_length=length, context_dim=self.config.context_dim, dtype=self.dtype, device=self.device,
            extra_texts=match.texts_to_encode if match is not None and dense_strength > 0 else None,
            keep=self._text,
        )
        positive, plan = encoded.positive, None
        if match is not None:
            positive, plan = plan_layout(match, encoded, steps=settings.steps, shift=settings.shift,
                                         strength=dense_strength, preset=dense_preset, record_maps=record_maps,
                                         max_sequence_length=length, device=self.device)
        latents = generate_latents(self.transformer(), positive, encoded.negative, settings, dense=plan,
                                   callback=callback)
        record = self._record(prompt, negative_prompt, settings, layout, length, positive.context.shape[0],
                              dense_strength, dense_preset)
        return self._result(latents, record, plan.maps if plan is not None else None, tuple(encoded.truncated))

    def _record(self, prompt: str | None, negative_prompt: str, settings: Settings, layout: Layout | None,
                length: int, count: int, dense_strength: float, dense_preset: str | DenseConfig) -> dict:
        """What made the image, as it goes into the PNG metadata (enough to make it again)."""
        dense = layout is not None
        return {
            "model": self.source.label, "variant": self.defaults.variant, "prompt": prompt,
            "negative_prompt": negative_prompt, "prompt_embeds": None, **settings.to_dict(),
            "dtype": str(self.dtype).removeprefix("torch."), "max_sequence_length": length,
            "t5": self.use_t5, "num_images": count,
            "layout": layout_record(layout) if dense else None,
            "dense_strength": dense_strength if dense else None,
            "dense_preset": (dense_preset if isinstance(dense_preset, str) else asdict(dense_preset)) if dense else None,
        }

    def _result(self, latents: Tensor, record: dict, maps: AttentionMaps | None, warnings: tuple[str, ...]) -> Result:
        from PIL import Image

        if not torch.isfinite(latents).all():  # decoding would give a black image, and nothing would say why
            if self.dtype == torch.float16:
                raise InputError("the latents became non-finite (inf or nan) while sampling in float16: SD3's "
                                 "activations can overflow its range; use bfloat16 (--dtype bfloat16) or float32")
            raise FloatingPointError(f"the latents became non-finite (inf or nan) while sampling in {self.dtype}")
        images = decode_images(self.autoencoder(), latents).cpu()
        return Result([Image.fromarray(im.numpy()) for im in images], latents, record, maps, warnings)
