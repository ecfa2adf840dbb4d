"""Image-to-image, inpainting and DPM-Solver++(2M), each against its reference.

* img2img: `Pipeline(init_image=..., strength=...)` vs diffusers' `StableDiffusion3Img2ImgPipeline`;
* inpainting: `Pipeline(..., mask=...)` vs `StableDiffusion3InpaintPipeline` (latents; its PNG, see below);
* dpmpp_2m: our loop vs k-diffusion's `sample_dpmpp_2m` over the same sigmas, denoiser x0 = x − σ·v.

The tiny pipeline of tests/_fixtures.py, in both layouts, float32: final latents within 1e-5 of the reference's
scale and PNGs within 1/255, as for text-to-image.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loaders import Pipeline
from mmdit.conditioning import Conditioning
from mmdit.errors import InputError
from samplers import Guidance, first_step, initial_noise, sample, sigmas
from tests._fixtures import tiny_text_pipeline

SIZE = 64
PROMPT = "a small red house by a blue lake"
NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("img2img")
    pipe = tiny_text_pipeline(root)
    g = np.random.default_rng(0)
    # 80x72: not the output size, so both sides resize it (Lanczos) to 64x64
    Image.fromarray(g.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(root / "init.png")
    mask = np.zeros((72, 80), np.uint8)
    mask[20:60, 10:50] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root, pipe


def ours(root: Path, layout: str):
    model = root / "diffusers" if layout == "diffusers" else root / "single" / "model.safetensors"
    return Pipeline.load(model, device="cpu")


def close(lat, ref, png, ref_png):
    assert lat.shape == ref.shape
    assert (lat - ref).abs().max() <= 1e-5 * ref.abs().max(), (lat - ref).abs().max()
    for image, expected in zip(png, ref_png, strict=True):
        diff = np.abs(np.asarray(image).astype(int) - np.asarray(expected).astype(int)).max()
        assert diff <= 1, diff


def decode_like_text_to_image(pipe, latents):
    """diffusers' text-to-image decode: un-normalise with scale *and* shift, decode, post-process."""
    z = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    with torch.no_grad():
        return pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="pil")


CASES = {"strength-0.6-cfg": dict(strength=0.6, cfg=4.5, steps=5, n=1),
         "strength-1-two-images": dict(strength=1.0, cfg=3.0, steps=3, n=2),
         "strength-0.3-no-cfg": dict(strength=0.3, cfg=1.0, steps=7, n=1)}


@pytest.mark.parametrize("layout", ["diffusers", "single"])
@pytest.mark.parametrize("case", list(CASES))
def test_img2img_matches_diffusers(tiny, layout, case):
    from diffusers import StableDiffusion3Img2ImgPipeline

    root, pipe = tiny
    c = CASES[case]
    ref = StableDiffusion3Img2ImgPipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.open(root / "init.png"), strength=c["strength"],
                  guidance_scale=c["cfg"], num_inference_steps=c["steps"], num_images_per_prompt=c["n"], height=SIZE,
                  width=SIZE, max_sequence_length=32)
    with torch.no_grad():
        lat_ref = ref(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(3))[0]
        png_ref = ref(**kwargs, output_type="pil", generator=torch.Generator().manual_seed(3))[0]
    calls = []
    result = ours(root, layout)(PROMPT, negative_prompt=NEGATIVE, init_image=root / "init.png", strength=c["strength"],
                                cfg=c["cfg"], steps=c["steps"], num_images=c["n"], height=SIZE, width=SIZE,
                                max_sequence_length=32, seed=3, slg_layers=(), callback=lambda i, x: calls.append(i))
    close(result.latents, lat_ref, result.images, png_ref)
    start = first_step(c["steps"], c["strength"])
    assert calls == list(range(start, c["steps"]))  # only the steps after the strength's start run
    assert result.record["init_image"] == str(root / "init.png") and result.record["strength"] == c["strength"]


