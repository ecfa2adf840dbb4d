"""PNG files that carry their own settings.

Two text chunks, so an image can be reproduced and other tools can read it:
* `parameters`: the AUTOMATIC1111 text (prompt, "Negative prompt: ...", then "Steps: .., Sampler: .., ...");
* `sd3_minimal`: JSON with everything this project needs to make the same image again.
Writing never replaces an existing file unless asked (the CLI checks before it starts; this checks again).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from mmdit.errors import InputError

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
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, pnginfo=info)


def read_png_metadata(path: Path) -> dict[str, Any]:
    """The JSON record of a PNG written by `save_png` (its `parameters` text is under key "parameters")."""
    with Image.open(path) as im:
        text = dict(im.text)
    if JSON_KEY not in text:
        raise InputError(f"{path} carries no {JSON_KEY} metadata")
    return {**json.loads(text[JSON_KEY]), "parameters": text.get("parameters", "")}
