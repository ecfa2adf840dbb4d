"""scripts/parity.py and scripts/tour.py on tiny models.

* parity.py with no arguments (the built-in model, a Stability single file) passes every row; a tiny pipeline
  saved by diffusers/transformers (`save_pretrained`, the diffusers layout) passes too; when what our engine reads
  is perturbed (the reference reads the files with safetensors itself, our engine through `loaders`), the rows
  of the perturbed components fail, by name, with exit status 1, and the others still pass.
* tour.py: the shapes it reports are those of the real pipeline, observed by running `encode_prompts`,
  `generate_latents` and `decode_images` with forward hooks on the MM-DiT (hooks are fine in a test, they only
  watch), its final latents and image are the pipeline's, and its `module:function` names resolve to real code.
"""

from __future__ import annotations

import importlib
import json
import re

import pytest
import torch

from scripts import parity, tour
from tests._fixtures import tiny_text_pipeline

ALL = set(parity.COMPONENTS)


def _rows(path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    return {r["component"]: r for r in data["rows"]}


def test_parity_builtin_no_arguments_all_pass(tmp_path, capsys):
    code = parity.main(["--json", str(tmp_path / "parity.json"), "--quiet"])
    out = capsys.readouterr().out
    rows = _rows(tmp_path / "parity.json")
    assert code == 0, out
    assert set(rows) == ALL
    for r in rows.values():
        assert r["passed"] and r["relative"] <= r["tolerance"], r
        expected = {"png": 1 / 255, "sampling": 1e-4}.get(r["component"], 1e-5)  # float32 tolerances
        assert r["tolerance"] == expected
    assert "all rows pass" in out
    for label in parity.COMPONENTS.values():
        assert re.search(rf"^{re.escape(label)}\s+\S+\s+\S+\s+\S+\s+pass", out, re.M), label


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    tiny_text_pipeline(root)
    return root


SMALL = ["--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "32", "--quiet"]


@pytest.mark.parametrize("layout", ["diffusers", "single"])
def test_parity_tiny_pipeline_both_layouts(tiny_model, tmp_path, layout):
    model = tiny_model / "diffusers" if layout == "diffusers" else tiny_model / "single" / "model.safetensors"
    code = parity.main(["--model", str(model), *SMALL, "--json", str(tmp_path / "p.json")])
    rows = _rows(tmp_path / "p.json")
    assert code == 0 and set(rows) == ALL and all(r["passed"] for r in rows.values()), rows
    assert json.loads((tmp_path / "p.json").read_text())["layout"] == (
        "diffusers folder" if layout == "diffusers" else "single file")


def test_parity_catches_perturbed_weights(monkeypatch, tmp_path, capsys):
    """Our engine reads a CLIP-G norm weight and one MM-DiT weight 1% off; diffusers reads the file as it is."""
    import loaders.checkpoint
    import loaders.text_encoder_keys
    from loaders.builtin import FILE_NAME

    def perturbing(read, key, file_name):
        def read_tensors(files, *args, **kwargs):
            state = read(files, *args, **kwargs)
            if key in state and file_name in str(files):
                state[key] = state[key] * 1.01
            return state
        return read_tensors

    monkeypatch.setattr(loaders.checkpoint, "read_tensors", perturbing(
        loaders.checkpoint.read_tensors, "joint_blocks.1.x_block.mlp.fc2.weight", FILE_NAME))
    monkeypatch.setattr(loaders.text_encoder_keys, "read_tensors", perturbing(
        loaders.text_encoder_keys.read_tensors, "text_model.final_layer_norm.weight", "clip_g"))
    code = parity.main(["--components", "clip-l,clip-g,transformer,sampling,vae", "--steps", "2",
                        "--json", str(tmp_path / "p.json"), "--quiet"])
    out = capsys.readouterr().out
    rows = _rows(tmp_path / "p.json")
    assert code == 1
    failed = {name for name, r in rows.items() if not r["passed"]}
    # CLIP-L has a tensor of the same name, untouched: only the perturbed components fail.
    assert failed == {"clip-g", "transformer", "sampling"}, rows
    assert "FAILED: CLIP-G, transformer one step, sampling loop" in out
    assert re.search(r"^CLIP-G\s.*FAIL", out, re.M) and re.search(r"^VAE decode\s.*pass", out, re.M)


def test_parity_explains_missing_packages(monkeypatch, capsys):
    monkeypatch.setattr(parity, "missing_reference_packages", lambda: ["diffusers", "accelerate"])
    assert parity.main(["--quiet"]) == 2
    err = capsys.readouterr().err
    assert "diffusers, accelerate" in err and "pip install" in err


def test_parity_rejects_unknown_component(capsys):
    with pytest.raises(SystemExit):
        parity.parse_args(["--components", "clip-l,unet"])
    assert "unet" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ tour


def _resolve(name: str):
    module, qualname = name.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def test_tour_matches_the_pipeline(tmp_path):
    from loaders.checkpoint import load_transformer, load_vae, locate
    from loaders.hub import resolve_model
    from loaders.pipeline import Settings, decode_images, generate_latents
    from loaders.text import encode_prompts, find_text_files
    from samplers import initial_noise, sigmas, timesteps

    steps, length = 2, 64
    args = tour.parse_args(["--steps", str(steps), "--max-sequence-length", str(length), "--save", str(tmp_path)])
    result = tour.run(args)
    page = tour.write_page(result, tmp_path, "python scripts/tour.py --steps 2")
    st = result.stage

    # The real pipeline, run separately, watched by forward hooks.
    source = resolve_model(None)
    checkpoint = locate(source.diffusion)
    h = result.header
    settings = Settings(steps=h["steps"], cfg=h["cfg"], shift=h["shift"], seed=h["seed"], height=h["height"],
                        width=h["width"], slg_layers=tuple(h["slg_layers"]), slg_scale=h["slg_scale"],
                        slg_start=h["slg_start"], slg_stop=h["slg_stop"])
    files = find_text_files(source.diffusion)
    model = load_transformer(checkpoint)
    enc = encode_prompts(files, [args.prompt], [args.negative_prompt], max_sequence_length=length,
                         context_dim=model.config.context_dim)
    seen: dict[str, list[tuple]] = {}
    watched = {"x_embedder": model.x_embedder, "t_embedder": model.t_embedder,
               "context_embedder": model.context_embedder, "block0": model.joint_blocks[0],
               "qkv": model.joint_blocks[0].x_block.attn.qkv, "final_layer": model.final_layer}

    def watch(name):
        def hook(module, inputs, out):
            seen.setdefault(name, []).append(
                tuple(tuple(o.shape) for o in out) if isinstance(out, tuple) else tuple(out.shape))
        return hook

    hooks = [m.register_forward_hook(watch(n)) for n, m in watched.items()]
    with torch.inference_mode():
        latents = generate_latents(model, enc.positive, enc.negative, settings)
        for hook in hooks:
            hook.remove()
        image = decode_images(load_vae(checkpoint), latents)
    first = {n: shapes[0] for n, shapes in seen.items()}  # the first model call: batch [negative, positive]
    B = 2  # CFG on for the built-in preset; the tour follows the positive row, batch 1

    # Text: equal values, not only shapes.
    assert st("conditioning").tensors[0] == tour.TensorInfo.of("context", enc.positive.context)
    assert st("conditioning").tensors[1] == tour.TensorInfo.of("pooled", enc.positive.pooled)
    assert st("tokenize").shape("T5 ids") == (1, length) and st("t5").shape("last_hidden_state")[1] == length

    # MM-DiT internals: the tour's batch-1 shapes are the pipeline's with B rows.
    one = lambda shape: (B, *shape[1:])  # noqa: E731
    assert st("patchify").shape("noise latents") == tuple(latents.shape)
    assert one(st("patchify").shape("patch tokens")) == first["x_embedder"]
    assert one(st("timestep").shape("t embedding")) == first["t_embedder"]
    assert one(st("timestep").shape("text tokens")) == first["context_embedder"]
    tokens, text = first["block0"]
    assert (one(st("block").shape("image tokens out")), one(st("block").shape("text tokens out"))) == (tokens, text)
    q = st("attention").shape("q")  # (1, H, N + S, Dh)
    assert q[2] == tokens[1] + text[1] and q[1] * q[3] * 3 == first["qkv"][-1]
    assert one(st("output").shape("final layer")) == first["final_layer"]
    assert st("output").shape("velocity") == tuple(latents.shape)
    assert len(seen["final_layer"]) == len(st("schedule").tables[0].rows) + sum(
        "skip-layer" in r[-1] for r in st("schedule").tables[0].rows)  # one model pass per step (+ SLG passes)

    # Schedule, sampling and the image: the pipeline's numbers.
    schedule = sigmas(settings.steps, settings.shift)
    assert st("schedule").tensors[0] == tour.TensorInfo.of("sigmas", schedule)
    assert st("schedule").tensors[1] == tour.TensorInfo.of("timesteps", timesteps(schedule))
    assert st("sampling").tensors[0] == tour.TensorInfo.of("initial latents", initial_noise(
        1, settings.height, settings.width, settings.seed))
    assert st("sampling").tensors[1] == tour.TensorInfo.of("final latents", latents)
    assert st("vae").tensors[-1] == tour.TensorInfo.of("image", image)

    # Every module:function it names is real code, and the page shows every picture it wrote.
    for s in result.stages:
        assert s.code and s.tensors
        for c in s.code:
            assert callable(_resolve(c.name)), c.name
    text_page = page.read_text(encoding="utf-8")
    pictures = [p.file for s in result.stages for p in s.pictures]
    assert len(pictures) == steps + 3 and len(set(pictures)) == len(pictures)
    for file in pictures:
        assert (tmp_path / file).stat().st_size > 0 and f"]({file})" in text_page
    assert text_page.count("\n## ") == len(result.stages)
    sources = re.findall(r"\]\(([^)]+\.py)\)", text_page)  # links to the code, relative to the page
    assert "mmdit.attention:attention" in text_page and sources
    assert all((tmp_path / link).resolve().is_file() for link in sources), sources
