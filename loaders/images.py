"""Init images and masks for image-to-image and inpainting, prepared as diffusers' `VaeImageProcessor` does.

`StableDiffusion3Img2ImgPipeline` / `StableDiffusion3InpaintPipeline` resize a PIL image to the requested size with
Lanczos resampling (in the image's own mode), scale it to [0, 1] as float32 and then to [-1, 1]; a mask is
resized the same way, converted to greyscale ("L"), scaled to [0, 1] and binarised at 0.5 (white = repaint,
black = keep). We do exactly that for 8-bit images, and add what diffusers leaves to the caller:
* any other 8-bit mode PIL reads (greyscale, palette, RGBA, CMYK, YCbCr, ...) is converted to RGB first, as
  `Image.convert` does it (the alpha channel is dropped, as diffusers drops it);
* high-bit-depth greyscale is scaled to [0, 1] by its own range: 16-bit ("I;16*", and "I", which is how PIL holds
  16-bit PNGs) divided by 65535, 32-bit float ("F", e.g. a float TIFF) taken as [0, 1]; it is resized in float
  (Lanczos) and clipped to [0, 1]. PIL's own conversion to 8 bits would clip 16-bit values (a 16-bit grey image
  became solid white);
* a mask whose colour channels differ is refused instead of being averaged into grey;
* a file that is no image, or whose pixel count is over PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`,
  89 million), is an `InputError`, as is a float image holding NaN or infinity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmdit.errors import InputError, MissingInputError


HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # greyscale modes with more than 8 bits
SIXTEEN_BIT = 65535.0  # full scale of "I;16*" and of "I" (PIL reads 16-bit PNGs as either)


def _open(image, what: str):
    """A PIL image from a path or a PIL image; an `InputError` for anything that cannot be one."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, Path)):
        raise InputError(f"{what} must be a file path or a PIL image, got {type(image).__name__}")
    path = Path(image).expanduser()
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit is refused, not warned
            opened = Image.open(path)
            opened.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise InputError(f"{what} {path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels (PIL's limit against "
                         "decompression bombs); resize it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{what} {path} is not an image PIL can read ({e})") from None
    return opened


def check_image(image, what: str = "init image") -> None:
    """The checks `read_init_image` makes before any pixel is used: readable, a mode it converts, finite."""
    _rgb(_open(image, what), what)


def _levels(image, what: str) -> np.ndarray:
    """(H, W) float32 in [0, 1] of a high-bit-depth greyscale image (HIGH_DEPTH), by its own full scale."""
    array = np.asarray(image).astype(np.float32)
    if image.mode != "F":
        return array / SIXTEEN_BIT
    if not np.isfinite(array).all():
        raise InputError(f"the {what} holds NaN or infinite values; save it with finite values in [0, 1]")
    return array


def _resized_levels(levels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Lanczos resize of (H, W) float levels, in float (PIL's "F" mode), clipped to [0, 1]."""
    from PIL import Image

    image = _resized(Image.fromarray(levels, mode="F"), height, width)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def _rgb(image, what: str):
    """The image in RGB for the 8-bit path (None for a HIGH_DEPTH image, which is read by its levels)."""
    if image.mode in HIGH_DEPTH:
        _levels(image, what)
        return None
    try:
        return image if image.mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(f"the {what} has PIL mode {image.mode!r}, which cannot be converted to RGB ({e}); "
                         "save it as an RGB or greyscale image") from None


def output_size(image, multiple: int = 16) -> tuple[int, int]:
    """(height, width) for an image-to-image run given no size: the init image's, rounded down to `multiple`
    (SD3 needs multiples of 16: 8× VAE, 2×2 patches)."""
    w, h = image_size(image)
    if w < multiple or h < multiple:
        raise InputError(f"the init image is {w}x{h} pixels; it must be at least {multiple} on each side")
    return h - h % multiple, w - w % multiple


def image_size(image, what: str = "init image") -> tuple[int, int]:
    """(width, height) of an image (path or PIL), read from its header."""
    return _open(image, what).size


def _resized(image, height: int, width: int):
    from PIL import Image

    return image if image.size == (width, height) else image.resize((width, height), resample=Image.LANCZOS)


def read_init_image(image, height: int, width: int) -> Tensor:
    """(1, 3, height, width) float32 in [-1, 1] from a path or a PIL image."""
    image = _open(image, "init image")
    rgb = _rgb(image, "init image")
    if rgb is None:  # high bit depth: grey levels resized in float, then as three equal channels
        grey = _resized_levels(_levels(image, "init image"), height, width)
        array = np.repeat(grey[..., None], 3, axis=2)  # (H, W, 3)
    else:
        array = np.asarray(_resized(rgb, height, width)).astype(np.float32) / 255.0  # (H, W, 3)
    return 2.0 * torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None] - 1.0


def read_mask(mask, height: int, width: int) -> Tensor:
    """(1, 1, height, width) float32 of 0 (keep) and 1 (repaint) from a greyscale image (path or PIL)."""
    mask = _open(mask, "mask")
    if mask.mode in HIGH_DEPTH:  # resized in float, binarised at half its full scale
        return _binary(_resized_levels(_levels(mask, "mask"), height, width) >= 0.5)
    if mask.mode == "P":  # a palette image is greyscale when every colour it uses is grey
        mask = mask.convert("RGB")
    if mask.mode in ("RGB", "RGBA"):
        channels = np.asarray(mask)[..., :3]
        if not (channels == channels[..., :1]).all():
            raise InputError("the mask must be greyscale (white = repaint, black = keep); this one has colours. "
                             "Save it as a black-and-white or greyscale image")
    elif mask.mode not in ("L", "1", "LA"):
        raise InputError(f"the mask has PIL mode {mask.mode!r}; give a greyscale image (white = repaint, black = keep)")
    grey = _resized(mask, height, width).convert("L")  # resized first, then made grey, as diffusers does
    return _binary(np.asarray(grey).astype(np.float32) / 255.0 >= 0.5)


def _binary(repaint: np.ndarray) -> Tensor:
    """(1, 1, H, W) float32 0/1 from an (H, W) bool mask; an error if it repaints nothing."""
    binary = repaint.astype(np.float32)
    if not binary.any():
        raise InputError("the mask is black everywhere (nothing to repaint); white marks the region to repaint")
    return torch.from_numpy(binary)[None, None]
