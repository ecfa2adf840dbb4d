#!/usr/bin/env python
"""The layout studio: paint where each phrase goes, generate, and see where each phrase's attention went.

    bash scripts/studio.sh [--model ...] [--port 7860] [--host 127.0.0.1]     (docs/studio.md)

From Python or a notebook, in the repository root with the `[studio]` extra installed:

    from scripts.studio import launch
    launch()                         # the built-in model; launch(pipe) or launch("stabilityai/...") for others

A local Gradio page on one `loaders.Pipeline` (kept loaded). Each brush colour is a region with its phrase; the
page turns the canvas into a layout at the output size, calls the pipeline (DenseDiffusion with `record_maps=True`,
or Regional Prompting: docs/layout-control.md) and shows the image with its regions, each phrase's attention map
with its in-region share (DenseDiffusion), and a preview per step. The PNG it offers carries the project's
metadata (the layout and its masks included), the layout download runs through `scripts/generate.py --layout` to
the same image, bit for bit (tests/test_studio_browser.py).

The first half of this file is plain functions on arrays (tests/test_studio.py); the page is `build_page`.
Bad input raises `mmdit.errors.InputError`; the page shows its message.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dense import Layout, Region, RegionalConfig, assign_tokens, parse_layout
from loaders.pngmeta import read_png_metadata, save_png
from mmdit.errors import InputError

# One brush colour per region (Sasha Trubetskoy's "20 distinct colours", first 16): region n is colour n.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (230, 25, 75)), ("blue", (67, 99, 216)), ("yellow", (255, 225, 25)), ("green", (60, 180, 75)),
    ("orange", (245, 130, 49)), ("purple", (145, 30, 180)), ("cyan", (66, 212, 244)), ("magenta", (240, 50, 230)),
    ("lime", (191, 239, 69)), ("pink", (250, 190, 212)), ("teal", (70, 153, 144)), ("lavender", (220, 190, 255)),
    ("brown", (154, 99, 36)), ("maroon", (128, 0, 0)), ("mint", (170, 255, 195)), ("navy", (0, 0, 117)),
)
PRESET_NAMES = ("faithful", "linear", "joint", "hard")  # dense presets, as --dense-preset names them
METHODS = (("DenseDiffusion", "dense"), ("Regional Prompting", "regional"))  # label, as --layout-method names it
CANVAS_SIDE = 512  # the canvas's longer side is at least this many pixels (an integer multiple of the output)
CELL = 16  # pixels per image token (8 per latent pixel x 2x2 patches): the grid drawn on the canvas
BACKGROUND = (214, 214, 214)
MASK_NAME = "region_{}.png"  # a painted region's mask file in the layout download
MAX_UPLOAD_BYTES = 25 * 2**20


def colour_name(index: int) -> str:
    return PALETTE[index][0]


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


# ----------------------------------------------------------------------------------------------------------
# The canvas: brush colours -> a label per output pixel


def canvas_size(height: int, width: int) -> tuple[int, int]:
    """(Hc, Wc): the output size times the integer factor that makes the longer side reach CANVAS_SIDE."""
    k = max(1, CANVAS_SIDE // max(height, width))
    return height * k, width * k


def sample_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """The (h, w, ...) array sampled at each output pixel's centre: row y reads floor((y + 0.5) h / H).

    The rule of `dense.layout.resize_nearest`, in integers, so a canvas k times the output size gives each output
    pixel the canvas pixel at the centre of its k x k block.
    """
    h, w = array.shape[:2]
    rows = (2 * np.arange(height) + 1) * h // (2 * height)
    cols = (2 * np.arange(width) + 1) * w // (2 * width)
    return array[rows[:, None], cols[None, :]]


def nearest_palette(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours -> (...) index of the nearest palette colour."""
    palette = np.array([c for _, c in PALETTE], dtype=np.int32)  # (P, 3)
    distance = ((rgb[..., None, :].astype(np.int32) - palette) ** 2).sum(-1)  # (..., P)
    return distance.argmin(-1)


def editor_labels(value: dict | None, height: int, width: int) -> np.ndarray:
    """The ImageEditor's value -> (H, W) int16 labels at the output size: palette index, -1 where unpainted.

    Only the layers count (the background is the canvas's grey); a pixel is painted where a layer's alpha is at
    least 128, in the palette colour nearest to it; a later layer paints over an earlier one.
    """
    labels = np.full((height, width), -1, dtype=np.int16)
    for layer in (value or {}).get("layers") or []:
        if layer is None:
            continue
        rgba = np.asarray(layer)
        if rgba.ndim != 3 or rgba.shape[2] != 4:
            raise InputError(f"the canvas layer has shape {rgba.shape}; expected an RGBA image")
        sampled = sample_nearest(rgba, height, width)  # (H, W, 4)
        painted = sampled[..., 3] >= 128
        labels[painted] = nearest_palette(sampled[..., :3])[painted]
    return labels


def painted_colours(labels: np.ndarray) -> list[int]:
    return [int(c) for c in np.unique(labels) if c >= 0]


def render_canvas(labels: np.ndarray) -> dict:
    """Labels at the output size -> an ImageEditor value: the grey background with the token grid, one layer."""
    height, width = labels.shape
    ch, cw = canvas_size(height, width)
    k = ch // height
    background = np.empty((ch, cw, 3), dtype=np.uint8)
    background[:] = BACKGROUND
    cell = CELL * k
    if max(height, width) // CELL <= 16:  # a readable grid: one square per image token
        background[::cell] = background[:, ::cell] = (200, 200, 200)
    layer = np.zeros((ch, cw, 4), dtype=np.uint8)
    big = labels.repeat(k, 0).repeat(k, 1)
    for c in painted_colours(labels):
        layer[big == c] = (*PALETTE[c][1], 255)
    return {"background": background, "layers": [layer], "composite": None}


def blank_canvas(height: int, width: int) -> dict:
    return render_canvas(np.full((height, width), -1, dtype=np.int16))


# ----------------------------------------------------------------------------------------------------------
# Regions and the layout


@dataclass(frozen=True)
class StudioRegion:
    """A region as the page holds it: its brush colour, its phrase, its pixels at the output size (and a box
    when it is used as its bounding box)."""

    colour: int
    phrase: str
    mask: np.ndarray  # (H, W) bool
    box: tuple[float, float, float, float] | None = None

    @property
    def name(self) -> str:
        return f"the {colour_name(self.colour)} region"


