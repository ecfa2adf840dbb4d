"""The layout studio's backend (scripts/studio.py), without a browser: the canvas -> layout conversion, the imports,
the PNG round trip, the layout download through the CLI, and every bad input the page turns into a message.

The page itself, in a real browser, is tests/test_studio_browser.py.
"""

from __future__ import annotations

import base64
import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from loaders.pngmeta import read_png_metadata
from mmdit.errors import InputError
from scripts import studio
from scripts.generate import main as generate_cli

RED, BLUE, YELLOW = (studio.PALETTE[i][1] for i in range(3))


def layer(height: int, width: int, *paint: tuple[tuple[int, int, int], slice, slice]) -> np.ndarray:
    """An RGBA canvas layer as Gradio's ImageEditor sends it: transparent, with opaque brush-coloured patches."""
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    for colour, rows, cols in paint:
        rgba[rows, cols] = (*colour, 255)
    return rgba


@pytest.fixture(scope="module")
def pipe():
    from loaders import Pipeline

    return Pipeline.load(keep_loaded=True)


# ----------------------------------------------------------------------------------------------------------
# The editor's payload -> labels -> regions -> layout


def test_editor_payload_becomes_labels_at_the_output_size():
    # A 512x512 canvas for a 128x128 image (4 canvas pixels per image pixel); the brush colours are the palette's.
    top = layer(512, 512, (RED, slice(0, 256), slice(0, 256)), (BLUE, slice(256, 512), slice(256, 384)))
    value = {"background": np.full((512, 512, 4), 200, np.uint8), "layers": [top], "composite": None}
    labels = studio.editor_labels(value, 128, 128)
    assert labels.shape == (128, 128) and labels.dtype == np.int16
    assert (labels[:64, :64] == 0).all() and (labels[64:, 64:96] == 1).all()
    assert (labels[:64, 64:] == -1).all() and (labels[64:, 96:] == -1).all()
    assert studio.painted_colours(labels) == [0, 1]


def test_editor_labels_take_the_nearest_palette_colour_the_top_layer_and_opaque_pixels_only():
    near_red = tuple(min(255, v + 9) for v in RED)
    bottom = layer(128, 128, (near_red, slice(0, 128), slice(0, 128)))
    top = layer(128, 128, (YELLOW, slice(0, 32), slice(0, 32)))
    top[100:, 100:] = (*BLUE, 100)  # half transparent: not painted
    labels = studio.editor_labels({"layers": [bottom, top]}, 128, 128)
    assert (labels[:32, :32] == 2).all() and (labels[32:, :] == 0).all() and (labels[100:, 100:] == 0).all()
    assert (studio.editor_labels(None, 16, 16) == -1).all() and (studio.editor_labels({"layers": []}, 16, 16) == -1).all()


def test_render_canvas_round_trips_through_editor_labels():
    labels = np.full((128, 128), -1, dtype=np.int16)
    labels[10:50, 20:90], labels[70:120, 5:60] = 3, 15
    value = studio.render_canvas(labels)
    assert value["background"].shape == (512, 512, 3) and value["layers"][0].shape == (512, 512, 4)
    assert (studio.editor_labels(value, 128, 128) == labels).all()
    wide = studio.render_canvas(np.zeros((64, 128), dtype=np.int16))
    assert wide["background"].shape == (256, 512, 3)  # the canvas keeps the image's shape


