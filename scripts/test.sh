#!/usr/bin/env bash
# Set up (once) with the test extras (pytest, and diffusers + transformers as the reference; Gradio and Playwright
# for the layout studio) and run the tests.
set -euo pipefail
EXTRAS="[test,studio]" source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec .venv/bin/python -m pytest "$@"
