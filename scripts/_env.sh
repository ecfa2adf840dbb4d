# Shared by run.sh and test.sh: make .venv (once) and install the project into it.
# torch is installed only when missing, pinned to the CPU wheel this project is tested with; an unpinned
# install would pull a multi-GB CUDA build. Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS:-}" 2>&1 | grep -v -E "^(WARNING: Location|  !!|\s*$)" || true
"$VPY" -c "import mmdit, samplers, loaders, dense" # fail loudly if the install did not work
