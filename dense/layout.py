"""The layout file: which phrase of the prompt goes where in the image (docs/densediffusion.md §2).

A layout is a small JSON file::

    {"prompt": "a red rose floating on a blue ocean",            # optional
     "regions": [{"phrase": "a blue ocean", "mask": "ocean.png"},  # mask path relative to the JSON
                 {"phrase": "a red rose", "box": [0.35, 0.40, 0.65, 0.70]},
                 {"phrase": "", "box": [0, 0, 1, 0.2]}],          # "" = background, no words
     "background": "a calm sky"}                                   # optional: Regional Prompting's background

Reading it checks everything that can be checked without a tokenizer and without knowing the output
size, so a bad layout fails before any model is loaded; mask images are read (and thresholded) right
away for the same reason. Rasterising to the output size happens later, in `region_masks`. Problems
that need the tokenizer (phrase not in the prompt) or the output size (region too small to own a
token) are raised by `dense.tokens` with the same `LayoutError`.

Every message names the region as ``regions[i] ("phrase")`` (0-based, as in the JSON) and says how to
fix it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmdit.errors import InputError

MAX_REGIONS = 16
LAYOUT_KEYS = ("prompt", "regions", "background")
REGION_KEYS = ("phrase", "mask", "box")


class LayoutError(InputError):
    """Anything wrong with a layout: the file, a region, a mask, or a phrase that is not in the prompt."""


@dataclass(frozen=True, eq=False)
class Region:
    """One region of a layout: a phrase and where it goes (exactly one of `box` and `mask`)."""

    phrase: str  # "" for a background region with no words of its own
    box: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1), fractions of width and height
    mask: Tensor | None = None  # (H_src, W_src) bool: the mask image at its own size, grey >= 128
    mask_path: Path | None = None  # where `mask` was read from (for messages)


@dataclass(frozen=True, eq=False)
class Layout:
    prompt: str | None  # the layout's own "prompt", if it has one
    regions: tuple[Region, ...]
    path: Path | None = None  # the JSON file, if the layout came from one
    background: str | None = None  # Regional Prompting's prompt for the tokens of no worded region, if given


def region_name(index: int, phrase: str) -> str:
    """How messages refer to a region: ``regions[2] ("a red rose")``."""
    return f'regions[{index}] ("{phrase}")' if phrase else f"regions[{index}] (background, empty phrase)"


# ----------------------------------------------------------------------------------------------------------
# Reading and validating


def read_layout(path: str | Path) -> Layout:
    """Read and validate a layout JSON file; mask paths are resolved relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LayoutError(f"cannot read the layout file {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LayoutError(f"the layout file {path} is not valid JSON: {e}") from e
    layout = parse_layout(data, base_dir=path.parent)
    return Layout(prompt=layout.prompt, regions=layout.regions, path=path, background=layout.background)


def parse_layout(data: object, base_dir: str | Path = ".") -> Layout:
    """Validate an already-decoded layout (a dict as in the JSON) and read its mask images."""
    if not isinstance(data, dict):
        raise LayoutError(f"a layout must be a JSON object with a \"regions\" list, got {type(data).__name__}")
    unknown = [k for k in data if k not in LAYOUT_KEYS]
    if unknown:
        raise LayoutError(f"the layout has unknown key(s) {unknown}; allowed keys are {list(LAYOUT_KEYS)}")
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise LayoutError(f'the layout\'s "prompt" must be a string, got {type(prompt).__name__}')
    background = data.get("background")
    if background is not None and not isinstance(background, str):
        raise LayoutError(f'the layout\'s "background" (Regional Prompting\'s background prompt) must be a string, '
                          f"got {type(background).__name__}")
    regions = data.get("regions")
    if not isinstance(regions, list) or not regions:
        raise LayoutError('the layout needs a non-empty "regions" list: [{"phrase": ..., "box": [x0, y0, x1, y1]}, ...]')
    if len(regions) > MAX_REGIONS:
        raise LayoutError(f"the layout has {len(regions)} regions; at most {MAX_REGIONS} are supported, "
                          "merge some regions")
    base_dir = Path(base_dir)
    return Layout(prompt=prompt, regions=tuple(_parse_region(i, r, base_dir) for i, r in enumerate(regions)),
                  background=background)


def _parse_region(index: int, data: object, base_dir: Path) -> Region:
    if not isinstance(data, dict):
        raise LayoutError(f"regions[{index}] must be a JSON object like "
                          f'{{"phrase": "a red rose", "box": [0.3, 0.4, 0.6, 0.7]}}, got {type(data).__name__}')
    phrase = data.get("phrase")
    if "phrase" not in data:
        raise LayoutError(f'regions[{index}] has no "phrase"; use "phrase": "" for a background region')
    if not isinstance(phrase, str):
        raise LayoutError(f'regions[{index}]: "phrase" must be a string, got {type(phrase).__name__}')
    name = region_name(index, phrase)
    if phrase and not phrase.strip():
        raise LayoutError(f'{name}: the phrase is only whitespace; use "" for a background region')
    unknown = [k for k in data if k not in REGION_KEYS]
    if unknown:
        raise LayoutError(f"{name}: unknown key(s) {unknown}; a region has \"phrase\" and one of \"mask\" or \"box\"")
    has_mask, has_box = "mask" in data, "box" in data
    if has_mask and has_box:
        raise LayoutError(f'{name}: has both "mask" and "box"; give exactly one of them')
    if not has_mask and not has_box:
        raise LayoutError(f'{name}: has neither "mask" nor "box"; give exactly one of them')
    if has_box:
        return Region(phrase=phrase, box=_parse_box(name, data["box"]))
    mask_path = data["mask"]
    if not isinstance(mask_path, str) or not mask_path:
        raise LayoutError(f'{name}: "mask" must be the path of an image file (relative to the layout file)')
    path = base_dir / mask_path
    return Region(phrase=phrase, mask=read_mask(path, name), mask_path=path)


def _parse_box(name: str, box: object) -> tuple[float, float, float, float]:
    shape_hint = "[x0, y0, x1, y1] as fractions of width and height, e.g. [0.25, 0.4, 0.75, 0.9]"
    # bool is an int subclass in Python; `true` in a box is a typo, not the number 1
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise LayoutError(f'{name}: "box" must be four numbers {shape_hint}, got {box!r}')
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise LayoutError(f'{name}: "box" {box} is out of range; every value must lie in [0, 1] ({shape_hint})')
    if not (x0 < x1 and y0 < y1):
        raise LayoutError(f'{name}: "box" {box} is empty; it needs x0 < x1 and y0 < y1 ({shape_hint})')
    return (x0, y0, x1, y1)


WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's 16/32-bit integer greyscale modes


def read_mask(path: str | Path, name: str = "mask") -> Tensor:
    """Read a mask image at its own size: (H_src, W_src) bool, True where the grey value is >= 128.

    Colour images are converted to grey with PIL's ITU-R 601 luma (alpha is ignored); 16-bit grey
    images are compared on their top 8 bits (value >= 32768), float ones ("F") at 0.5. A colour image in which
    no pixel is light enough is an error that says so (instead of a region that later covers no token).
    """
    import warnings

    from PIL import Image  # imported here so that `import dense` stays light

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over PIL's limit: refused
            image = Image.open(path)
        with image:
            image.load()
            colour = image.mode not in ("1", "L", "LA", "F", *WIDE_GREY) and _has_colour(image)
            if image.mode in WIDE_GREY:
                inside = (np.asarray(image, dtype=np.int64) >> 8) >= 128
            elif image.mode == "F":
                inside = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0) >= 0.5
            else:
                inside = np.asarray(image.convert("L")) >= 128
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:  # PIL's decoders raise all of these
        raise LayoutError(f"{name}: cannot read the mask image {path}: {e}") from e
    if colour and not inside.any():
        raise LayoutError(f"{name}: the mask image {path} is in colour and none of its pixels is light enough to be "
                          "inside (grey >= 128 after conversion to grey); a mask is black and white: white = the "
                          "region, black = elsewhere")
    return torch.from_numpy(np.ascontiguousarray(inside))  # (H_src, W_src) bool


