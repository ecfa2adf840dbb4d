#!/usr/bin/env bash
# Set up (once) and run the main job: text-to-image with scripts/generate.py.
# With no --model, it runs on the built-in tiny model (trained on coloured shapes). Any arguments are passed to generate.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [ "$#" -eq 0 ]; then
  set -- --prompt "a red circle" --out out/builtin.png --overwrite  # one object: what the built-in model draws reliably (docs/builtin-model.md)
fi
exec .venv/bin/python scripts/generate.py "$@"
