"""The built-in model's world: scenes, captions and the detector that every quality figure relies on."""

from __future__ import annotations

import random

import numpy as np
import pytest

from scripts.builtin import shapes


def test_captions_follow_the_grammar_and_objects_never_touch():
    rng = random.Random(1)
    counts = set()
    for _ in range(200):
        scene = shapes.random_scene(rng)
        counts.add(len(scene.things))
        kinds = [(t.colour, t.shape) for t in scene.things]
        assert len(set(kinds)) == len(kinds)  # no two objects alike
        assert scene.caption == " and ".join(f"a {c} {s}" for c, s in kinds)
        assert shapes.named_kinds(scene.caption) == kinds
        for i, a in enumerate(scene.things):
            lo, hi = shapes.OBJECT_SIZES
            assert lo <= a.box[2] - a.box[0] <= hi and 0 <= a.box[0] and a.box[2] <= shapes.SIZE
            for b in scene.things[i + 1 :]:
                assert not shapes._overlaps(a.box, b.box, shapes.GAP)
    assert counts == {1, 2, 3}


def test_background_is_none_of_the_object_colours():
    image = shapes.render(shapes.Scene(()))
    assert (image == shapes.BACKGROUND).all()
    assert shapes.BACKGROUND not in shapes.COLOURS.values()
    assert shapes.detect(image) == []


def test_detector_finds_at_least_99_percent_of_rendered_objects():
    rng = random.Random(2)
    found = total = extra = 0
    for _ in range(300):
        scene = shapes.random_scene(rng)
        image = shapes.render(scene)
        detections = shapes.detect(image)
        for t in scene.things:
            d = shapes.find(detections, t.colour, t.shape)
            total += 1
            if d is not None:
                found += 1
                x0, y0, x1, y1 = t.box  # the centroid is inside the drawn box, the mask is the drawn shape
                assert x0 <= d.centroid[0] <= x1 and y0 <= d.centroid[1] <= y1
                assert shapes.iou(d.mask, shapes.shape_mask(t.shape, t.box)) == 1.0
        extra += len(detections) - len(scene.things)
    assert found / total >= 0.99, (found, total)
    assert extra == 0


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_each_shape_is_classified_by_its_fill(shape):
    for side in (shapes.OBJECT_SIZES[0], 36, shapes.OBJECT_SIZES[1]):
        scene = shapes.Scene((shapes.Thing("red", shape, (10, 20, 10 + side, 20 + side)),))
        (d,) = shapes.detect(shapes.render(scene))
        assert d.shape == shape and abs(d.fill - shapes.fill_of(shape)) < 0.08


def test_judge_counts_missing_wrong_and_unnamed_objects():
    scene = shapes.Scene((shapes.Thing("red", "circle", (5, 5, 40, 40)), shapes.Thing("blue", "square", (70, 70, 100, 100))))
    image = shapes.render(scene)
    good = shapes.judge(image, "a red circle and a blue square")
    assert good.all_present and good.unnamed == 0
    wrong = shapes.judge(image, "a red square and a blue square")  # the red object is a circle
    assert wrong.present == (False, True) and wrong.unnamed == 1
    # specks and off-palette pixels are not objects
    noisy = image.copy()
    noisy[110:114, 110:114] = shapes.COLOURS["green"]
    noisy[0:30, 90:120] = (255, 0, 255)
    assert shapes.judge(noisy, "a red circle and a blue square").unnamed == 0
    with pytest.raises(ValueError, match="not a caption"):
        shapes.named_kinds("a purple circle")


def test_centroid_in_box_and_iou():
    scene = shapes.Scene((shapes.Thing("green", "square", (32, 32, 64, 64)),))
    (d,) = shapes.detect(shapes.render(scene))
    assert shapes.centroid_in_box(d, (0.25, 0.25, 0.5, 0.5))
    assert not shapes.centroid_in_box(d, (0.5, 0.5, 1.0, 1.0))
    region = np.zeros((128, 128), bool)
    region[32:64, 32:96] = True
    assert shapes.iou(d.mask, region) == pytest.approx(0.5)
