#!/usr/bin/env bash
# Seconds per step and per-stage peak GPU memory for each memory mode (none, fp8, offload blocks, both) in
# bfloat16 and float16, on random SD3.5-Large-shaped weights at 1024x1024, printed as one table. For a CUDA
# machine with the project installed (bash scripts/run.sh once); needs ~28 GB free under --work for the weights
# (written once, then reused) and ~35 GB of RAM while writing them. Options (scripts/bench/gpu_check.py):
# --steps N --modes none,blocks --dtypes bfloat16 --work DIR --json FILE. Without a GPU, `--device cpu` runs the
# same code on tiny widths (what the test suite does).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" -m scripts.bench.gpu_check "$@"