def test_regions_become_the_layout_the_pipeline_gets_masks_or_boxes():
    labels = np.full((128, 128), -1, dtype=np.int16)
    labels[0:64, 0:64] = 1  # blue
    labels[70:90, 40:100] = 0  # red, as a rough patch
    labels[75, 60] = 1  # a stray blue pixel: the bounding box grows to hold it
    phrases = ["a red circle", "a blue square"] + [""] * 14
    regions = studio.studio_regions(labels, phrases)
    assert [r.colour for r in regions] == [0, 1] and [r.phrase for r in regions] == ["a red circle", "a blue square"]
    layout = studio.to_layout(regions, "a red circle and a blue square")
    assert layout.prompt == "a red circle and a blue square"
    assert [r.mask_path.name for r in layout.regions] == ["region_0.png", "region_1.png"]
    assert (layout.regions[0].mask.numpy() == (labels == 0)).all()
    boxes = studio.studio_regions(labels, phrases, as_boxes=True)
    assert boxes[0].box == (40 / 128, 70 / 128, 100 / 128, 90 / 128)
    assert boxes[1].box == (0.0, 0.0, 64 / 128, 76 / 128)
    assert (boxes[1].mask == studio.box_pixels(boxes[1].box, 128, 128)).all() and boxes[1].mask[:76, :64].all()
    from dense import box_mask  # the library's rule: the page's box pixels are the ones the pipeline rasterises

    assert (box_mask(boxes[1].box, 128, 128).numpy() == boxes[1].mask).all()


def test_the_prompt_is_assembled_from_the_phrases_and_split_back():
    assert studio.assemble_prompt("", ["a red circle", " a blue square ", ""]) == "a red circle and a blue square"
    assert studio.assemble_prompt("a photo", ["a cat"]) == "a photo, a cat"
    assert studio.split_prompt("a photo, a cat and a dog", ["a cat", "a dog"]) == "a photo"
    assert studio.split_prompt("a cat and a dog", ["a cat", "a dog"]) == ""
    assert studio.split_prompt("a dog beside a cat", ["a cat", "a dog"]) is None


# ----------------------------------------------------------------------------------------------------------
# Imports


def test_colour_mask_import(tmp_path):
    mask = np.zeros((256, 256, 3), dtype=np.uint8)
    mask[:128, :128] = (255, 0, 0)
    mask[128:, 96:] = (0, 0, 255)
    mask[127, :128] = (250, 10, 6)  # an anti-aliased edge: still red
    mapping = studio.parse_colour_map("#ff0000: a red circle\n0,0,255: a blue square\n")
    assert mapping == [((255, 0, 0), "a red circle"), ((0, 0, 255), "a blue square")]
    assert studio.parse_colour_map('{"#FF0000": "a red circle"}') == [((255, 0, 0), "a red circle")]
    labels, phrases = studio.colour_mask_labels(Image.fromarray(mask), mapping, 128, 128)
    assert phrases == ["a red circle", "a blue square"]
    assert (labels[:64, :64] == 0).all() and (labels[64:, 48:] == 1).all() and (labels[64:, :48] == -1).all()
    found = dict(studio.mask_colours(Image.fromarray(mask)))
    assert found[(0, 0, 0)] > 0.3 and (255, 0, 0) in found


def test_layout_json_import_reads_only_uploaded_masks(tmp_path):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "left.png")
    (tmp_path / "layout.json").write_text(json.dumps({"prompt": "a red circle and a blue square", "regions": [
        {"phrase": "a red circle", "mask": "masks/left.png"}, {"phrase": "a blue square", "box": [0.5, 0.5, 1, 1]}]}))
    upload = studio.read_layout_upload([tmp_path / "layout.json", tmp_path / "left.png"], 128, 128)
    assert upload.prompt == "a red circle and a blue square" and upload.phrases == ["a red circle", "a blue square"]
    assert not upload.boxes and upload.background is None
    labels = upload.labels
    assert (labels[:, :64] == 0).all() and (labels[64:, 64:] == 1).all() and (labels[:64, 64:] == -1).all()
    (tmp_path / "regional.json").write_text(json.dumps({"prompt": "a red circle", "background": "a calm sky",
                                                        "regions": [{"phrase": "a red circle", "box": [0, 0, 0.5, 0.5]}]}))
    upload = studio.read_layout_upload([tmp_path / "regional.json"], 128, 128)
    assert upload.boxes and upload.background == "a calm sky"  # Regional Prompting's: the page switches to it
    # A mask path in the JSON never reaches the server's disk: only uploaded files are read.
    (tmp_path / "evil.json").write_text(json.dumps({"regions": [{"phrase": "x", "mask": "/etc/hostname"}]}))
    with pytest.raises(InputError, match="upload that image too"):
        studio.read_layout_upload([tmp_path / "evil.json"], 128, 128)


