#!/usr/bin/env bash
# Set up (once) and run the main job: text-to-image with scripts/generate.py.
# With no --model, it runs on the built-in tiny random model. Any arguments are passed to generate.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [ "$#" -eq 0 ]; then
  set -- --prompt "a red rose floating on a blue ocean under golden sunlight" --out out/builtin.png --overwrite
fi
exec .venv/bin/python scripts/generate.py "$@"