@pytest.mark.parametrize("layout", ["diffusers", "single"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_matches_diffusers(tiny, layout, strength):
    from diffusers import StableDiffusion3InpaintPipeline

    root, pipe = tiny
    ref = StableDiffusion3InpaintPipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.open(root / "init.png"),
                  mask_image=Image.open(root / "mask.png"), strength=strength, guidance_scale=4.0,
                  num_inference_steps=4, height=SIZE, width=SIZE, max_sequence_length=32)
    with torch.no_grad():
        lat_ref = ref(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(9))[0]
        png_diffusers = ref(**kwargs, output_type="pil", generator=torch.Generator().manual_seed(9))[0]
    result = ours(root, layout)(PROMPT, negative_prompt=NEGATIVE, init_image=root / "init.png", mask=root / "mask.png",
                                strength=strength, cfg=4.0, steps=4, height=SIZE, width=SIZE, max_sequence_length=32,
                                seed=9, slg_layers=())
    # The inpainting pipeline decodes latents / scaling_factor without adding shift_factor back (unlike its
    # text-to-image and img2img pipelines); we decode every image the same, correct way, so the PNG is compared
    # with diffusers' latents decoded as text-to-image decodes them, and differs from the inpainting pipeline's.
    close(result.latents, lat_ref, result.images, decode_like_text_to_image(pipe, lat_ref))
    diff = np.abs(np.asarray(result.images[0]).astype(int) - np.asarray(png_diffusers[0]).astype(int)).max()
    assert diff > 1  # the missing shift is visible: if this fails, diffusers fixed it and we should follow
    assert result.record["mask"] == str(root / "mask.png")


def test_inpainting_keeps_the_unmasked_latent_and_works_with_a_layout(tiny):
    root, _ = tiny
    pipe = ours(root, "single")
    common = dict(init_image=root / "init.png", mask=root / "mask.png", strength=1.0, cfg=4.0, steps=3,
                  height=SIZE, width=SIZE, max_sequence_length=32, seed=1, slg_layers=())
    plain = pipe(PROMPT, **common)
    layout = {"regions": [{"phrase": "red house", "box": [0.1, 0.2, 0.6, 0.8]}]}
    steered = pipe(PROMPT, layout=layout, **common)
    assert not torch.equal(plain.latents, steered.latents)
    # Outside the (latent-resolution) mask both runs end on the init image's own latent.
    from loaders.images import read_init_image, read_mask
    from mmdit.vae import encode

    mask = torch.nn.functional.interpolate(read_mask(root / "mask.png", SIZE, SIZE), size=(8, 8))
    x0 = encode(pipe.autoencoder(), read_init_image(root / "init.png", SIZE, SIZE),
                generator=torch.Generator().manual_seed(1))
    keep = mask.expand_as(x0) == 0
    assert torch.equal(plain.latents[keep], x0[keep]) and torch.equal(steered.latents[keep], x0[keep])


def test_bad_image_inputs_say_what_is_wrong(tiny, tmp_path):
    root, _ = tiny
    pipe = ours(root, "single")
    common = dict(steps=2, cfg=1.0, height=SIZE, width=SIZE, max_sequence_length=32, slg_layers=())
    for strength in (0.0, 1.5, -0.2):
        with pytest.raises(InputError, match=r"strength must be in \(0, 1\]"):
            pipe(PROMPT, init_image=root / "init.png", strength=strength, **common)
    assert first_step(2, 0.1) == 1 and first_step(28, 1e-6) == 27  # a tiny strength still runs one step
    Image.fromarray(np.dstack([np.full((8, 8), v, np.uint8) for v in (255, 0, 0)])).save(tmp_path / "red.png")
    with pytest.raises(InputError, match="mask must be greyscale"):
        pipe(PROMPT, init_image=root / "init.png", mask=tmp_path / "red.png", **common)
    Image.new("L", (8, 8), 0).save(tmp_path / "black.png")
    with pytest.raises(InputError, match="black everywhere"):
        pipe(PROMPT, init_image=root / "init.png", mask=tmp_path / "black.png", **common)
    with pytest.raises(InputError, match="needs an init image"):
        pipe(PROMPT, mask=root / "mask.png", **common)
    with pytest.raises(InputError, match="does not exist"):
        pipe(PROMPT, init_image=tmp_path / "nothing.png", **common)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        pipe(PROMPT, init_image=tmp_path / "text.png", **common)
    # A greyscale mask saved as RGB is fine, and the output size defaults to the init image's, rounded to 16.
    grey = np.asarray(Image.open(root / "mask.png"))
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "grey_rgb.png")
    result = pipe(PROMPT, init_image=root / "init.png", mask=tmp_path / "grey_rgb.png", steps=2, cfg=1.0,
                  max_sequence_length=32, slg_layers=())
    assert result.images[0].size == (80, 64)  # 80x72 -> 80x64


