"""The Python entry point: `Pipeline.load()` then call it; the same numbers as the CLI."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import loaders.text
from loaders.pipeline import Pipeline
from scripts.generate import main as generate

PROMPT = "a green triangle and a yellow square"
LAYOUT = {"prompt": PROMPT, "regions": [{"phrase": "a green triangle", "box": [0.0, 0.0, 0.5, 0.5]},
                                        {"phrase": "a yellow square", "box": [0.5, 0.5, 1.0, 1.0]}]}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(keep_loaded=True)


def test_pipeline_equals_the_cli_bit_for_bit(pipe, tmp_path):
    out, lat = tmp_path / "cli.png", tmp_path / "cli.safetensors"
    assert generate(["--prompt", PROMPT, "--seed", "3", "--out", str(out), "--save-latents", str(lat), "--quiet"]) == 0
    result = pipe(PROMPT, seed=3)
    assert torch.equal(result.latents, load_file(str(lat))["latents"])
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(Image.open(out).convert("RGB")))
    assert result.record["prompt"] == PROMPT and result.record["seed"] == 3 and result.maps is None


def test_layout_as_dict_and_maps(pipe):
    plain = pipe(PROMPT, seed=1)
    steered = pipe(layout=LAYOUT, seed=1, record_maps=True)
    assert not torch.equal(plain.latents, steered.latents)
    stats = steered.maps.to_stats()["regions"]
    assert [r["phrase"] for r in stats] == ["a green triangle", "a yellow square"]
    assert steered.record["layout"]["regions"][0]["box"] == [0.0, 0.0, 0.5, 0.5]
    off = pipe(layout=LAYOUT, seed=1, dense_strength=0)
    assert torch.equal(plain.latents, off.latents)  # strength 0 is the plain path, bit for bit


def test_loading_per_call_gives_the_same_images(pipe):
    fresh = Pipeline.load(keep_loaded=False)
    assert torch.equal(fresh(PROMPT, seed=2).latents, pipe(PROMPT, seed=2).latents)
    assert fresh._model is None and fresh._vae is None and fresh._text is None


def test_text_encoders_are_released_one_at_a_time(monkeypatch):
    alive: list[weakref.ref] = []
    overlaps = []

    def watch(load):
        def wrapped(*args, **kwargs):
            gc.collect()
            overlaps.append(sum(r() is not None for r in alive))  # encoders still alive when the next loads
            module = load(*args, **kwargs)
            alive.append(weakref.ref(module))
            return module
        return wrapped

    monkeypatch.setattr(loaders.text, "load_clip", watch(loaders.text.load_clip))
    monkeypatch.setattr(loaders.text, "load_t5", watch(loaders.text.load_t5))
    Pipeline.load()(PROMPT, steps=1)
    assert overlaps == [0, 0, 0]


def test_bad_calls_say_what_is_wrong(pipe):
    with pytest.raises(ValueError, match="needs a layout"):
        pipe(PROMPT, record_maps=True)
    with pytest.raises(ValueError, match="blocks \\[9\\] do not exist"):
        pipe(PROMPT, slg_layers=(9,))


def test_precomputed_embeddings_give_the_same_image(pipe):
    from loaders.text import encode_prompts

    e = encode_prompts(pipe.files, [PROMPT], [""], max_sequence_length=pipe.preset.max_sequence_length,
                       context_dim=pipe.config.context_dim)
    assert torch.equal(pipe(prompt_embeds=e.positive, negative_embeds=e.negative, seed=4).latents,
                       pipe(PROMPT, seed=4).latents)
    with pytest.raises(ValueError, match="negative_embeds"):
        pipe(prompt_embeds=e.positive)
