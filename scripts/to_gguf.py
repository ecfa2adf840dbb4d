#!/usr/bin/env python
"""Write the MM-DiT of a checkpoint as a GGUF file, for `--transformer`:

    python scripts/to_gguf.py sd3.5_medium.safetensors sd3.5_medium-Q8_0.gguf --type Q8_0

The source is what --model takes on disk: a Stability single file, a safetensors file holding the MM-DiT alone,
or a diffusers folder. The types follow ComfyUI-GGUF's converter: the joint blocks' 2-D weights in --type (or in
16 bits where a row does not split into its blocks, e.g. SD3.5-Large's 2432-wide rows for the 256-value types,
which cannot be written here anyway), vectors in F32, the embedders, the final layer and the position table in
16 bits. The `gguf` package writes Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, BF16, F16 and F32 (docs/gguf.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loaders.gguf import WRITABLE, read_transformer, write_gguf
from mmdit.errors import InputError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="checkpoint: single file, MM-DiT file or diffusers folder")
    p.add_argument("out", type=Path, help="the .gguf file to write")
    p.add_argument("--type", default="Q8_0", choices=list(WRITABLE), help="the joint blocks' type (default Q8_0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    try:
        if args.out.exists() and not args.overwrite:
            raise InputError(f"{args.out} already exists; choose another name or pass --overwrite")
        write_gguf(args.out, read_transformer(args.source), args.type)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