# ----------------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) against k-diffusion


def k_diffusion_sampling():
    """k-diffusion's sampling module, without its package __init__ (which imports its training stack:
    torchvision, kornia, clean-fid, wandb); sample_dpmpp_2m itself needs only torch."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.fail("k-diffusion is not installed: run the tests with bash scripts/test.sh (scripts/_env.sh installs it)")
    folder = Path(spec.origin).parent
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils")}
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    try:
        module_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", folder / "sampling.py")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


def velocity(x, t, context):
    """A smooth stand-in for the MM-DiT: depends on x, t and the conditioning."""
    return torch.tanh(x * (1 + t[:, None, None, None] / 1000) + context.mean(dim=(1, 2))[:, None, None, None]) - 0.3 * x


@pytest.mark.parametrize("cfg_scale", [1.0, 4.5])
@pytest.mark.parametrize("steps", [1, 2, 10, 28])
def test_dpmpp_2m_matches_k_diffusion(steps, cfg_scale):
    kd = k_diffusion_sampling()
    g = torch.Generator().manual_seed(0)
    pos = Conditioning(torch.randn(2, 5, 8, generator=g), torch.randn(2, 4, generator=g))
    neg = Conditioning(torch.randn(2, 5, 8, generator=g), torch.randn(2, 4, generator=g))
    guidance = Guidance(cfg_scale)
    noise = initial_noise(2, 32, 32, seed=4)
    s = sigmas(steps, 3.0)

    def denoise(x, t, cond, call):
        return velocity(x, t, cond.context)

    got = sample(denoise, noise, s, pos, neg if guidance.cfg_on else None, guidance, sampler="dpmpp_2m")

    def x0_model(x, sigma):  # k-diffusion calls the denoiser with σ (B,); CFG on velocities, then x0 = x − σ·v
        t = sigma * 1000
        v = velocity(x, t, pos.context)
        if guidance.cfg_on:
            v_u = velocity(x, t, neg.context)
            v = v_u + cfg_scale * (v - v_u)
        return x - sigma[:, None, None, None] * v

    expected = kd.sample_dpmpp_2m(x0_model, noise.clone(), s, disable=True)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6 * expected.abs().max()), (got - expected).abs().max()
    # With one or two steps every step is first order (the first, and the one landing on σ = 0), which is Euler.
    euler = sample(denoise, noise, s, pos, neg if guidance.cfg_on else None, guidance)
    assert torch.allclose(got, euler, atol=1e-5) == (steps <= 2)


def test_unknown_sampler_is_an_input_error():
    noise = initial_noise(1, 16, 16, seed=0)
    cond = Conditioning(torch.zeros(1, 2, 4), torch.zeros(1, 3))
    with pytest.raises(InputError, match="unknown sampler 'heun'"):
        sample(lambda x, t, c, call: x, noise, sigmas(2, 3.0), cond, None, Guidance(1.0), sampler="heun")


def test_cli_img2img_and_inpainting_equal_the_pipeline(tiny, tmp_path):
    from loaders.pngmeta import read_png_metadata
    from scripts.generate import main

    root, _ = tiny
    model = root / "single" / "model.safetensors"
    result = Pipeline.load(model, device="cpu")(PROMPT, init_image=root / "init.png", mask=root / "mask.png",
                                                strength=0.8, steps=3, cfg=2.0, seed=2, max_sequence_length=32,
                                                slg_layers=(), sampler="dpmpp_2m")
    args = ["--model", str(model), "--prompt", PROMPT, "--init-image", str(root / "init.png"), "--mask",
            str(root / "mask.png"), "--strength", "0.8", "--steps", "3", "--cfg", "2", "--seed", "2",
            "--max-sequence-length", "32", "--slg-layers", "", "--sampler", "dpmpp_2m", "--device", "cpu",
            "--out", str(tmp_path / "x.png"), "--quiet"]
    assert main(args) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), np.asarray(result.images[0]))
    meta = read_png_metadata(tmp_path / "x.png")
    assert meta["strength"] == 0.8 and meta["sampler"] == "dpmpp_2m" and meta["mask"] == str(root / "mask.png")
    assert main(args[:-3] + ["--strength", "2", "--out", str(tmp_path / "y.png"), "--quiet"]) == 2  # input error