def bounding_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The pixel-aligned box (fractions) whose rasterisation (`dense.layout.box_mask`) is the mask's bounding box."""
    height, width = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return (cols[0] / width, rows[0] / height, (cols[-1] + 1) / width, (rows[-1] + 1) / height)


def box_pixels(box: tuple[float, float, float, float], height: int, width: int) -> np.ndarray:
    """(H, W) bool: pixels whose centre lies in [x0, x1) x [y0, y1), the rule of `dense.layout.box_mask`."""
    x0, y0, x1, y1 = box
    cx = (np.arange(width, dtype=np.float64) + 0.5) / width
    cy = (np.arange(height, dtype=np.float64) + 0.5) / height
    return ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]


def studio_regions(labels: np.ndarray, phrases: list[str], as_boxes: bool = False) -> list[StudioRegion]:
    """The painted colours, in palette order, with their phrases; checks that each has one."""
    regions = []
    for c in painted_colours(labels):
        phrase = phrases[c] if c < len(phrases) else ""
        if not phrase.strip():
            what = "is empty" if phrase else "has no phrase"
            raise InputError(f"the {colour_name(c)} region {what}: type what goes there, or erase the "
                             f"{colour_name(c)} paint")
        mask = labels == c
        box = bounding_box(mask) if as_boxes else None
        regions.append(StudioRegion(c, phrase.strip(), box_pixels(box, *mask.shape) if box else mask, box))
    if not regions:
        raise InputError("paint at least one region on the canvas (or import a layout), and give it a phrase")
    return regions


def assemble_prompt(base: str, phrases: list[str]) -> str:
    """The prompt the phrases make: "base, phrase 1 and phrase 2" (the base prompt first, when there is one)."""
    joined = " and ".join(p.strip() for p in phrases if p.strip())
    return ", ".join(part for part in (base.strip(), joined) if part)


def split_prompt(prompt: str, phrases: list[str]) -> str | None:
    """The base prompt that `assemble_prompt` would need to make `prompt` from the phrases, or None."""
    joined = " and ".join(p.strip() for p in phrases if p.strip())
    if prompt == joined:
        return ""
    if joined and prompt.endswith(", " + joined):
        return prompt[: -len(joined) - 2]
    return None


def to_layout(regions: list[StudioRegion], prompt: str) -> Layout:
    """The `dense.Layout` the pipeline gets: masks named as in the layout download, boxes as boxes."""
    if not prompt.strip():
        raise InputError("the prompt is empty: type a phrase for each region (they make the prompt) or a prompt")
    return Layout(prompt=prompt, regions=tuple(
        Region(phrase=r.phrase, box=r.box) if r.box is not None else
        Region(phrase=r.phrase, mask=torch.from_numpy(r.mask.copy()), mask_path=Path(MASK_NAME.format(n)))
        for n, r in enumerate(regions)))


def layout_files(regions: list[StudioRegion], prompt: str) -> dict[str, bytes]:
    """The layout download: layout.json and a mask PNG per painted region (0/255 grey), by file name."""
    files: dict[str, bytes] = {}
    entries = []
    for n, r in enumerate(regions):
        if r.box is not None:
            entries.append({"phrase": r.phrase, "box": list(r.box)})
        else:
            files[MASK_NAME.format(n)] = mask_png(r.mask)
            entries.append({"phrase": r.phrase, "mask": MASK_NAME.format(n)})
    return {"layout.json": json.dumps({"prompt": prompt, "regions": entries}, indent=1).encode(), **files}


def mask_png(mask: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(out, format="PNG")
    return out.getvalue()


def friendly(message: str, regions: list[StudioRegion]) -> str:
    """A library message with ``regions[i] ("phrase")`` said as the page says it: "the blue region"."""
    for n, r in reversed(list(enumerate(regions))):
        message = re.sub(rf'regions\[{n}\] \([^)]*\)', f'{r.name} ("{r.phrase}")', message)
        message = message.replace(f"regions[{n}]", r.name)
    return message


def check_fits(error: InputError, regions: list[StudioRegion], prompt: str) -> InputError:
    """A phrase that is in the prompt's text but not in its tokens lies past what the text encoders read: say so."""
    text = str(error)
    lost = [r for r in regions if r.phrase in prompt and f'("{r.phrase}")' in text and "not in the prompt's tokens" in text]
    if not lost:
        return InputError(friendly(text, regions))
    return InputError(
        f"{len(regions)} regions are more than this model's text holds with these phrases: "
        f"{', '.join(f'{r.name} ({r.phrase!r})' for r in lost)} falls past the last token its text encoders read. "
        "Use fewer regions, shorter phrases or a shorter base prompt.")


# ----------------------------------------------------------------------------------------------------------
# Imports: a colour-coded mask, the CLI's layout, a PNG made here


def read_image(path: str | Path, what: str) -> Image.Image:
    """An uploaded image, fully decoded, or an InputError saying it is not one."""
    try:
        if Path(path).stat().st_size > MAX_UPLOAD_BYTES:
            raise InputError(f"the {what} is larger than {MAX_UPLOAD_BYTES >> 20} MB")
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"the {what} ({Path(path).name}) is not an image PIL can read: {e}") from None


def parse_colour_map(text: str) -> list[tuple[tuple[int, int, int], str]]:
    """`#rrggbb: phrase` (or `r,g,b: phrase`) per line, or a JSON object {"#rrggbb": "phrase"}, in order."""
    text = text.strip()
    if not text:
        raise InputError("give the colour -> phrase map: one '#ff0000: a red rose' per line")
    if text.startswith("{"):
        try:
            items = list(json.loads(text).items())
        except (json.JSONDecodeError, AttributeError) as e:
            raise InputError(f"the colour map is not a JSON object of colour -> phrase: {e}") from None
    else:
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                colour, sep, phrase = line.partition(":")
                if not sep:
                    raise InputError(f"colour map line {number} {line!r}: write it as '#ff0000: a red rose'")
                items.append((colour, phrase))
    entries = []
    for colour, phrase in items:
        if not isinstance(phrase, str):
            raise InputError(f"the phrase for {colour} must be text, got {phrase!r}")
        entries.append((parse_colour(str(colour)), phrase.strip()))
    return entries


