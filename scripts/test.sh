#!/usr/bin/env bash
# Set up (once) with the test extras (pytest, and diffusers + transformers as the reference) and run the tests.
set -euo pipefail
EXTRAS="[test]" source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec .venv/bin/python -m pytest "$@"
