"""The 16-channel KL autoencoder of SD3 / SD3.5: image <-> latent.

The LDM "KL-f8" autoencoder (Rombach et al. 2022, §3) with 16 latent channels, as diffusers' `AutoencoderKL`
and Stability's `SDVAE` (`sd3_impls.py`) build it for SD3 (docs/numerics.md §10). Module names are the Stability
single-file names after `first_stage_model.` (decoder levels indexed by resolution: `decoder.up.0` is the full
resolution and runs last; docs/numerics.md §11.3). `decode` / `encode` also undo / apply the latent normalisation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUP_NORM_EPS = 1e-6  # every GroupNorm in this VAE (not PyTorch's default 1e-5)
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance is clamped before exp (docs/numerics.md §10)


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the autoencoder plus the latent normalisation the diffusion model was trained with.

    Level widths are `base_channels * m` for m in `channel_multipliers` (LDM's `ch` and `ch_mult`); the encoder
    has `num_res_blocks` residual blocks per level and the decoder one more. The image is downsampled by
    2 ** (levels - 1): 8 for the four-level SD3 VAE.
    """

    latent_channels: int = 16
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    image_channels: int = 3
    has_encoder: bool = True
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609

    def __post_init__(self) -> None:
        if self.norm_groups < 1:
            raise ValueError(f"norm_groups must be a positive group count, got {self.norm_groups}")
        bad = [w for w in self.widths if w % self.norm_groups]
        if bad:
            raise ValueError(
                f"norm_groups={self.norm_groups} does not divide the level width(s) {bad}: GroupNorm needs whole "
                "groups. Pass the norm_groups the VAE was trained with (diffusers vae/config.json "
                "'norm_num_groups'; 32 for SD3)."
            )
        if self.num_res_blocks < 1 or not self.channel_multipliers:
            raise ValueError(f"a VAE needs at least one level and one residual block per level, got {self}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each level, full resolution first: (128, 256, 512, 512) for SD3."""
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def downsampling(self) -> int:
        """Pixels per latent cell along each axis (8 for SD3)."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, Tensor],
        *,
        norm_groups: int = 32,
        scaling_factor: float = 1.5305,
        shift_factor: float = 0.0609,
    ) -> VAEConfig:
        """Infer the shape from LDM-named keys (prefix already stripped); only keys and shapes are read.

        GroupNorm's group count and the latent scale/shift are not visible in the weights, so they are
        arguments (defaults: SD3). A state dict without `encoder.*` keys gives a decoder-only VAE.
        """
        if any(".up_blocks." in k or ".mid_block." in k for k in sd):
            raise ValueError(
                "these are diffusers AutoencoderKL names: convert them with loaders.vae_keys.vae_from_diffusers"
            )
        if any(k.startswith(("first_stage_model.", "vae.")) for k in sd):
            raise ValueError("the keys still carry the 'first_stage_model.' prefix: read them with it stripped")
        if "decoder.conv_in.weight" not in sd:
            raise ValueError("not a VAE state dict with LDM names: there is no 'decoder.conv_in.weight'")

        blocks: dict[int, set[int]] = {}  # decoder level -> indices of its residual blocks
        for key in sd:
            m = re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.", key)
            if m:
                blocks.setdefault(int(m[1]), set()).add(int(m[2]))
        levels = len(blocks)
        if sorted(blocks) != list(range(levels)) or levels == 0:
            raise ValueError(f"decoder levels (decoder.up.N) must be numbered 0..n-1, found {sorted(blocks)}")
        counts = {len(b) for b in blocks.values()}
        if len(counts) != 1:
            raise ValueError(f"decoder levels have different numbers of residual blocks: {blocks}")

        widths = [sd[f"decoder.up.{k}.block.0.conv1.weight"].shape[0] for k in range(levels)]
        base = math.gcd(*widths)
        return cls(
            latent_channels=sd["decoder.conv_in.weight"].shape[1],
            base_channels=base,
            channel_multipliers=tuple(w // base for w in widths),
            num_res_blocks=counts.pop() - 1,
            norm_groups=norm_groups,
            image_channels=sd["decoder.conv_out.weight"].shape[0],
            has_encoder=any(k.startswith("encoder.") for k in sd),
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
        )


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), with x passed through a 1x1 conv when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # no dropout at inference
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with a residual.

    The checkpoint stores q, k, v and proj_out as 1x1 convolutions (C, C, 1, 1). A 1x1 conv is the same map as
    a linear layer applied to every pixel, and we apply it that way, to the (B, hw, C) token matrix, because
    that is how diffusers computes it, so the float rounding matches its linear layers.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    @staticmethod
    def _pointwise(conv: nn.Conv2d, tokens: Tensor) -> Tensor:
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)  # (C, C, 1, 1) kernel -> (C, C) matrix

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x.flatten(2)).transpose(1, 2)  # (B, hw, C)
        # (B, 1, hw, C) each
        q, k, v = (self._pointwise(conv, tokens).unsqueeze(1) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # one head of width C: softmax(q kᵀ / √C) v
        out = self._pointwise(self.proj_out, out.squeeze(1))  # (B, hw, C)
        # A channels-last view, residual added second: diffusers' layout and rounding (docs/numerics.md §10).
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    """ResnetBlock -> attention -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3: (B, C, h, w) -> (B, C, 2h, 2w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """Pad one zero row/column at the bottom/right, then a stride-2 conv3x3: (B, C, h, w) -> (B, C, ⌈h/2⌉, ⌈w/2⌉).

    The asymmetric padding is LDM's; a symmetric padding=1 conv would shift the sampling grid by half a pixel.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class EncoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, downsample: bool):
        super().__init__()
        ins = [in_channels] + [out_channels] * (num_blocks - 1)
        self.block = nn.ModuleList(ResnetBlock(c, out_channels, groups) for c in ins)
        self.downsample = Downsample(out_channels) if downsample else None


class DecoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, upsample: bool):
        super().__init__()
        ins = [in_channels] + [out_channels] * (num_blocks - 1)
        self.block = nn.ModuleList(ResnetBlock(c, out_channels, groups) for c in ins)
        self.upsample = Upsample(out_channels) if upsample else None


class Encoder(nn.Module):
    """(B, 3, H, W) image -> (B, 2·latent, H/f, W/f) posterior moments (mean ‖ log-variance)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.widths, config.norm_groups
        self.conv_in = nn.Conv2d(config.image_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(widths[max(i - 1, 0)], w, config.num_res_blocks, groups, downsample=i < len(widths) - 1)
            for i, w in enumerate(widths)
        )
        self.mid = MidBlock(widths[-1], groups)
        self.norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:  # full resolution first
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, latent, h, w) -> (B, 3, f·h, f·w) image, roughly in [-1, 1]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups, n = config.widths, config.norm_groups, len(config.widths)
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], groups)
        # Level k reads what level k+1 produced (the lowest level reads the mid block); all but up.0 upsample.
        self.up = nn.ModuleList(
            DecoderLevel(widths[min(k + 1, n - 1)], w, config.num_res_blocks + 1, groups, upsample=k > 0)
            for k, w in enumerate(widths)
        )
        self.norm_out = group_norm(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], config.image_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # lowest resolution first: up.{n-1} ... up.0
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """The autoencoder: `decoder` always, `encoder` unless the config is decoder-only."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config) if config.has_encoder else None
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype


def _check_input(x: Tensor, channels: int, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"expected {what} of shape (B, {channels}, H, W), got {tuple(x.shape)}")


def decode(vae: VAE, latents: Tensor) -> Tensor:
    """Diffusion latents (B, 16, h, w) -> image (B, 3, 8h, 8w) in roughly [-1, 1] (docs/numerics.md §10).

    The un-normalisation `latents / scaling_factor + shift_factor` runs in the wider of the latents' and the
    VAE's dtypes, and the result is cast to the VAE's. When the dtypes agree (diffusers' SD3 pipelines, which never
    cast) this is exactly their computation; a float32 VAE under a bfloat16 model (`--vae-dtype float32`) gets its
    latents cast first, as diffusers' SDXL pipeline does when it upcasts its VAE (`upcast_vae`).
    """
    _check_input(latents, vae.config.latent_channels, "latents")
    z = latents.to(torch.promote_types(latents.dtype, vae.dtype)) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decoder(z.to(vae.dtype))


def encode(vae: VAE, image: Tensor, *, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
    """Image (B, 3, H, W) in [-1, 1] -> diffusion latents (B, 16, H/8, W/8) (docs/numerics.md §10).

    `sample=True` draws from the posterior, mean + exp(logvar / 2) · ε, with ε drawn on the generator's device
    in the VAE's dtype (diffusers' `latent_dist.sample(generator)`); `sample=False` takes the mean. The latent
    is then normalised as the diffusion model expects: (z - shift_factor) · scaling_factor.
    """
    if vae.encoder is None:
        raise ValueError("this VAE has no encoder (it was built decoder-only); load the encoder.* weights too")
    _check_input(image, vae.config.image_channels, "image")
    moments = vae.encoder(image.to(vae.dtype))  # (B, 2·latent, h, w)
    mean, logvar = moments.chunk(2, dim=1)
    z = mean
    if sample:
        std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
        noise_device = generator.device if generator is not None else moments.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=moments.dtype)
        z = mean + std * noise.to(moments.device)
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def to_uint8(image: Tensor) -> Tensor:
    """Decoder output (B, 3, H, W) -> (B, H, W, 3) uint8, as diffusers' postprocess + PIL conversion does it.

    [-1, 1] -> [0, 1] with clamping in the image's own dtype, then float32, ·255, round half to even
    (torch.round, like numpy's), then uint8. (The Stability reference truncates instead of rounding; we follow
    diffusers.)
    """
    x = (image * 0.5 + 0.5).clamp(0, 1)
    x = x.permute(0, 2, 3, 1).float()
    return (x * 255).round().to(torch.uint8)