def parse_colour(text: str) -> tuple[int, int, int]:
    text = text.strip()
    m = re.fullmatch(r"#?([0-9a-fA-F]{6})", text)
    if m:
        return tuple(int(m.group(1)[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    parts = re.split(r"[,\s]+", text.strip("()[] "))
    if len(parts) == 3 and all(p.isdigit() and int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)  # type: ignore[return-value]
    raise InputError(f"{text!r} is not a colour: write #ff0000 or 255,0,0")


def mask_colours(image: Image.Image, top: int = 12) -> list[tuple[tuple[int, int, int], float]]:
    """The colours of a colour-coded mask with the share of the image each covers, most common first."""
    rgb = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    order = np.argsort(-counts)[:top]
    return [(tuple(int(v) for v in colours[i]), float(counts[i]) / len(rgb)) for i in order]


def colour_mask_labels(image: Image.Image, mapping: list[tuple[tuple[int, int, int], str]], height: int,
                       width: int, tolerance: int = 24) -> tuple[np.ndarray, list[str]]:
    """A colour-coded mask (what A1111's and ComfyUI's regional prompting take) -> labels and phrases.

    Map entry n is region n (brush colour n). A pixel belongs to the map colour nearest to it when no channel
    differs by more than `tolerance` (anti-aliased edges), else to no region; the image is sampled at the output
    pixels' centres.
    """
    if len(mapping) > len(PALETTE):
        raise InputError(f"the colour map has {len(mapping)} colours; the page holds at most {len(PALETTE)} regions")
    rgb = np.asarray(image.convert("RGB")).astype(np.int32)  # (h, w, 3)
    targets = np.array([c for c, _ in mapping], dtype=np.int32)  # (N, 3)
    diff = np.abs(rgb[:, :, None, :] - targets).max(-1)  # (h, w, N)
    nearest = diff.argmin(-1)
    labels = np.where(diff.min(-1) <= tolerance, nearest, -1).astype(np.int16)
    labels = sample_nearest(labels, height, width)
    missing = [hex_colour(c) for n, (c, _) in enumerate(mapping) if not (labels == n).any()]
    if missing:
        found = ", ".join(f"{hex_colour(c)} ({share:.0%})" for c, share in mask_colours(image, 8))
        raise InputError(f"the mask has no pixel of {', '.join(missing)} (at {width}x{height}); its colours are {found}")
    return labels, [p for _, p in mapping]


@dataclass(frozen=True)
class Upload:
    """An imported layout, as the canvas takes it."""

    prompt: str | None
    labels: np.ndarray  # (H, W) int16: palette index per pixel, -1 where no region
    phrases: list[str]
    boxes: bool  # every region is a box
    background: str | None  # Regional Prompting's background prompt, if the layout gives one


def read_layout_upload(paths: list[str | Path], height: int, width: int) -> Upload:
    """The CLI's layout, uploaded as layout.json with its mask PNGs, or as the zip this page gives.

    Mask files are looked up by name among the uploaded files only: a path in the JSON never reaches the
    server's disk.
    """
    files: dict[str, bytes] = {}
    for path in paths:
        path = Path(path)
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise InputError(f"{path.name} is larger than {MAX_UPLOAD_BYTES >> 20} MB")
        if path.suffix.lower() == ".zip":
            files.update(read_zip(path))
        else:
            files[path.name] = path.read_bytes()
    jsons = [name for name in files if name.lower().endswith(".json")]
    if len(jsons) != 1:
        raise InputError("upload one layout .json (with its mask images) or one layout .zip; "
                         f"got {sorted(files) or 'nothing'}")
    try:
        data = json.loads(files[jsons[0]].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{jsons[0]} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("regions"), list):
        raise InputError(f'{jsons[0]} is not a layout: it needs a "regions" list (see docs/densediffusion.md)')
    with tempfile.TemporaryDirectory() as folder:  # the masks that were uploaded, under names chosen here
        regions = []
        for n, region in enumerate(data["regions"]):
            if isinstance(region, dict) and isinstance(region.get("mask"), str):
                name = PurePath(region["mask"].replace("\\", "/")).name
                if name not in files:
                    raise InputError(f"regions[{n}] uses the mask {region['mask']!r}: upload that image too "
                                     "(with the .json), or the layout's .zip")
                (Path(folder) / f"mask_{n}.png").write_bytes(files[name])
                region = {**region, "mask": f"mask_{n}.png"}
            regions.append(region)
        layout = parse_layout({**data, "regions": regions}, base_dir=folder)
    return Upload(layout.prompt, layout_labels(layout, height, width), [r.phrase for r in layout.regions],
                  all(r.box is not None for r in layout.regions), layout.background)


def read_zip(path: Path) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > MAX_UPLOAD_BYTES:
                raise InputError(f"{path.name} unpacks to more than {MAX_UPLOAD_BYTES >> 20} MB")
            return {PurePath(m.filename).name: z.read(m) for m in members}
    except zipfile.BadZipFile as e:
        raise InputError(f"{path.name} is not a zip file: {e}") from None


def layout_labels(layout: Layout, height: int, width: int, colours: list[int] | None = None) -> np.ndarray:
    """A parsed layout's regions as labels (region n -> `colours[n]`, by default colour n); where regions overlap
    the earlier one wins, as `dense.assign_tokens` breaks ties."""
    if len(layout.regions) > len(PALETTE):
        raise InputError(f"the layout has {len(layout.regions)} regions; the page holds at most {len(PALETTE)}")
    colours = colours if colours is not None else list(range(len(layout.regions)))
    if sorted(colours) != sorted(set(colours)) or len(colours) != len(layout.regions) or \
            not all(isinstance(c, int) and 0 <= c < len(PALETTE) for c in colours):
        raise InputError(f"the record's region colours {colours} do not fit its {len(layout.regions)} regions")
    labels = np.full((height, width), -1, dtype=np.int16)
    for n in reversed(range(len(layout.regions))):
        r = layout.regions[n]
        mask = box_pixels(r.box, height, width) if r.box is not None else sample_nearest(r.mask.numpy(), height, width)
        labels[mask] = colours[n]
    return labels


@dataclass(frozen=True)
class Restored:
    """What a PNG made here (or by the CLI) says about the image: the settings and the regions."""

    settings: dict  # prompt, seed, steps, cfg, height, width, dense_preset, dense_strength, layout_method,
    # base_ratio, inject_steps, inject_interval, background_prompt
    labels: np.ndarray | None  # None: the PNG had no layout
    phrases: list[str]
    boxes: bool
    notes: list[str]


def restore_png(path: str | Path, model_label: str) -> Restored:
    """Read a PNG's `sd3_minimal` record: the settings, and the regions (masks from the record's own copies)."""
    read_image(path, "PNG")  # an image at all, or a clear message
    try:
        record = read_png_metadata(Path(path))
    except (InputError, json.JSONDecodeError) as e:
        raise InputError(f"{Path(path).name} carries no settings of this project ({e}); drop a PNG that the studio "
                         "or scripts/generate.py wrote") from None
    notes = []
    if record.get("model") not in (None, model_label):
        notes.append(f"it was made with the model {record['model']!r}; this page runs {model_label!r}")
    keys = ("prompt", "seed", "steps", "cfg", "height", "width", "dense_preset", "dense_strength")
    settings = {k: record.get(k) for k in keys}
    if settings["dense_preset"] is not None and settings["dense_preset"] not in PRESET_NAMES:
        notes.append(f"its dense preset {settings['dense_preset']!r} is not one of the page's; set to faithful")
        settings["dense_preset"] = "faithful"
    # Regional Prompting's records add these keys; a DenseDiffusion record has none of them.
    regional = record.get("regional") or {}
    settings["layout_method"] = "regional" if record.get("layout_method") == "regional" else "dense"
    settings.update({k: regional.get(k) for k in ("base_ratio", "inject_steps", "inject_interval")})
    settings["background_prompt"] = record.get("background_prompt")
    layout = record.get("layout")
    if not layout:
        return Restored(settings, None, [], False, notes + ["it has no layout"])
    height, width = int(record["height"]), int(record["width"])
    studio = record.get("studio") or {}
    stored = studio.get("masks") or {}
    regions = []
    for n, region in enumerate(layout.get("regions") or []):
        if "mask" in region:
            name = PurePath(str(region["mask"])).name
            if name not in stored:
                raise InputError(f"its layout's regions[{n}] uses the mask file {region['mask']!r}, which is not "
                                 "inside the PNG (the CLI records the path only): import the layout files instead")
            regions.append({"phrase": region["phrase"], "mask": name})
        else:
            regions.append({"phrase": region["phrase"], "box": region["box"]})
    with tempfile.TemporaryDirectory() as folder:
        for name, data in stored.items():
            (Path(folder) / PurePath(name).name).write_bytes(base64.b64decode(data))
        parsed = parse_layout({"prompt": layout.get("prompt"), "regions": regions}, base_dir=folder)
    colours = studio.get("colours") or list(range(len(parsed.regions)))
    labels = layout_labels(parsed, height, width, colours)
    phrases = [""] * len(PALETTE)
    for colour, region in zip(colours, parsed.regions):
        phrases[colour] = region.phrase
    return Restored(settings, labels, phrases, all(r.box is not None for r in parsed.regions), notes)


# ----------------------------------------------------------------------------------------------------------
# The viewer's pictures

# A perceptual dark-to-light ramp (magma's ends and three stops between) for the attention maps.
RAMP = np.array([(0, 0, 4), (81, 18, 124), (183, 55, 121), (252, 137, 97), (252, 253, 191)], dtype=np.float64)


def display_scale(height: int, width: int, side: int = 384) -> int:
    """The integer factor that shows an image of this size with its longer side close to `side` (at least 1)."""
    return max(1, round(side / max(height, width)))


def enlarge(array: np.ndarray, k: int) -> np.ndarray:
    return array.repeat(k, 0).repeat(k, 1) if k > 1 else array


def outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """The pixels of `mask` within `thickness` of its edge (the image border counts as outside)."""
    inner = mask.copy()
    for _ in range(thickness):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def outlined_image(image: Image.Image, regions: list[StudioRegion], side: int = 512) -> Image.Image:
    """The image enlarged, each region outlined in its brush colour and tagged with its phrase."""
    k = display_scale(image.height, image.width, side)
    pixels = enlarge(np.asarray(image.convert("RGB")), k).copy()
    for r in regions:
        pixels[outline(enlarge(r.mask, k), max(2, k))] = PALETTE[r.colour][1]
    canvas = Image.fromarray(pixels)
    draw, face = ImageDraw.Draw(canvas), font(max(12, canvas.width // 28))
    for r in regions:
        rows, cols = np.nonzero(r.mask)
        x, y = int(cols.min()) * k + 4, int(rows.min()) * k + 4
        left, top, right, bottom = draw.textbbox((x, y), r.phrase, font=face)
        draw.rectangle((left - 3, top - 2, right + 3, bottom + 2), fill=PALETTE[r.colour][1])
        draw.text((x, y), r.phrase, font=face, fill=text_colour(PALETTE[r.colour][1]))
    return canvas


def text_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def attention_overlay(image: Image.Image, attention: np.ndarray, region: StudioRegion, side: int = 384) -> Image.Image:
    """A phrase's attention map (rows, cols) as a heat map over the darkened image, its region outlined."""
    h, w = image.height, image.width
    rows, cols = attention.shape
    peak = float(attention.max())
    v = attention / peak if peak > 0 else np.zeros_like(attention)
    v = enlarge(v, h // rows) if h // rows == w // cols else sample_nearest(v, h, w)
    heat = np.stack([np.interp(v, np.linspace(0, 1, len(RAMP)), RAMP[:, c]) for c in range(3)], -1)  # (H, W, 3)
    grey = np.asarray(image.convert("L"), dtype=np.float64)[..., None]
    blend = 0.3 * grey + 0.7 * heat
    k = display_scale(h, w, side)
    pixels = enlarge(blend.round().clip(0, 255).astype(np.uint8), k).copy()
    pixels[outline(enlarge(region.mask, k), 2)] = PALETTE[region.colour][1]
    return Image.fromarray(pixels)


def denoise_strip(previews: list[np.ndarray], final: Image.Image, tile: int = 72) -> Image.Image:
    """One tile per step (the latent preview after that step, numbered) and the decoded image last, in rows of at
    most 11 of equal length."""
    tiles = [Image.fromarray(p) for p in previews] + [final.convert("RGB")]
    gap, label = 6, 16
    n_rows = -(-len(tiles) // 11)
    per_row = -(-len(tiles) // n_rows)
    strip = Image.new("RGB", (per_row * (tile + gap) - gap, n_rows * (tile + label + gap) - gap), (255, 255, 255))
    draw, face = ImageDraw.Draw(strip), font(11)
    for i, t in enumerate(tiles):
        x, y = (i % per_row) * (tile + gap), (i // per_row) * (tile + label + gap)
        strip.paste(t.resize((tile, tile), Image.NEAREST if t.width <= tile else Image.BILINEAR), (x, y))
        draw.text((x + 2, y + tile + 1), "image" if i == len(previews) else f"step {i + 1}", font=face,
                  fill=(80, 80, 80))
    return strip


def preview(latents, scale: int = 4) -> np.ndarray:
    """A step's latents as a small RGB picture (no VAE: `latent_preview`'s fixed linear map)."""
    if __package__:  # imported as `scripts.studio` (a notebook, the tests)
        from .preview import latent_preview
    else:  # run as `python scripts/studio.py`: Python looks for imports in this folder first
        from preview import latent_preview

    return latent_preview(latents[:1], scale=scale)[0].numpy()


# ----------------------------------------------------------------------------------------------------------
# One generation, as the page runs it


@dataclass(frozen=True)
class Request:
    """What the page asks for."""

    prompt: str
    regions: list[StudioRegion]
    preset: str
    strength: float
    steps: int
    cfg: float
    seed: int
    height: int
    width: int
    compare: bool
    regional: RegionalConfig | None = None  # None: DenseDiffusion (preset, strength); else Regional Prompting
    background: str = ""  # Regional Prompting's prompt for the image tokens in no region


@dataclass(frozen=True)
class Outcome:
    """What the page shows and offers for download."""

    image: Image.Image
    plain: Image.Image | None  # the same seed without the layout
    outlined: Image.Image
    maps: list[tuple[Image.Image, str]]  # overlay, caption (none under Regional Prompting)
    shares: list[tuple[StudioRegion, float, float | None]]  # region, its area, its attention's in-region share
    strip: Image.Image
    png: Path
    layout: Path
    command: str
    seconds: float  # the pipeline call with the layout
    plain_seconds: float | None
    warnings: tuple[str, ...]


def generate(pipe, request: Request, folder: Path, model_arg: str | None, progress=None) -> Outcome:
    """Run the pipeline on the request, write the PNG and the layout download into `folder`."""
    if request.preset not in PRESET_NAMES:
        raise InputError(f"unknown preset {request.preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    layout = to_layout(request.regions, request.prompt)
    previews: list[np.ndarray] = []
    steps = request.steps

    def step(i, latents):
        previews.append(preview(latents, scale=max(1, 64 // latents.shape[-1])))
        if progress is not None:
            progress((i + 1, steps), desc="denoising", unit="steps")

    options = dict(seed=request.seed, steps=steps, cfg=request.cfg, height=request.height, width=request.width)
    if request.regional is None:
        method = dict(dense_preset=request.preset, dense_strength=request.strength, record_maps=True)
    else:  # its mask decides where each phrase attends, so there are no maps to record
        method = dict(layout_method="regional", regional=request.regional, background_prompt=request.background)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. a phrase found only in the CLIP tokens
            warnings.simplefilter("always")
            result = pipe(layout=layout, callback=step, **method, **options)
    except InputError as e:
        raise check_fits(e, request.regions, request.prompt) from None
    seconds = time.perf_counter() - started
    plain, plain_seconds = None, None
    if request.compare:
        if progress is not None:
            progress(0, desc="without the layout")
        started = time.perf_counter()
        plain = pipe(request.prompt, **options).images[0]
        plain_seconds = time.perf_counter() - started
    image = result.images[0]
    maps, shares = [], []
    if result.maps is None:
        tokens = assign_tokens(torch.from_numpy(np.stack([r.mask for r in request.regions])))
        shares = [(r, area, None) for r, area in zip(request.regions, tokens.area)]
    else:
        stats = {s["region"]: s for s in result.maps.to_stats()["regions"]}
        for n, attention in result.maps.region_maps().items():
            region, s = request.regions[n], stats[n]
            share = "—" if s["in_region_fraction"] is None else f"{s['in_region_fraction']:.0%}"
            maps.append((attention_overlay(image, attention.numpy(), region), f'"{region.phrase}": {share} inside'))
            shares.append((region, s["area"], s["in_region_fraction"]))
    files = layout_files(request.regions, request.prompt)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"studio_seed{request.seed}.png"
    # The page's own part of the record: each region's brush colour and the masks themselves (the layout names
    # them by file), so that dropping the PNG back restores the canvas.
    record = {**result.record, "image_index": 0, "studio": {
        "colours": [r.colour for r in request.regions],
        "masks": {n: base64.b64encode(b).decode() for n, b in files.items() if n.endswith(".png")}}}
    save_png(png, np.asarray(image), record)
    if len(files) == 1:
        layout_path = folder / "layout.json"
        layout_path.write_bytes(files["layout.json"])
    else:
        layout_path = folder / "layout.zip"
        with zipfile.ZipFile(layout_path, "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
    notes = tuple(result.warnings) + tuple(friendly(str(w.message), request.regions) for w in caught
                                           if str(w.message).startswith("regions["))
    return Outcome(image, plain, outlined_image(image, request.regions), maps, shares,
                   denoise_strip(previews, image), png, layout_path, cli_command(request, model_arg), seconds,
                   plain_seconds, notes)


def share_table(shares: list[tuple[StudioRegion, float, float | None]]) -> str:
    """The in-region shares as a Markdown table: how much of each phrase's attention lands inside its region."""
    rows = [f"| {r.name} | {r.phrase} | {area:.0%} | {'—' if share is None else f'{share:.0%}'} |"
            for r, area, share in shares]
    return "\n".join(["| region | phrase | its share of the image tokens | its phrase's attention inside it |",
                      "|---|---|---|---|", *rows])


def cli_command(request: Request, model_arg: str | None) -> str:
    """The command line that makes the same image from the layout download (floats as Python writes them, which
    read back to the same numbers)."""
    import shlex

    model = f" --model {shlex.quote(model_arg)}" if model_arg else ""
    r = request.regional
    if r is None:
        method = f"--dense-preset {request.preset} --dense-strength {request.strength}"
    else:
        method = (f"--layout-method regional --base-ratio {r.base_ratio} --inject-steps {r.inject_steps} "
                  f"--inject-interval {r.inject_interval} --background-prompt {shlex.quote(request.background)}")
    return (f"python scripts/generate.py{model} --layout layout.json --seed {request.seed} --steps {request.steps} "
            f"--cfg {request.cfg} --height {request.height} --width {request.width} {method} --out image.png")


# ----------------------------------------------------------------------------------------------------------
# The page

CSS = """
.gradio-container { max-width: 1440px !important; }
#studio-title h1 { margin-bottom: 0; }
#studio-title p { margin-top: 4px; color: var(--body-text-color-subdued); }
#result img, #plain img { width: 100%; height: 100%; object-fit: contain; }
.pixelated img { image-rendering: pixelated; }
#studio-time { font-size: 1.05em; }
#studio-command textarea { font-family: ui-monospace, monospace; font-size: 12px; }
#generate-button { min-height: 48px; font-size: 1.1em; }
""" + "".join(f".phrase-{i} textarea, .phrase-{i} input {{ border-left: 8px solid {hex_colour(c)} !important; }}\n"
              for i, (_, c) in enumerate(PALETTE))

INTRO = """# Layout studio
Pick a brush colour and paint where a thing goes; each colour is a region and gets a phrase. The phrases make the
prompt. Generate, and see where each phrase's attention went. The grid shows the image tokens (16×16 pixels)."""


def build_page(pipe, model_arg: str | None = None):
    """The Gradio page (a `gr.Blocks`) on a loaded `loaders.Pipeline`; `model_arg` is how --model named it."""
    import gradio as gr

    size = pipe.defaults.size
    preset = pipe.preset
    runs = Path(tempfile.mkdtemp(prefix="sd3-studio-"))
    counter = iter(range(10**9))

    def row_updates(labels: np.ndarray) -> list:
        painted = painted_colours(labels)
        return [gr.update(visible=i in painted) for i in range(len(PALETTE))]

    def summary(labels: np.ndarray) -> str:
        painted = painted_colours(labels)
        if not painted:
            return "No region yet: pick a colour in the brush menu and paint."
        return "Regions: " + ", ".join(f"**{colour_name(c)}** {np.count_nonzero(labels == c) / labels.size:.0%}"
                                       for c in painted) + " of the image."

    # The labels (H, W) at the output size live in a State, so that Generate does not send the canvas again.
    def on_paint(editor, old, base, prompt, *phrases):
        base, phrases = base or "", [p or "" for p in phrases]  # hidden boxes send None
        labels = editor_labels(editor, *old.shape)
        now = painted_colours(labels)
        # Only a changed set of regions assembles the prompt again: the editor fires often, and this call's prompt
        # may be older than the one a phrase's event has since written.
        prompt = assemble_prompt(base, [phrases[c] for c in now]) if now != painted_colours(old) else gr.skip()
        return [labels, prompt, summary(labels), *row_updates(labels)]

    def on_phrase(base, labels, *phrases):
        return assemble_prompt(base or "", [phrases[c] or "" for c in painted_colours(labels)])

    def on_size(labels, height, width):
        labels = sample_nearest(labels, int(height), int(width))
        return render_canvas(labels), labels

    def loaded(labels, phrases, prompt, boxes, notes, settings=None):
        """The updates that put imported regions (and settings) on the page."""
        height, width = labels.shape
        texts = [phrases[i] if i < len(phrases) else "" for i in range(len(PALETTE))]
        painted = painted_colours(labels)
        base = split_prompt(prompt, [texts[c] for c in painted])
        settings = settings or {}
        pick = lambda key: settings[key] if settings.get(key) is not None else gr.skip()  # noqa: E731
        message = "Imported " + ", ".join(f"{colour_name(c)}: {texts[c]!r}" for c in painted) + "."
        if notes:
            message += " Note: " + "; ".join(notes) + "."
        return [render_canvas(labels), labels, height, width, "" if base is None else base, prompt,
                summary(labels), boxes, message, pick("seed"), pick("steps"), pick("cfg"), pick("dense_preset"),
                pick("dense_strength"), pick("layout_method"), pick("base_ratio"), pick("inject_steps"),
                pick("inject_interval"), pick("background_prompt"),
                *[gr.update(value=texts[i], visible=i in painted) for i in range(len(PALETTE))]]

    def import_layout(files, labels):
        if not files:
            return [gr.skip()] * len(import_outputs)
        try:
            upload = read_layout_upload(files, *labels.shape)
            prompt = upload.prompt if upload.prompt is not None else assemble_prompt("", upload.phrases)
            # a background prompt is Regional Prompting's: the page switches to it
            settings = {"layout_method": "regional", "background_prompt": upload.background} \
                if upload.background is not None else None
            return loaded(upload.labels, upload.phrases, prompt, upload.boxes, [], settings)
        except InputError as e:
            raise gr.Error(str(e), duration=None) from None

    def import_mask(file, mapping, labels):
        try:
            if not file:
                raise InputError("upload the colour-coded mask image first")
            image = read_image(file, "colour mask")
            if not (mapping or "").strip():
                found = "\n".join(f"{hex_colour(c)}: " for c, share in mask_colours(image, 8) if share >= 0.005)
                raise InputError("give a phrase for each colour in the map (one '#ff0000: a red rose' per line); "
                                 f"this mask's colours are:\n{found}")
            entries = parse_colour_map(mapping)
            empty = [hex_colour(c) for c, p in entries if not p]
            if empty:
                raise InputError(f"the colour map gives no phrase for {', '.join(empty)}")
            labels, phrases = colour_mask_labels(image, entries, *labels.shape)
            return loaded(labels, phrases, assemble_prompt("", phrases), False, [])
        except InputError as e:
            raise gr.Error(str(e), duration=None) from None

    def import_png(file):
        if not file:
            return [gr.skip()] * len(import_outputs)
        try:
            restored = restore_png(file, pipe.source.label)
        except InputError as e:
            raise gr.Error(str(e), duration=None) from None
        s = restored.settings
        labels = restored.labels
        if labels is None:
            labels = np.full((int(s["height"] or size), int(s["width"] or size)), -1, dtype=np.int16)
        return loaded(labels, restored.phrases, s["prompt"] or "", restored.boxes, restored.notes, s)

    def on_method(method):
        return [gr.update(visible=method == "dense"), gr.update(visible=method == "regional")]

    def run(labels, prompt, boxes, preset_name, strength, steps, cfg, seed, compare, method, base_ratio,
            inject_steps, inject_interval, background, *phrases, progress=gr.Progress()):
        clicked = time.perf_counter()
        try:
            regions = studio_regions(labels, [p or "" for p in phrases], bool(boxes))
            regional = RegionalConfig(float(base_ratio), int(inject_steps), int(inject_interval)) \
                if method == "regional" else None
            request = Request((prompt or "").strip(), regions, preset_name, float(strength), int(steps), float(cfg),
                              int(seed), *labels.shape, bool(compare), regional, background or "")
            outcome = generate(pipe, request, runs / f"{next(counter):06d}", model_arg, progress)
        except InputError as e:
            raise gr.Error(str(e), duration=None) from None
        prune(runs, keep=8)
        page = time.perf_counter() - clicked - outcome.seconds - (outcome.plain_seconds or 0)
        timing = (f"**{outcome.seconds:.2f} s** to generate ({request.steps} steps, {request.width}×{request.height}, "
                  f"seed {request.seed})" + (f" · without the layout {outcome.plain_seconds:.2f} s"
                                             if outcome.plain_seconds is not None else "")
                  + f" · the page's own work {page:.2f} s")
        notes = "".join(f"\n\n⚠ {w}" for w in outcome.warnings)
        table = share_table(outcome.shares)
        if regional is not None:
            table = (f"Regional Prompting masks the attention (each phrase's text and its region's image tokens "
                     f"see each other only) in the first {regional.inject_steps} steps, so there is no map to "
                     "measure; the maps are DenseDiffusion's.\n\n" + table)
        pixelated = ["pixelated"] if max(request.height, request.width) < 384 else []
        return [gr.update(value=outcome.image, elem_classes=pixelated),
                gr.update(value=outcome.plain, visible=outcome.plain is not None, elem_classes=pixelated),
                outcome.outlined, gr.update(value=outcome.maps, visible=bool(outcome.maps)), table, outcome.strip,
                timing + notes,
                gr.update(value=str(outcome.png), interactive=True),
                gr.update(value=str(outcome.layout), interactive=True, label=f"Layout ({outcome.layout.name})"),
                outcome.command]

    with gr.Blocks(title="sd3-minimal layout studio", delete_cache=(3600, 3600)) as page:
        model_name = f"{model_arg} ({pipe.defaults.variant})" if model_arg else "the built-in tiny model (shapes)"
        gr.Markdown(INTRO + f"\n\nModel: **{model_name}**, by default {size}×{size}, {preset.steps} steps, "
                    f"CFG {preset.cfg:g}.", elem_id="studio-title")
        labels_state = gr.State(np.full((size, size), -1, dtype=np.int16))
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=420):
                editor = gr.ImageEditor(
                    value=blank_canvas(size, size), elem_id="studio-canvas", label="Regions", type="numpy",
                    image_mode="RGBA", sources=(), transforms=(), format="png", height=600,
                    canvas_size=canvas_size(size, size)[::-1],
                    brush=gr.Brush(colors=[hex_colour(c) for _, c in PALETTE], color_mode="fixed",
                                   default_size=max(8, canvas_size(size, size)[0] // 12)),
                    layers=gr.LayerOptions(allow_additional_layers=False, layers=["regions"], disabled=True),
                    buttons=[])
                region_summary = gr.Markdown("No region yet: pick a colour in the brush menu and paint.",
                                             elem_id="region-summary")
                phrase_boxes = [gr.Textbox(label=f"{name} region: phrase", placeholder=f"what goes in the {name} region",
                                           visible=False, elem_classes=[f"phrase-{i}"], elem_id=f"phrase-{i}",
                                           max_lines=1)
                                for i, (name, _) in enumerate(PALETTE)]
                base = gr.Textbox(label="Base prompt (optional; before the phrases)", elem_id="base-prompt",
                                  max_lines=2)
                prompt = gr.Textbox(label="Prompt (assembled from the phrases; edit freely, every phrase must stay "
                                    "in it word for word)", elem_id="prompt", lines=2)
                with gr.Row():
                    method = gr.Radio(list(METHODS), value="dense", label="Layout method (docs/layout-control.md)",
                                      elem_id="layout-method")
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed", minimum=0)
                with gr.Row(visible=True) as dense_row:
                    preset_box = gr.Dropdown(list(PRESET_NAMES), value="faithful", label="Preset",
                                             elem_id="preset")
                    strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Strength", elem_id="strength")
                regional_defaults = RegionalConfig()
                with gr.Group(visible=False) as regional_group:
                    with gr.Row():
                        base_ratio = gr.Slider(0, 1, value=regional_defaults.base_ratio, step=0.05,
                                               label="Base ratio β", info="the whole prompt's share",
                                               elem_id="base-ratio")
                        inject_steps = gr.Slider(0, 100, value=regional_defaults.inject_steps, step=1,
                                                 label="Inject steps", info="the first steps masked",
                                                 elem_id="inject-steps")
                        inject_interval = gr.Slider(1, 8, value=regional_defaults.inject_interval, step=1,
                                                    label="Block interval", info="mask every k-th block",
                                                    elem_id="inject-interval")
                    background = gr.Textbox(label="Background prompt (for the unpainted image; empty: any scene)",
                                            elem_id="background-prompt", max_lines=1)
                with gr.Row():
                    steps = gr.Slider(1, 100, value=preset.steps, step=1, label="Steps", elem_id="steps")
                    cfg = gr.Slider(1, 15, value=preset.cfg, step=0.5, label="CFG", elem_id="cfg")
                with gr.Row():
                    width = gr.Slider(64, 2048, value=size, step=16, label="Width", elem_id="width")
                    height = gr.Slider(64, 2048, value=size, step=16, label="Height", elem_id="height")
                with gr.Row():
                    compare = gr.Checkbox(False, label="Compare with no layout (same seed)", elem_id="compare")
                    boxes = gr.Checkbox(False, label="Regions as boxes (each colour's bounding box)",
                                        elem_id="boxes")
                go = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Accordion("Import a layout, a colour mask or a PNG made here", open=False):
                    png_in = gr.File(label="Drop a PNG made here (or by scripts/generate.py) to restore its settings "
                                     "and regions", file_types=[".png"], elem_id="png-in")
                    layout_in = gr.File(label="The CLI's layout: layout.json with its mask images, or layout.zip",
                                        file_count="multiple", file_types=[".json", ".png", ".zip"],
                                        elem_id="layout-in")
                    with gr.Row():
                        mask_in = gr.File(label="Colour-coded mask (A1111 / ComfyUI regional prompting)",
                                          file_types=["image"], elem_id="mask-in")
                        mapping = gr.Textbox(label="Colour -> phrase, one per line", lines=4, elem_id="mapping",
                                             placeholder="#ff0000: a red circle\n#0000ff: a blue square")
                    mask_go = gr.Button("Import the colour mask", elem_id="mask-go")
            with gr.Column(scale=6, min_width=480):
                timing = gr.Markdown("Paint, type the phrases, press **Generate**.", elem_id="studio-time")
                with gr.Row():
                    image = gr.Image(label="Image", type="pil", format="png", interactive=False, elem_id="result",
                                     height=400, buttons=["fullscreen"])
                    plain = gr.Image(label="Without the layout (same seed)", type="pil", format="png",
                                     interactive=False, visible=False, elem_id="plain", height=400,
                                     buttons=["fullscreen"])
                    outlined = gr.Image(label="Regions", type="pil", format="png", interactive=False,
                                        elem_id="outlined", height=400, buttons=["fullscreen"])
                maps = gr.Gallery(label="Where each phrase looks: its attention map, its region outlined",
                                  columns=3, height=350, format="png", elem_id="maps", object_fit="contain")
                maps_table = gr.Markdown(elem_id="maps-table")
                gr.Markdown("**Denoising**: the latents after each step (a fixed colour map, no VAE), then the image")
                strip = gr.Image(show_label=False, type="pil", format="png", interactive=False, elem_id="strip",
                                 buttons=["fullscreen"])
                with gr.Row():
                    png_out = gr.DownloadButton("PNG with its settings", interactive=False, elem_id="png-out")
                    layout_out = gr.DownloadButton("Layout", interactive=False, elem_id="layout-out")
                command = gr.Textbox(label="The same image from the command line (unpack the layout download "
                                     "first)", lines=2, interactive=False, elem_id="studio-command",
                                     buttons=["copy"])

        phrases = list(phrase_boxes)
        editor.input(on_paint, [editor, labels_state, base, prompt, *phrases],
                     [labels_state, prompt, region_summary, *phrases], queue=False, show_progress="hidden",
                     trigger_mode="always_last")
        for box in [base, *phrases]:
            box.input(on_phrase, [base, labels_state, *phrases], prompt, queue=False, show_progress="hidden",
                      trigger_mode="always_last")
        for slider in (width, height):
            slider.release(on_size, [labels_state, height, width], [editor, labels_state], queue=False).then(
                None, js=SELECT_BRUSH)
        method.change(on_method, method, [dense_row, regional_group], queue=False, show_progress="hidden")
        import_outputs = [editor, labels_state, height, width, base, prompt, region_summary, boxes, timing, seed,
                          steps, cfg, preset_box, strength, method, base_ratio, inject_steps, inject_interval,
                          background, *phrases]
        layout_in.upload(import_layout, [layout_in, labels_state], import_outputs, queue=False).then(
            None, js=SELECT_BRUSH)
        mask_go.click(import_mask, [mask_in, mapping, labels_state], import_outputs, queue=False).then(
            None, js=SELECT_BRUSH)
        png_in.upload(import_png, [png_in], import_outputs, queue=False).then(None, js=SELECT_BRUSH)
        go.click(run, [labels_state, prompt, boxes, preset_box, strength, steps, cfg, seed, compare, method,
                       base_ratio, inject_steps, inject_interval, background, *phrases],
                 [image, plain, outlined, maps, maps_table, strip, timing, png_out, layout_out, command],
                 concurrency_limit=1, concurrency_id="pipeline", api_visibility="private")
    return page


# After the canvas is replaced from Python, Gradio's editor stops drawing until a tool is picked again.
SELECT_BRUSH = "() => { document.querySelector('#studio-canvas button[aria-label=Brush]')?.click(); }"


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` run folders (their files were copied into Gradio's cache)."""
    runs = sorted(p for p in folder.iterdir() if p.is_dir())
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


THEME_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"]  # no web fonts: no traffic
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def launch(model=None, *, host: str = "127.0.0.1", port: int | None = None, inline: bool | None = None,
           block: bool | None = None, quiet: bool = False):
    """Start the page on `model` (a `loaders.Pipeline`, or what `--model` takes; None: the built-in model).

    Binds to `host` (loopback by default; anything else is reachable from other machines and prints a warning),
    never with a public share link. `inline`: show the page in the notebook cell (default: in a notebook).
    `block`: wait until interrupted (default: yes from a script, no in a notebook). Returns the `gr.Blocks`;
    `.local_url` says where it is, `.close()` stops it.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry: the page talks to no one else
    import gradio as gr

    from loaders import Pipeline

    if host not in LOOPBACK:
        print(f"warning: --host {host} makes the studio reachable from other machines on the network, with no "
              "login; anyone who reaches it can use this machine to generate", file=sys.stderr)
    pipe = model if isinstance(model, Pipeline) else Pipeline.load(model, keep_loaded=True)
    model_arg = None if isinstance(model, Pipeline) else model
    if isinstance(model, Pipeline) and not model.source.builtin:
        model_arg = model.source.label
    page = build_page(pipe, model_arg)
    page.queue(default_concurrency_limit=1, max_size=32)
    notebook = bool(getattr(sys, "ps1", None)) or "ipykernel" in sys.modules
    page.launch(server_name=host, server_port=port, share=False, inline=inline, quiet=quiet,
                prevent_thread_lock=True, show_error=False, max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False,
                pwa=False, mcp_server=False, enable_monitoring=False, run_history=False,
                footer_links=[], css=CSS,
                theme=gr.themes.Soft(primary_hue="indigo", font=THEME_FONTS, font_mono=["ui-monospace", "monospace"]))
    if block if block is not None else not notebook:
        try:
            page.block_thread()
        except KeyboardInterrupt:
            page.close()
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="as in generate.py (default: the built-in tiny model)")
    p.add_argument("--port", type=int, help="default: Gradio's 7860 (the next free one if it is taken)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    args = p.parse_args(argv)
    try:
        launch(args.model, host=args.host, port=args.port)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
