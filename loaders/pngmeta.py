"""PNG files that carry their own settings.

Two text chunks, so an image can be reproduced and other tools can read it:
* `parameters`: the AUTOMATIC1111 text (prompt, "Negative prompt: ...", then "Steps: .., Sampler: .., ...");
* `sd3_minimal`: JSON with everything this project needs to make the same image again.
Writing never replaces an existing file unless asked (the CLI checks before it starts; this checks again), and is
atomic (`loaders.files`): a PNG at its final path is complete. `made_here` tells a resumed batch which files it
can trust.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from mmdit.errors import InputError

from .files import write_atomic

JSON_KEY = "sd3_minimal"


def a1111_parameters(record: dict[str, Any]) -> str:
    lines = [record.get("prompt") or ""]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    fields = {
        "Steps": record.get("steps"),
        "Sampler": "Euler (rectified flow)",
        "CFG scale": record.get("cfg"),
        "Seed": record.get("seed"),
        "Size": f"{record.get('width')}x{record.get('height')}",
        "Model": record.get("model"),
        "Shift": record.get("shift"),
    }
    if record.get("slg_layers"):
        fields["SLG layers"] = ",".join(map(str, record["slg_layers"]))
        fields["SLG scale"] = record.get("slg_scale")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(path: Path, image: np.ndarray, record: dict[str, Any], *, overwrite: bool = True) -> None:
    """Write an (H, W, 3) uint8 image with both metadata chunks."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(record))
    info.add_text(JSON_KEY, json.dumps(record, sort_keys=True))
    picture = Image.fromarray(image)
    write_atomic(path, lambda f: picture.save(f, format="PNG", pnginfo=info))


def made_here(path: Path) -> bool | None:
    """What a resumed batch finds at `path`: True for a complete PNG this project wrote (it carries our metadata
    and every pixel decodes), False for one it started and did not finish (our metadata, which precedes the
    pixels, but the pixels are cut short: a write interrupted before writes were atomic), None for anything
    else (someone else's file, to be left alone)."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or JSON_KEY not in im.info:  # text chunks before the pixels are read by open
                return None
            try:
                im.load()
            except (OSError, SyntaxError, ValueError, EOFError):
                return False
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return True


def read_png_metadata(path: Path) -> dict[str, Any]:
    """The JSON record of a PNG written by `save_png` (its `parameters` text is under key "parameters")."""
    with Image.open(path) as im:
        text = dict(im.text)
    if JSON_KEY not in text:
        raise InputError(f"{path} carries no {JSON_KEY} metadata")
    return {**json.loads(text[JSON_KEY]), "parameters": text.get("parameters", "")}
