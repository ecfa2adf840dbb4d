"""Init images and masks for image-to-image and inpainting, prepared as diffusers' `VaeImageProcessor` does.

`StableDiffusion3Img2ImgPipeline` / `StableDiffusion3InpaintPipeline` resize a PIL image to the requested size with
Lanczos resampling (in the image's own mode), scale it to [0, 1] as float32 and then to [-1, 1]; a mask is
resized the same way, converted to greyscale ("L"), scaled to [0, 1] and binarised at 0.5 (white = repaint,
black = keep). We do exactly that, and add what diffusers leaves to the caller: an image that is not RGB
(greyscale, palette, RGBA) is converted to RGB first (the alpha channel is dropped), and a mask whose colour
channels differ is refused instead of being averaged into grey.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmdit.errors import InputError, MissingInputError


def _open(image, what: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    path = Path(image).expanduser()
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist")
    try:
        opened = Image.open(path)
        opened.load()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{what} {path} is not an image PIL can read ({e})") from None
    return opened


def output_size(image, multiple: int = 16) -> tuple[int, int]:
    """(height, width) for an image-to-image run given no size: the init image's, rounded down to `multiple`
    (SD3 needs multiples of 16: 8× VAE, 2×2 patches)."""
    w, h = _open(image, "init image").size
    if w < multiple or h < multiple:
        raise InputError(f"the init image is {w}x{h} pixels; it must be at least {multiple} on each side")
    return h - h % multiple, w - w % multiple


def _resized(image, height: int, width: int):
    from PIL import Image

    return image if image.size == (width, height) else image.resize((width, height), resample=Image.LANCZOS)


def read_init_image(image, height: int, width: int) -> Tensor:
    """(1, 3, height, width) float32 in [-1, 1] from a path or a PIL image."""
    image = _open(image, "init image")
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(_resized(image, height, width)).astype(np.float32) / 255.0  # (H, W, 3)
    return 2.0 * torch.from_numpy(array).permute(2, 0, 1)[None] - 1.0


def read_mask(mask, height: int, width: int) -> Tensor:
    """(1, 1, height, width) float32 of 0 (keep) and 1 (repaint) from a greyscale image (path or PIL)."""
    mask = _open(mask, "mask")
    if mask.mode == "P":  # a palette image is greyscale when every colour it uses is grey
        mask = mask.convert("RGB")
    if mask.mode in ("RGB", "RGBA"):
        channels = np.asarray(mask)[..., :3]
        if not (channels == channels[..., :1]).all():
            raise InputError("the mask must be greyscale (white = repaint, black = keep); this one has colours. "
                             "Save it as a black-and-white or greyscale image")
    elif mask.mode not in ("L", "1", "LA", "I", "I;16"):
        raise InputError(f"the mask has PIL mode {mask.mode!r}; give a greyscale image (white = repaint, black = keep)")
    grey = _resized(mask, height, width).convert("L")  # resized first, then made grey, as diffusers does
    binary = (np.asarray(grey).astype(np.float32) / 255.0 >= 0.5).astype(np.float32)
    if not binary.any():
        raise InputError("the mask is black everywhere (nothing to repaint); white marks the region to repaint")
    return torch.from_numpy(binary)[None, None]
