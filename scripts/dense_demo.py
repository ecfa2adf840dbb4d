#!/usr/bin/env python
"""Make the DenseDiffusion pictures of README.md and docs/layout-benchmark.md: the image and each phrase's attention map, without and with the layout.

    python scripts/dense_demo.py --out docs/dense            (the built-in model; --model for real weights)

Calls `loaders.Pipeline` twice on the same prompt and seed, with strength 0 (maps recorded, nothing
edited) and with the given strength, then puts the images and the per-phrase maps side by side in one PNG
(top row: without, bottom row: with) and prints each region's in-region fraction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from dense import PRESETS
from loaders import Pipeline
from loaders.layout import save_attention_maps
from mmdit.errors import InputError


def grid(rows: list[list[Path | Image.Image]], labels: list[str], titles: list[str], pad: int = 4,
         label_width: int = 90, title_height: int = 16) -> Image.Image:
    """Rows of equal-size tiles (images or their paths), a label left of each row and a title above each column."""
    tiles = [[(p if isinstance(p, Image.Image) else Image.open(p)).convert("RGB") for p in row] for row in rows]
    w, h = tiles[0][0].size
    canvas = Image.new("RGB", (label_width + len(tiles[0]) * (w + pad), title_height + len(tiles) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((label_width + c * (w + pad) + 4, 2), title, fill="black")
    for r, row in enumerate(tiles):
        draw.text((4, title_height + r * (h + pad) + h // 2), labels[r], fill="black")
        for c, tile in enumerate(row):
            canvas.paste(tile, (label_width + c * (w + pad), title_height + r * (h + pad)))
    return canvas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", type=Path, default=Path(__file__).resolve().parent.parent / "docs/dense/layout.json")
    p.add_argument("--model", help="as in generate.py (default: the built-in tiny model)")
    p.add_argument("--out", type=Path, default=Path("dense_demo"), help="folder for images, maps and the picture")
    p.add_argument("--size", type=int, help="pixels (default: the model's size, 128 for the built-in model)")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--preset", choices=list(PRESETS), default="faithful")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        pipe = Pipeline.load(args.model, keep_loaded=True)
        runs = {"strength 0": 0.0, f"strength {args.strength:g}": args.strength}
        rows, stats = [], []
        for strength in runs.values():
            result = pipe(layout=args.layout, seed=args.seed, height=args.size, width=args.size, record_maps=True,
                          dense_strength=strength, dense_preset=args.preset)
            size = (result.latents.shape[-2] * 8, result.latents.shape[-1] * 8)
            image = args.out / f"image_strength{strength:g}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            result.images[0].save(image)
            maps = save_attention_maps(args.out / f"maps_strength{strength:g}", result.maps, size)
            stats.append(result.maps.to_stats()["regions"])
            rows.append([image] + maps[:-1])  # the region maps; the last path is stats.json
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    picture = args.out / "attention_maps.png"
    grid(rows, list(runs), ["image"] + [f'"{r["phrase"]}"' for r in stats[0]]).save(picture)
    print("| phrase | area | in-region fraction, strength 0 | with layout |")
    print("|---|---|---|---|")
    for off, on in zip(*stats):
        print(f"| {off['phrase']} | {off['area']:.3f} | {off['in_region_fraction']:.3f} | {on['in_region_fraction']:.3f} |")
    print(f"wrote {picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
