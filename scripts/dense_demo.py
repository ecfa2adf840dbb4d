#!/usr/bin/env python
"""Make the README's DenseDiffusion picture: attention maps of each phrase without and with the layout.

    python scripts/dense_demo.py --out docs/dense            (the built-in model; --model for real weights)

Runs `generate.py` twice on the same prompt and seed, with --dense-strength 0 (maps recorded, nothing
modulated) and with the given strength, then puts the per-phrase maps side by side in one PNG
(top row: without, bottom row: with) and prints each region's in-region fraction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw  # noqa: E402

from scripts.generate import main as generate  # noqa: E402


def grid(rows: list[list[Path]], labels: list[str], titles: list[str], pad: int = 4, label_width: int = 90,
         title_height: int = 16) -> Image.Image:
    """Rows of equal-size tiles, a label left of each row and a title above each column."""
    tiles = [[Image.open(p).convert("RGB") for p in row] for row in rows]
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
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    runs = {"strength 0": 0.0, f"strength {args.strength:g}": args.strength}
    rows, stats = [], []
    for i, strength in enumerate(runs.values()):
        maps = args.out / f"maps_strength{strength:g}"
        command = ["--layout", str(args.layout), "--dense-strength", str(strength), "--attention-maps", str(maps),
                   "--height", str(args.size), "--width", str(args.size), "--seed", str(args.seed),
                   "--out", str(args.out / f"image_strength{strength:g}.png"), "--overwrite", "--quiet"]
        if args.model:
            command += ["--model", args.model]
        if generate(command) != 0:
            return 1
        stats.append(json.loads((maps / "stats.json").read_text())["regions"])
        rows.append([maps / f"region_{r['region']}.png" for r in stats[-1]])
    picture = args.out / "attention_maps.png"
    grid(rows, list(runs), [f'"{r["phrase"]}"' for r in stats[0]]).save(picture)
    print("| phrase | area | in-region fraction, strength 0 | with layout |")
    print("|---|---|---|---|")
    for off, on in zip(*stats):
        print(f"| {off['phrase']} | {off['area']:.3f} | {off['in_region_fraction']:.3f} | {on['in_region_fraction']:.3f} |")
    print(f"wrote {picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
