"""End to end from precomputed embeddings: our CLI vs diffusers' StableDiffusion3Pipeline, both layouts.

One tiny random transformer + VAE is saved twice: with diffusers' `save_pretrained` (a diffusers folder) and,
through our key maps, as a Stability single file. From the same embeddings and seed, our final latents and
PNG must equal the pipeline's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from loaders.pngmeta import read_png_metadata
from scripts.generate import main
from tests._fixtures import diffusers_transformer, diffusers_vae, write_single_file

SIZE = 64  # pixels; latents 8x8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp("tiny")
    transformer = diffusers_transformer("sd3.5-medium")
    vae = diffusers_vae()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "diffusers")
    write_single_file(root / "tiny_sd35m.safetensors", transformer.state_dict(), vae.state_dict())
    g = torch.Generator().manual_seed(7)
    embeds = {
        "prompt_embeds": torch.randn(2, 9, 64, generator=g), "pooled_prompt_embeds": torch.randn(2, 48, generator=g),
        "negative_prompt_embeds": torch.randn(2, 9, 64, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(2, 48, generator=g),
    }
    save_file(embeds, str(root / "embeds.safetensors"))
    return root, pipe, embeds


def reference(pipe, embeds, *, cfg, steps, seed, slg=None):
    kwargs = dict(prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
                  guidance_scale=cfg, num_inference_steps=steps, height=SIZE, width=SIZE)
    if cfg > 1:
        kwargs.update(negative_prompt_embeds=embeds["negative_prompt_embeds"],
                      negative_pooled_prompt_embeds=embeds["negative_pooled_prompt_embeds"])
    if slg:
        kwargs.update(skip_guidance_layers=list(slg))
    run = lambda out: pipe(**kwargs, output_type=out, generator=torch.Generator("cpu").manual_seed(seed))[0]  # noqa: E731
    with torch.no_grad():
        return run("latent"), run("pil")


CASES = {
    "cfg": dict(cfg=4.5, steps=4, slg=None),
    "no-cfg": dict(cfg=1.0, steps=3, slg=None),
    "slg": dict(cfg=3.0, steps=10, slg=(1,)),  # active on step 1 only (0.1 < i < 2)
}


@pytest.mark.parametrize("layout", ["diffusers", "single"])
@pytest.mark.parametrize("case", list(CASES))
def test_cli_matches_diffusers_pipeline(tiny, tmp_path, layout, case):
    root, pipe, embeds = tiny
    c = CASES[case]
    latents_ref, images_ref = reference(pipe, embeds, cfg=c["cfg"], steps=c["steps"], seed=3, slg=c["slg"])
    model = root / ("diffusers" if layout == "diffusers" else "tiny_sd35m.safetensors")
    args = ["--model", str(model), "--prompt-embeds", str(root / "embeds.safetensors"), "--steps", str(c["steps"]),
            "--cfg", str(c["cfg"]), "--seed", "3", "--height", str(SIZE), "--width", str(SIZE),
            "--out", str(tmp_path / "img.png"), "--save-latents", str(tmp_path / "lat.safetensors"), "--quiet",
            "--slg-layers", ",".join(map(str, c["slg"] or ()))]
    assert main(args) == 0
    ours = load_file(str(tmp_path / "lat.safetensors"))["latents"]
    assert ours.shape == latents_ref.shape == (2, 16, SIZE // 8, SIZE // 8)
    assert (ours - latents_ref).abs().max() <= 1e-5
    for i in range(2):
        png = np.asarray(Image.open(tmp_path / f"img_{i}.png"))
        diff = np.abs(png.astype(int) - np.asarray(images_ref[i]).astype(int)).max()
        assert diff <= 1, diff
    meta = read_png_metadata(tmp_path / "img_1.png")
    assert (meta["seed"], meta["steps"], meta["cfg"], meta["image_index"]) == (3, c["steps"], c["cfg"], 1)
    assert "Steps: " in meta["parameters"]


def test_existing_output_is_not_overwritten(tiny, tmp_path, capsys):
    root, _, _ = tiny
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    args = ["--model", str(root / "diffusers"), "--prompt-embeds", str(root / "embeds.safetensors"),
            "--steps", "1", "--height", str(SIZE), "--width", str(SIZE), "--quiet", "--slg-layers", "",
            "--num-images", "1", "--out", str(out)]
    embeds_one = {k: v[:1] for k, v in tiny[2].items()}
    save_file(embeds_one, str(tmp_path / "one.safetensors"))
    args[3] = str(tmp_path / "one.safetensors")
    assert main(args) == 2
    assert "already exist" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(args + ["--overwrite"]) == 0
    assert out.read_bytes() != b"precious"


def test_missing_negative_embeddings_is_explained(tiny, tmp_path, capsys):
    root, _, embeds = tiny
    save_file({k: embeds[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}, str(tmp_path / "pos.safetensors"))
    code = main(["--model", str(root / "diffusers"), "--prompt-embeds", str(tmp_path / "pos.safetensors"),
                 "--cfg", "4", "--steps", "1", "--slg-layers", "", "--height", "64", "--width", "64",
                 "--out", str(tmp_path / "x.png"), "--quiet"])
    assert code == 2
    assert "negative_prompt_embeds" in capsys.readouterr().err
