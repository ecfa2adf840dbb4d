"""The trained built-in model draws its world, and layout control moves its objects (small seeded samples).

The full figures come from `scripts/bench/layout_bench.py` (docs/builtin-model.md); these tests keep a small,
fixed sample of them honest. Images come from the same code and seeds on every run, but another CPU may round
differently, so each assertion leaves a margin below what was measured here (given in each test).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from loaders.pipeline import Pipeline
from scripts.bench import layout_bench
from scripts.builtin import shapes
from scripts.generate import main as generate


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(keep_loaded=True)


def test_builtin_model_draws_the_named_colours_and_some_shapes(pipe):
    """16 random captions. Measured here: 31 of 31 named colours present, 16 of 31 objects with the right shape
    too, 7 of 16 images with every object right. (The goal, every named object right in 0.8 of the images, is
    not reached: docs/builtin-model.md.)"""
    rng = random.Random(5)
    objects = shapes_right = colours_right = 0
    for i in range(16):
        caption = shapes.random_scene(rng).caption
        image = np.asarray(pipe(caption, seed=i).images[0])
        found = {d.colour for d in shapes.detect(image)}
        judgement = shapes.judge(image, caption)
        objects += len(judgement.present)
        shapes_right += sum(judgement.present)
        colours_right += sum(colour in found for colour, _ in shapes.named_kinds(caption))
    assert colours_right / objects >= 0.9, (colours_right, objects)
    assert shapes_right / objects >= 0.45, (shapes_right, objects)


def test_best_layout_preset_raises_object_in_box(pipe):
    """16 cases. Measured here, no layout -> the best preset (`linear`): an object of the named colour centred in
    its region 0.275 -> 0.875, the named object (colour and shape) 0.150 -> 0.525."""
    cases = layout_bench.make_cases(16, seed=3)
    rates = {}
    for method in (layout_bench.Method("no layout"), layout_bench.BEST):
        scores = [layout_bench.score(layout_bench.generate(pipe, c, method), c) for c in cases]
        rates[method.name] = layout_bench.summarise(scores, [0.0])
    plain, steered = rates["no layout"], rates[layout_bench.BEST.name]
    assert steered["colour_in_box"] >= plain["colour_in_box"] + 0.3, rates
    assert steered["in_box"] >= plain["in_box"] + 0.2, rates


def test_default_run_writes_a_recognisable_scene(tmp_path):
    """The README's first command with no arguments: run.sh's default prompt, seed 0 (what it draws is checked
    by the detector, not just that a file appeared)."""
    out = tmp_path / "builtin.png"
    prompt = "a red circle"  # scripts/run.sh's default
    assert generate(["--prompt", prompt, "--out", str(out), "--quiet"]) == 0
    judgement = shapes.judge(np.asarray(Image.open(out).convert("RGB")), prompt)
    assert judgement.all_present and judgement.unnamed == 0, judgement
