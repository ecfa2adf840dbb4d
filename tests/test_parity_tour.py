"""scripts/parity.py and scripts/tour.py on tiny models.

* parity.py with no arguments (the built-in model, a Stability single file) passes every row; a tiny pipeline
  saved by diffusers/transformers passes in both layouts, and with the single file checked against the diffusers
  folder (`--reference`); a perturbed copy of the built-in checkpoint (files on disk, one MM-DiT weight and
  CLIP-G's final norm 1% off) checked against the original fails exactly the rows those weights feed, by name,
  with exit status 1, and the others still pass; a reference of another architecture stops the run (status 2)
  naming what differs; and the reference side reads single files without our reader (so a bug there cannot
  hide by being shared).
* tour.py: the shapes it reports are those of the real pipeline, observed by running `encode_prompts`,
  `generate_latents` and `decode_images` with forward hooks on the MM-DiT (hooks are fine in a test, they only
  watch), its final latents and image are the pipeline's, and its `module:function` names resolve to real code.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil

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


def test_parity_single_file_against_diffusers_folder(tiny_model, tmp_path):
    """Our engine on the Stability layout, diffusers on its own folders (`from_pretrained`): the same weights."""
    code = parity.main(["--model", str(tiny_model / "single" / "model.safetensors"),
                        "--reference", str(tiny_model / "diffusers"), *SMALL, "--json", str(tmp_path / "p.json")])
    data = json.loads((tmp_path / "p.json").read_text())
    rows = _rows(tmp_path / "p.json")
    assert code == 0 and set(rows) == ALL and all(r["passed"] for r in rows.values()), rows
    assert (data["layout"], data["reference_layout"]) == ("single file", "diffusers folder")
    assert data["reference"] == str(tiny_model / "diffusers")


def test_parity_rejects_a_reference_of_another_architecture(tiny_model, capsys):
    """The tiny pipeline (3 blocks, 2 heads of 16) is not the built-in model (6 blocks, 3 heads of 64)."""
    from loaders.builtin import builtin_model

    code = parity.main(["--model", str(tiny_model / "single" / "model.safetensors"),
                        "--reference", str(builtin_model()), *SMALL])
    err = capsys.readouterr().err
    assert code == 2
    assert "not the same architecture" in err and "MM-DiT: depth 3 vs 6" in err and "CLIP-G" in err, err


MMDIT_KEY = "model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight"
CLIP_G_KEY = "text_model.final_layer_norm.weight"


def _scaled_copy(source, target, key: str, factor: float) -> None:
    """`source` saved as `target` (a safetensors file) with the tensor `key` multiplied by `factor`."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(source))
    assert key in state, key
    state[key] = state[key] * factor
    save_file(state, str(target))


@pytest.fixture
def perturbed_builtin(tmp_path):
    """(original, perturbed copy) of the built-in single file; the copy has its own text_encoders/ and
    tokenizer folders, as a downloaded release would, with CLIP-G's final norm weight also 1% off."""
    from loaders.builtin import builtin_model

    original = builtin_model()
    copy = tmp_path / "perturbed"
    for folder in ("text_encoders", "tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(original.parent / folder, copy / folder)
    _scaled_copy(original, copy / original.name, MMDIT_KEY, 1.01)
    clip_g = "text_encoders/clip_g.safetensors"
    _scaled_copy(original.parent / clip_g, copy / clip_g, CLIP_G_KEY, 1.01)
    return original, copy / original.name


def test_parity_catches_a_perturbed_checkpoint_file(perturbed_builtin, tmp_path, capsys):
    """Our engine reads the perturbed copy from disk, diffusers/transformers the original."""
    original, perturbed = perturbed_builtin
    code = parity.main(["--model", str(perturbed), "--reference", str(original), "--steps", "2",
                        "--height", "64", "--width", "64", "--json", str(tmp_path / "p.json"), "--quiet"])
    out = capsys.readouterr().out
    rows = _rows(tmp_path / "p.json")
    assert code == 1, out
    assert set(rows) == ALL
    failed = {name for name, r in rows.items() if not r["passed"]}
    # CLIP-G's output feeds the prompt embeddings; the transformer rows get diffusers' embeddings, so they fail
    # on the MM-DiT weight alone. CLIP-L (a tensor of the same name, untouched), T5, the VAE and PNG agree.
    assert failed == {"clip-g", "prompt", "transformer", "sampling"}, rows
    for name in failed:
        assert rows[name]["relative"] > rows[name]["tolerance"] and "largest difference" in rows[name]["note"]
    for name in ALL - failed:
        assert rows[name]["relative"] == 0.0, rows[name]  # bit for bit: same weights, same inputs
    assert "FAILED: CLIP-G, prompt encoding, transformer one step, sampling loop" in out
    assert re.search(r"^CLIP-G\s.*FAIL", out, re.M) and re.search(r"^CLIP-L\s.*pass", out, re.M)
    assert re.search(r"^VAE decode\s.*pass", out, re.M)
    assert f"reference: {original} (single file)" in out


def test_parity_reference_does_not_use_our_reader(monkeypatch, tmp_path):
    """Checking a model against itself means two independent readings of its files: the reference reads
    single files with safetensors itself, so what our reader returns cannot leak into the reference side."""
    import loaders.checkpoint
    import loaders.text_encoders
    from loaders.builtin import FILE_NAME

    def perturbing(read, key, file_name):
        def read_tensors(files, *args, **kwargs):
            state = read(files, *args, **kwargs)
            if key in state and file_name in str(files):
                state[key] = state[key] * 1.01
            return state
        return read_tensors

    monkeypatch.setattr(loaders.checkpoint, "read_tensors", perturbing(
        loaders.checkpoint.read_tensors, MMDIT_KEY.removeprefix(loaders.checkpoint.TRANSFORMER_PREFIX), FILE_NAME))
    monkeypatch.setattr(loaders.text_encoders, "read_tensors", perturbing(
        loaders.text_encoders.read_tensors, CLIP_G_KEY, "clip_g"))
    code = parity.main(["--components", "clip-l,clip-g,transformer", "--height", "64", "--width", "64",
                        "--json", str(tmp_path / "p.json"), "--quiet"])
    rows = _rows(tmp_path / "p.json")
    assert code == 1
    assert {name for name, r in rows.items() if not r["passed"]} == {"clip-g", "transformer"}, rows


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