# ----------------------------------------------------------------------------------------------------------
# A generation: the PNG round trip and the layout download through the CLI, bit for bit


def test_png_and_layout_round_trip_and_the_cli_makes_the_same_image(pipe, tmp_path):
    labels = np.full((128, 128), -1, dtype=np.int16)
    labels[8:72, 8:60] = 0
    labels[60:120, 70:124] = 1
    phrases = ["a red circle", "a blue square"] + [""] * 14
    regions = studio.studio_regions(labels, phrases)
    request = studio.Request("a red circle and a blue square", regions, "linear", 0.8, 3, 4.5, 5, 128, 128, True)
    outcome = studio.generate(pipe, request, tmp_path / "run", None)
    assert outcome.plain is not None and len(outcome.maps) == 2 and outcome.maps[0][1].endswith("% inside")
    assert "| the blue region | a blue square | " in studio.share_table(outcome.shares)
    assert outcome.strip.width > 3 * 72 and outcome.outlined.size == (512, 512)

    record = read_png_metadata(outcome.png)
    assert record["layout"]["regions"][1] == {"phrase": "a blue square", "mask": "region_1.png"}
    assert (np.asarray(Image.open(outcome.png)) == np.asarray(outcome.image)).all()
    restored = studio.restore_png(outcome.png, "builtin")
    assert restored.phrases[:3] == ["a red circle", "a blue square", ""] and not restored.notes and not restored.boxes
    assert (restored.labels == labels).all()
    assert restored.settings == {"prompt": request.prompt, "seed": 5, "steps": 3, "cfg": 4.5, "height": 128,
                                 "width": 128, "dense_preset": "linear", "dense_strength": 0.8,
                                 "layout_method": "dense", "base_ratio": None, "inject_steps": None,
                                 "inject_interval": None, "background_prompt": None}

    with zipfile.ZipFile(outcome.layout) as z:
        assert sorted(z.namelist()) == ["layout.json", "region_0.png", "region_1.png"]
        z.extractall(tmp_path / "unpacked")
    assert (studio.read_layout_upload([outcome.layout], 128, 128).labels == labels).all()  # the zip imports back
    argv = outcome.command.split()[2:]  # the command the page shows, run in the unpacked folder
    argv = [str(tmp_path / "unpacked" / a) if a in ("layout.json", "image.png") else a for a in argv]
    assert generate_cli([*argv, "--quiet"]) == 0
    assert (np.asarray(Image.open(tmp_path / "unpacked" / "image.png")) == np.asarray(outcome.image)).all()


def test_regional_prompting_round_trips_and_the_cli_makes_the_same_image(pipe, tmp_path):
    import shlex

    from dense import RegionalConfig

    labels = two_regions()
    regions = studio.studio_regions(labels, ["a red circle", "a blue square"])
    regional = RegionalConfig(base_ratio=0.2, inject_steps=2, inject_interval=2)
    request = studio.Request("a red circle and a blue square", regions, "faithful", 1.0, 3, 4.5, 7, 128, 128, True,
                             regional, "a grey floor")
    outcome = studio.generate(pipe, request, tmp_path / "run", None)
    dense = studio.generate(pipe, replace(request, regional=None, compare=False), tmp_path / "dense", None)
    assert outcome.maps == [] and [(r.colour, area, share) for r, area, share in outcome.shares] == \
        [(0, 0.25, None), (1, 0.25, None)]  # no maps under its mask; each region a quarter of the tokens
    assert not (np.asarray(outcome.image) == np.asarray(dense.image)).all()  # the method is not DenseDiffusion's
    assert not (np.asarray(outcome.image) == np.asarray(outcome.plain)).all()  # and it steers

    restored = studio.restore_png(outcome.png, "builtin")
    assert {k: restored.settings[k] for k in ("layout_method", "base_ratio", "inject_steps", "inject_interval",
                                              "background_prompt")} == \
        {"layout_method": "regional", "base_ratio": 0.2, "inject_steps": 2, "inject_interval": 2,
         "background_prompt": "a grey floor"}
    assert "--layout-method regional --base-ratio 0.2 --inject-steps 2 --inject-interval 2 " \
           "--background-prompt 'a grey floor'" in outcome.command
    with zipfile.ZipFile(outcome.layout) as z:
        z.extractall(tmp_path / "unpacked")
    argv = [str(tmp_path / "unpacked" / a) if a in ("layout.json", "image.png") else a
            for a in shlex.split(outcome.command)[2:]]
    assert generate_cli([*argv, "--quiet"]) == 0
    assert (np.asarray(Image.open(tmp_path / "unpacked" / "image.png")) == np.asarray(outcome.image)).all()


