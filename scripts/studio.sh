#!/usr/bin/env bash
# Set up (once, with the [studio] extra: Gradio) and start the layout studio, a web page on this machine:
#   bash scripts/studio.sh [--model ...] [--port 7860] [--host 127.0.0.1]        (docs/studio.md)
set -euo pipefail
EXTRAS="[studio]" source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec .venv/bin/python scripts/studio.py "$@"