def _has_colour(image) -> bool:
    """Whether an image's colour channels differ anywhere (a grey picture saved as RGB or palette has none)."""
    channels = np.asarray(image.convert("RGB"))
    return not (channels == channels[..., :1]).all()


def layout_prompt(layout: Layout, prompt: str | None) -> str:
    """The prompt to generate: the given one, the layout's, or both when they agree."""
    if prompt is None:
        if layout.prompt is None:
            raise LayoutError('no prompt: give one on the command line or add "prompt" to the layout file')
        return layout.prompt
    if layout.prompt is not None and layout.prompt != prompt:
        raise LayoutError(f'the layout\'s "prompt" {layout.prompt!r} differs from the prompt being generated '
                          f"{prompt!r}; make them equal or drop one of them")
    return prompt


# ----------------------------------------------------------------------------------------------------------
# Rasterising at the output size


def box_mask(box: tuple[float, float, float, float], height: int, width: int) -> Tensor:
    """(H, W) bool: pixels whose centre ((x+0.5)/W, (y+0.5)/H) lies in [x0, x1) × [y0, y1)."""
    x0, y0, x1, y1 = box
    # float64 so that a box edge given as a "round" fraction compares the way the decimal suggests
    cx = (torch.arange(width, dtype=torch.float64) + 0.5) / width  # (W,)
    cy = (torch.arange(height, dtype=torch.float64) + 0.5) / height  # (H,)
    inside_x = (cx >= x0) & (cx < x1)
    inside_y = (cy >= y0) & (cy < y1)
    return inside_y[:, None] & inside_x[None, :]  # (H, W)


def resize_nearest(mask: Tensor, height: int, width: int) -> Tensor:
    """Nearest-neighbour resize of a (h, w) mask, sampling the source pixel under each output pixel centre.

    Output pixel y reads source row floor((y + 0.5) · h / H), in exact integer arithmetic (the same rule as
    PIL's NEAREST and torch's "nearest-exact", without their floating-point edge cases).
    """
    h, w = mask.shape
    if (h, w) == (height, width):
        return mask
    rows = (2 * torch.arange(height) + 1) * h // (2 * height)  # (H,)
    cols = (2 * torch.arange(width) + 1) * w // (2 * width)  # (W,)
    return mask[rows[:, None], cols[None, :]]  # (H, W)


def region_masks(layout: Layout, height: int, width: int) -> Tensor:
    """Every region as a pixel mask at the output size: (R, H, W) bool, in layout order."""
    masks = []
    for region in layout.regions:
        if region.box is not None:
            masks.append(box_mask(region.box, height, width))
        else:
            assert region.mask is not None
            masks.append(resize_nearest(region.mask, height, width))
    return torch.stack(masks)  # (R, H, W)