def test_boxes_download_as_a_json_the_cli_takes(pipe, tmp_path):
    labels = np.full((128, 128), -1, dtype=np.int16)
    labels[0:64, 0:64] = 2
    regions = studio.studio_regions(labels, ["", "", "a yellow triangle"], as_boxes=True)
    request = studio.Request("a yellow triangle", regions, "faithful", 1.0, 2, 4.5, 0, 128, 128, False)
    outcome = studio.generate(pipe, request, tmp_path / "run", None)
    assert outcome.layout.name == "layout.json" and outcome.plain is None
    assert json.loads(outcome.layout.read_text())["regions"] == [{"phrase": "a yellow triangle", "box": [0, 0, 0.5, 0.5]}]
    restored = studio.restore_png(outcome.png, "another-model")
    assert restored.boxes and "another-model" in restored.notes[0] and (restored.labels == labels).all()
    out = tmp_path / "cli.png"
    assert generate_cli(["--layout", str(outcome.layout), "--seed", "0", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    assert (np.asarray(Image.open(out)) == np.asarray(outcome.image)).all()


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear message each, never a traceback


def two_regions() -> np.ndarray:
    labels = np.full((128, 128), -1, dtype=np.int16)
    labels[:64, :64], labels[64:, 64:] = 0, 1
    return labels


def test_a_region_without_a_phrase_or_with_an_empty_one():
    with pytest.raises(InputError, match="the blue region has no phrase"):
        studio.studio_regions(two_regions(), ["a red circle", ""])
    with pytest.raises(InputError, match="the red region is empty"):
        studio.studio_regions(two_regions(), ["   ", "a blue square"])
    with pytest.raises(InputError, match="paint at least one region"):
        studio.studio_regions(np.full((128, 128), -1, dtype=np.int16), ["a red circle"])
    regions = studio.studio_regions(two_regions(), ["a red circle", "a blue square"])
    with pytest.raises(InputError, match="the prompt is empty"):
        studio.to_layout(regions, "  ")


def test_phrase_problems_are_named_by_colour(pipe, tmp_path):
    regions = studio.studio_regions(two_regions(), ["a red circle", "a blue square"])
    request = studio.Request("a red circle and a green square", regions, "faithful", 1.0, 2, 4.5, 0, 128, 128, False)
    with pytest.raises(InputError, match=r'the blue region \("a blue square"\): the phrase is not in the prompt'):
        studio.generate(pipe, request, tmp_path, None)
    tiny = np.full((128, 128), -1, dtype=np.int16)
    tiny[:64, :64], tiny[100:104, 100:104] = 0, 1
    small = studio.studio_regions(tiny, ["a red circle", "a blue square"])
    request = studio.Request("a red circle and a blue square", small, "faithful", 1.0, 2, 4.5, 0, 128, 128, False)
    with pytest.raises(InputError, match=r'the blue region \("a blue square"\) covers no image token'):
        studio.generate(pipe, request, tmp_path, None)
    with pytest.raises(InputError, match="unknown preset"):
        studio.generate(pipe, studio.Request(request.prompt, regions, "fast", 1.0, 2, 4.5, 0, 128, 128, False),
                        tmp_path, None)


def test_more_regions_than_the_models_text_holds(pipe, tmp_path):
    # The built-in model's text encoders read 16 CLIP and 16 T5 tokens: five three-word phrases do not fit.
    labels = np.full((128, 128), -1, dtype=np.int16)
    for n in range(5):
        labels[:, 16 + 16 * n: 32 + 16 * n] = n
    phrases = ["a red circle", "a blue square", "a yellow triangle", "a green square", "a red triangle"]
    regions = studio.studio_regions(labels, phrases)
    request = studio.Request(studio.assemble_prompt("", phrases), regions, "faithful", 1.0, 2, 4.5, 0, 128, 128, False)
    with pytest.raises(InputError, match="more than this model's text holds") as error:
        studio.generate(pipe, request, tmp_path, None)
    assert "a green square" in str(error.value) and "CLIP:" not in str(error.value)
    seventeen = np.arange(17 * 16, dtype=np.int16).reshape(17, 16) % 17
    with pytest.raises(InputError, match="at most 16"):
        studio.colour_mask_labels(Image.fromarray(seventeen.astype(np.uint8)), [((i, i, i), "x") for i in range(17)],
                                  128, 128)


def test_uploads_that_are_not_images_or_not_from_this_project(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="is not an image"):
        studio.read_image(text, "colour mask")
    with pytest.raises(InputError, match="is not an image"):
        studio.restore_png(text, "builtin")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(InputError, match="carries no settings of this project"):
        studio.restore_png(plain, "builtin")
    (tmp_path / "layout.zip").write_text("not a zip")
    with pytest.raises(InputError, match="is not a zip file"):
        studio.read_layout_upload([tmp_path / "layout.zip"], 128, 128)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="is not valid JSON"):
        studio.read_layout_upload([tmp_path / "bad.json"], 128, 128)
    with pytest.raises(InputError, match="upload one layout .json"):
        studio.read_layout_upload([plain], 128, 128)


def test_bad_colour_maps_and_masks():
    with pytest.raises(InputError, match="give the colour -> phrase map"):
        studio.parse_colour_map("  ")
    with pytest.raises(InputError, match="write it as"):
        studio.parse_colour_map("#ff0000 a red circle")
    with pytest.raises(InputError, match="is not a colour"):
        studio.parse_colour_map("reddish: a red circle")
    mask = Image.new("RGB", (64, 64), (255, 0, 0))
    with pytest.raises(InputError, match=r"no pixel of #0000ff .* its colours are #ff0000 \(100%\)"):
        studio.colour_mask_labels(mask, [((255, 0, 0), "a red circle"), ((0, 0, 255), "a blue square")], 128, 128)


def test_a_cli_png_whose_layout_masks_are_files_elsewhere(tmp_path):
    record = {"prompt": "a red circle", "seed": 1, "steps": 3, "cfg": 4.5, "height": 128, "width": 128,
              "model": "builtin", "dense_preset": "faithful", "dense_strength": 1.0,
              "layout": {"prompt": None, "regions": [{"phrase": "a red circle", "mask": "/somewhere/red.png"}]}}
    from loaders.pngmeta import save_png

    save_png(tmp_path / "cli.png", np.zeros((128, 128, 3), np.uint8), record)
    with pytest.raises(InputError, match="not inside the PNG"):
        studio.restore_png(tmp_path / "cli.png", "builtin")
    mask = base64.b64encode(studio.mask_png(np.ones((128, 128), bool))).decode()
    save_png(tmp_path / "studio.png", np.zeros((128, 128, 3), np.uint8),
             {**record, "studio": {"colours": [4], "masks": {"red.png": mask}}})
    restored = studio.restore_png(tmp_path / "studio.png", "builtin")
    assert (restored.labels == 4).all() and restored.phrases[4] == "a red circle"
