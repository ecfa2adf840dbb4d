"""Prompt to PNG: our CLI against diffusers' StableDiffusion3Pipeline, from the same files and seed.

A tiny pipeline (CLIP-L, CLIP-G, T5, MM-DiT with dual attention, VAE) is saved as a diffusers folder and as a
Stability single file with text_encoders/ beside it. Final latents within 1e-5 and PNGs within 1/255.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loaders.pngmeta import read_png_metadata
from scripts.generate import main
from tests._fixtures import tiny_text_pipeline

SIZE = 64
PROMPT = "A red fox, sitting in the snow at dawn!! (golden light)"
NEGATIVE = "blurry, dark"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    return root, tiny_text_pipeline(root)


def reference(pipe, *, cfg, steps, n, t5=True, slg=None, length=32, seed=5):
    from diffusers import StableDiffusion3Pipeline

    if not t5:
        pipe = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=cfg, num_inference_steps=steps,
                  num_images_per_prompt=n, height=SIZE, width=SIZE, max_sequence_length=length)
    if slg:
        kwargs["skip_guidance_layers"] = list(slg)
    run = lambda out: pipe(**kwargs, output_type=out, generator=torch.Generator("cpu").manual_seed(seed))[0]  # noqa: E731
    with torch.no_grad():
        return run("latent"), run("pil")


CASES = {
    "cfg-t5-2images": dict(cfg=4.5, steps=3, n=2, t5=True, slg=None),
    "no-cfg-no-t5": dict(cfg=1.0, steps=2, n=1, t5=False, slg=None),
    "slg": dict(cfg=3.0, steps=10, n=1, t5=True, slg=(1,)),
}


@pytest.mark.parametrize("layout", ["diffusers", "single"])
@pytest.mark.parametrize("case", list(CASES))
def test_prompt_to_png_matches_diffusers(tiny, tmp_path, layout, case):
    root, pipe = tiny
    c = CASES[case]
    lat_ref, img_ref = reference(pipe, cfg=c["cfg"], steps=c["steps"], n=c["n"], t5=c["t5"], slg=c["slg"])
    model = root / "diffusers" if layout == "diffusers" else root / "single" / "model.safetensors"
    args = ["--model", str(model), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--cfg", str(c["cfg"]),
            "--steps", str(c["steps"]), "--num-images", str(c["n"]), "--seed", "5", "--height", str(SIZE),
            "--width", str(SIZE), "--max-sequence-length", "32", "--shift", "3.0", "--device", "cpu",
            "--dtype", "float32", "--out", str(tmp_path / "img.png"), "--save-latents", str(tmp_path / "lat.safetensors"),
            "--quiet", "--slg-layers", ",".join(map(str, c["slg"] or ())), "--slg-scale", "2.8",
            "--slg-start", "0.01", "--slg-stop", "0.2"]
    if not c["t5"]:
        args.append("--no-t5")
    assert main(args) == 0
    lat = load_file(str(tmp_path / "lat.safetensors"))["latents"]
    assert lat.shape == lat_ref.shape
    # float32 rounding differs between CPUs (kernel choice per batch size): relative to the latents' scale
    assert (lat - lat_ref).abs().max() <= 1e-5 * lat_ref.abs().max(), (lat - lat_ref).abs().max()
    paths = [tmp_path / "img.png"] if c["n"] == 1 else [tmp_path / f"img_{i}.png" for i in range(c["n"])]
    for path, ref in zip(paths, img_ref):
        diff = np.abs(np.asarray(Image.open(path)).astype(int) - np.asarray(ref).astype(int)).max()
        assert diff <= 1, diff
    meta = read_png_metadata(paths[-1])
    assert meta["prompt"] == PROMPT and meta["negative_prompt"] == NEGATIVE and meta["seed"] == 5
    assert meta["t5"] is c["t5"] and meta["steps"] == c["steps"] and meta["model"] == str(model)
    assert "Negative prompt: blurry, dark" in meta["parameters"]


def test_tokenizers_flag_and_truncation_warning(tiny, tmp_path, capsys):
    """A single file whose tokenizers live elsewhere (--tokenizers), and a prompt T5 has to cut."""
    root, _ = tiny
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "model.safetensors").symlink_to(root / "single" / "model.safetensors")
    (lonely / "text_encoders").symlink_to(root / "single" / "text_encoders")
    long_prompt = " ".join(["a small blue house by the sea"] * 10)
    args = ["--model", str(lonely / "model.safetensors"), "--prompt", long_prompt, "--steps", "1", "--cfg", "1",
            "--height", "32", "--width", "32", "--max-sequence-length", "16", "--slg-layers", "",
            "--out", str(tmp_path / "x.png")]
    assert main(args + ["--quiet"]) == 2
    assert "--tokenizers" in capsys.readouterr().err  # says how to fix it
    assert main(args + ["--tokenizers", str(root / "tokenizers")]) == 0
    err = capsys.readouterr().err
    assert "T5 keeps 16 tokens" in err and "was cut" in err
    assert (tmp_path / "x.png").exists()


def test_bfloat16_run_writes_an_image(tiny, tmp_path):
    root, _ = tiny
    assert main(["--model", str(root / "diffusers"), "--prompt", PROMPT, "--steps", "2", "--cfg", "2",
                 "--slg-layers", "", "--height", "32", "--width", "32", "--max-sequence-length", "16",
                 "--dtype", "bfloat16", "--out", str(tmp_path / "b.png"), "--quiet"]) == 0
    image = np.asarray(Image.open(tmp_path / "b.png"))
    assert image.shape == (32, 32, 3) and image.std() > 0
    assert read_png_metadata(tmp_path / "b.png")["dtype"] == "bfloat16"


@pytest.mark.parametrize("vae_dtype", ["float32", None])
def test_bfloat16_with_the_vae_in_float32(tiny, tmp_path, vae_dtype):
    """--vae-dtype float32 under --dtype bfloat16: our bfloat16 latents are decoded as diffusers' float32 VAE
    decodes them (latents cast first, then un-normalised). Without it, as its bfloat16 VAE does."""
    import copy

    root, pipe = tiny
    args = ["--model", str(root / "diffusers"), "--prompt", PROMPT, "--steps", "2", "--cfg", "3", "--slg-layers", "",
            "--height", str(SIZE), "--width", str(SIZE), "--max-sequence-length", "32", "--dtype", "bfloat16",
            "--out", str(tmp_path / "b.png"), "--quiet", "--save-latents", str(tmp_path / "b.safetensors")]
    assert main(args + (["--vae-dtype", vae_dtype] if vae_dtype else [])) == 0
    lat = load_file(str(tmp_path / "b.safetensors"))["latents"].to(torch.bfloat16)  # saved as float32: exact
    vae = pipe.vae if vae_dtype == "float32" else copy.deepcopy(pipe.vae).to(torch.bfloat16)
    z = lat.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        expected = pipe.image_processor.postprocess(vae.decode(z, return_dict=False)[0], output_type="pil")[0]
    diff = np.abs(np.asarray(Image.open(tmp_path / "b.png")).astype(int) - np.asarray(expected).astype(int)).max()
    assert diff <= 1, diff
    assert read_png_metadata(tmp_path / "b.png").get("vae_dtype") == vae_dtype
