"""The SD3 VAE (mmdit/vae.py) and its key map (loaders/vae_keys.py) against diffusers' AutoencoderKL.

Tiny random AutoencoderKLs (every weight re-drawn, GroupNorm affine included) are converted to our LDM names
with `vae_from_diffusers`, loaded through `load_weights` into a VAE built on the meta device, and compared in
float32 (decode, encode mean, encode sample with the same generator) and bfloat16. The key map is checked both
ways and against the full-size SD3 configuration (docs/numerics.md §10) built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

from loaders.safetensors import CheckpointError, load_weights
from loaders.vae_keys import VAESettings, vae_config_from_diffusers, vae_from_diffusers, vae_to_diffusers
from mmdit.vae import VAE, VAEConfig, decode, encode, to_uint8

SCALE, SHIFT = 1.5305, 0.0609

# The hub vae/config.json of every SD3 / SD3.5 model (docs/numerics.md §10).
SD3_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": SCALE,
    "shift_factor": SHIFT,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}


@dataclass(frozen=True)
class Tiny:
    widths: tuple[int, ...]
    layers: int
    groups: int
    latent_hw: tuple[int, int]  # non-square on purpose


TINY = {
    # three levels, SD3's 2 (encoder) / 3 (decoder) residual blocks per level, widths with a repeat like SD3's
    "three_levels": Tiny(widths=(8, 16, 16), layers=2, groups=4, latent_hw=(5, 7)),
    # two levels whose widths are not multiples of the first (base 12, multipliers (2, 3)), one block per level
    "two_levels": Tiny(widths=(24, 36), layers=1, groups=6, latent_hw=(6, 3)),
}


def diffusers_vae(spec: Tiny, seed: int = 0) -> AutoencoderKL:
    n = len(spec.widths)
    ref = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=spec.widths,
        layers_per_block=spec.layers,
        latent_channels=16,
        norm_num_groups=spec.groups,
        scaling_factor=SCALE,
        shift_factor=SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:  # GroupNorm affine: far from the 1 / 0 defaults
                p.copy_(1 + 0.3 * noise if name.endswith("weight") else 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return ref.eval()


def ours_from(ref: AutoencoderKL, groups: int, dtype: torch.dtype = torch.float32) -> VAE:
    state = {k: v.clone() for k, v in vae_from_diffusers(ref.state_dict()).items()}
    config = VAEConfig.from_state_dict(state, norm_groups=groups, scaling_factor=SCALE, shift_factor=SHIFT)
    with torch.device("meta"):
        vae = VAE(config)
    return load_weights(vae, state, what="VAE", dtype=dtype, device="cpu")


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request) -> tuple[Tiny, AutoencoderKL, VAE]:
    spec = TINY[request.param]
    ref = diffusers_vae(spec)
    return spec, ref, ours_from(ref, spec.groups)


def latents(spec: Tiny, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, *spec.latent_hw, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# numerics


@torch.no_grad()
def test_decode_matches_diffusers_fp32(pair):
    spec, ref, ours = pair
    z = latents(spec)
    expected = ref.decode(z / SCALE + SHIFT).sample  # the SD3 pipeline's decode (docs/numerics.md §10)
    got = decode(ours, z)
    f = 2 ** (len(spec.widths) - 1)
    assert got.shape == (2, 3, f * spec.latent_hw[0], f * spec.latent_hw[1])
    assert got.dtype == torch.float32
    scale = expected.abs().max().item()
    assert scale > 0.1  # a real signal, not a collapsed output
    assert (got - expected).abs().max().item() <= 1e-5 * scale  # measured: 0 (bit-identical)


@torch.no_grad()
def test_decode_order_is_divide_then_shift(pair):
    spec, ref, ours = pair
    z = latents(spec)
    wrong = ref.decode((z + SHIFT) / SCALE).sample
    assert (decode(ours, z) - wrong).abs().max().item() > 1e-4


@torch.no_grad()
def test_encode_matches_diffusers_fp32(pair):
    spec, ref, ours = pair
    f = 2 ** (len(spec.widths) - 1)
    h, w = f * spec.latent_hw[0], f * spec.latent_hw[1]
    image = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(2)) * 2 - 1
    posterior = ref.encode(image).latent_dist
    mean = encode(ours, image, sample=False)
    torch.testing.assert_close(mean, (posterior.mean - SHIFT) * SCALE, rtol=0, atol=1e-5 * mean.abs().max().item())
    sampled = encode(ours, image, generator=torch.Generator().manual_seed(3))
    # img2img init latents (docs/numerics.md §10)
    expected = (posterior.sample(torch.Generator().manual_seed(3)) - SHIFT) * SCALE
    assert sampled.shape == (2, 16, *spec.latent_hw)
    torch.testing.assert_close(sampled, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert (sampled - mean).abs().max().item() > 1e-3  # the sample really is noisy


@torch.no_grad()
def test_bf16_close_to_diffusers_bf16_and_to_fp32(pair):
    """bf16 weights and latents, as the pipeline runs when the whole model is bf16.

    Against diffusers in bf16 the ops are the same, so the result is expected to be identical (measured: 0);
    allowed: 1 % of the output scale. Against the fp32 reference, bf16's 8-bit mantissa through ~20 layers
    gives ~1 % (measured ≤ 1.9 % on these tiny random nets); allowed: 5 % of the output scale.
    """
    spec, ref, _ = pair
    z = latents(spec).to(torch.bfloat16)
    ours = ours_from(ref, spec.groups, dtype=torch.bfloat16)
    got = decode(ours, z)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    exact = ref.decode(z.float() / SCALE + SHIFT).sample
    scale = exact.abs().max().item()
    ref_bf16 = diffusers_vae(spec).to(torch.bfloat16)  # same seed -> same weights, then rounded
    same_ops = ref_bf16.decode(z / SCALE + SHIFT).sample
    assert (got.float() - same_ops.float()).abs().max().item() <= 0.01 * scale
    assert (got.float() - exact).abs().max().item() <= 0.05 * scale


@torch.no_grad()
def test_fp32_latents_into_bf16_vae_are_cast(pair):
    spec, ref, _ = pair
    ours = ours_from(ref, spec.groups, dtype=torch.bfloat16)
    z = latents(spec)
    got = decode(ours, z)  # diffusers would raise on the dtype mismatch; we cast after un-normalising in fp32
    expected = ours.decoder((z / SCALE + SHIFT).to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------------
# postprocessing


def _diffusers_uint8(image: torch.Tensor) -> np.ndarray:
    as_np = VaeImageProcessor(vae_scale_factor=8).postprocess(image, output_type="np")
    return (as_np * 255).round().astype("uint8")  # what numpy_to_pil does before building the PIL images


def _ties() -> torch.Tensor:
    """Pixels whose [0, 1] value times 255 is exactly k + 0.5 in float32, as decoder outputs in [-1, 1]."""
    found = []
    for k in range(64, 255):  # t in [0.25, 1]: 2t - 1 and back are exact there
        t = torch.tensor((k + 0.5) / 255, dtype=torch.float32)
        for _ in range(4):
            if (t * 255).item() == k + 0.5:
                found.append(2 * t - 1)
                break
            t = torch.nextafter(t, torch.tensor(2.0))
    return torch.stack(found)


def test_to_uint8_matches_diffusers_postprocess():
    g = torch.Generator().manual_seed(4)
    image = torch.randn(2, 3, 9, 11, generator=g) * 0.7  # some values outside [-1, 1] to exercise the clamp
    got = to_uint8(image)
    assert got.dtype == torch.uint8 and got.shape == (2, 9, 11, 3)
    assert np.array_equal(got.numpy(), _diffusers_uint8(image))
    assert got.min() == 0 and got.max() == 255

    bf16 = image.to(torch.bfloat16)  # denormalised in bf16 before the float32 cast, as diffusers does
    assert np.array_equal(to_uint8(bf16).numpy(), _diffusers_uint8(bf16))


def test_to_uint8_rounds_half_to_even():
    ties = _ties()
    assert len(ties) >= 20
    image = ties.reshape(1, 1, 1, -1).expand(1, 3, 1, -1)
    got = to_uint8(image)[0, 0, :, 0]
    halves = ((ties * 0.5 + 0.5) * 255).double()
    assert torch.equal(halves - halves.floor(), torch.full_like(halves, 0.5))
    assert torch.equal(got.double(), torch.round(halves))  # half to even
    assert (got.double() != (halves + 0.5).floor()).any()  # round-half-up would differ somewhere
    assert np.array_equal(to_uint8(image).numpy(), _diffusers_uint8(image))


# ---------------------------------------------------------------------------------------------------------------
# key map and config inference


def test_key_map_round_trip(pair):
    _, ref, _ = pair
    theirs = ref.state_dict()
    ours = vae_from_diffusers(theirs)
    back = vae_to_diffusers(ours)
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) and back[k].shape == theirs[k].shape for k in theirs)
    again = vae_from_diffusers(back)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)
    assert ours["decoder.mid.attn_1.q.weight"].ndim == 4
    assert theirs["decoder.mid_block.attentions.0.to_q.weight"].ndim == 2


def test_decoder_levels_are_reversed():
    ref = diffusers_vae(TINY["three_levels"])
    ours = vae_from_diffusers(ref.state_dict())
    theirs = ref.state_dict()
    # up_blocks.0 runs first, at the lowest resolution: it is LDM's up.2 (of 3) and has the upsampler
    pairs = {
        "decoder.up.2.block.1.conv1.weight": "decoder.up_blocks.0.resnets.1.conv1.weight",
        "decoder.up.0.block.0.nin_shortcut.bias": "decoder.up_blocks.2.resnets.0.conv_shortcut.bias",
        "decoder.up.1.upsample.conv.weight": "decoder.up_blocks.1.upsamplers.0.conv.weight",
    }
    assert all(torch.equal(ours[a], theirs[b]) for a, b in pairs.items())
    assert "decoder.up.2.upsample.conv.weight" in ours and "decoder.up.0.upsample.conv.weight" not in ours


def test_real_sd3_key_set_and_shapes():
    """The full-size SD3 AutoencoderKL (meta device: no memory) maps onto exactly our module's tensors."""
    kwargs = {k: v for k, v in SD3_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = AutoencoderKL(**kwargs)
    mapped = vae_from_diffusers(ref.state_dict())
    config = VAEConfig.from_state_dict(mapped)
    assert config == VAEConfig()  # the defaults are SD3's
    assert config.widths == (128, 256, 512, 512) and config.downsampling == 8
    with torch.device("meta"):
        ours = VAE(config)
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected
    # spot checks against the original file's layout (docs/numerics.md §10, §11.3)
    assert expected["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert expected["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert expected["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert expected["decoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert expected["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert expected["encoder.down.2.block.0.nin_shortcut.weight"] == (512, 256, 1, 1)
    resamplers = {k.rsplit(".", 3)[0] for k in expected if "sample.conv" in k}
    assert resamplers == {f"decoder.up.{k}" for k in (1, 2, 3)} | {f"encoder.down.{i}" for i in (0, 1, 2)}
    assert len(expected) == len(ref.state_dict())


def test_config_inference_and_decoder_only():
    ref = diffusers_vae(TINY["two_levels"])
    full = vae_from_diffusers(ref.state_dict())
    config = VAEConfig.from_state_dict(full, norm_groups=6, scaling_factor=0.5, shift_factor=-0.25)
    assert (config.base_channels, config.channel_multipliers, config.widths) == (12, (2, 3), (24, 36))
    assert (config.num_res_blocks, config.latent_channels, config.image_channels) == (1, 16, 3)
    assert (config.scaling_factor, config.shift_factor, config.has_encoder) == (0.5, -0.25, True)

    decoder_only = {k: v.clone() for k, v in full.items() if k.startswith("decoder.")}
    config = VAEConfig.from_state_dict(decoder_only, norm_groups=6)
    assert not config.has_encoder
    with torch.device("meta"):
        vae = VAE(config)
    vae = load_weights(vae, decoder_only, what="VAE decoder", dtype=torch.float32, device="cpu")
    z = latents(TINY["two_levels"], batch=1)
    with torch.no_grad():
        assert torch.equal(decode(vae, z), ref.decode(z / SCALE + SHIFT).sample)
        with pytest.raises(ValueError, match="no encoder"):
            encode(vae, torch.zeros(1, 3, 12, 6))


def test_clear_errors():
    ref = diffusers_vae(TINY["three_levels"])
    theirs = ref.state_dict()
    ours = vae_from_diffusers(theirs)
    with pytest.raises(ValueError, match="vae_from_diffusers"):
        VAEConfig.from_state_dict(theirs, norm_groups=4)
    with pytest.raises(ValueError, match="prefix"):
        VAEConfig.from_state_dict({f"first_stage_model.{k}": v for k, v in ours.items()}, norm_groups=4)
    with pytest.raises(ValueError, match="norm_groups=32 does not divide"):
        VAEConfig.from_state_dict(ours)  # the tiny model has 8-wide levels
    with pytest.raises(CheckpointError, match="quant_conv"):
        vae_from_diffusers({**theirs, "quant_conv.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(CheckpointError, match="already use the ldm names"):
        vae_from_diffusers(ours)
    with pytest.raises(CheckpointError, match="numbered 0..n-1"):
        vae_from_diffusers({k.replace("up_blocks.1.", "up_blocks.5."): v for k, v in theirs.items()})
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        decode(ours_from(ref, 4), torch.zeros(1, 4, 8, 8))


def test_vae_config_from_diffusers():
    assert vae_config_from_diffusers(SD3_CONFIG) == VAESettings(SCALE, SHIFT, norm_groups=32)
    assert vae_config_from_diffusers({**SD3_CONFIG, "shift_factor": None, "norm_num_groups": 4}) == VAESettings(
        scaling_factor=SCALE, shift_factor=0.0, norm_groups=4
    )
    without_quant_flags = {k: v for k, v in SD3_CONFIG.items() if "quant_conv" not in k}
    with pytest.raises(CheckpointError, match="use_quant_conv"):
        vae_config_from_diffusers(without_quant_flags)  # diffusers' default is True: there would be quant convs
    with pytest.raises(CheckpointError, match="act_fn"):
        vae_config_from_diffusers({**SD3_CONFIG, "act_fn": "gelu"})
    with pytest.raises(CheckpointError, match="AsymmetricAutoencoderKL"):
        vae_config_from_diffusers({**SD3_CONFIG, "_class_name": "AsymmetricAutoencoderKL"})
