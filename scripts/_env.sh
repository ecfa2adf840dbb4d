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
if [[ "${EXTRAS:-}" == *test* ]] && ! "$VPY" -c "import importlib.util as u; assert u.find_spec('k_diffusion')" 2>/dev/null; then
  # The reference for dpmpp_2m; --no-deps: its package pulls torchvision (a CUDA torch) and a training stack
  # that its sampling module does not use (tests/test_img2img.py loads that module alone).
  "$VPY" -m pip install --quiet --disable-pip-version-check --no-deps "k-diffusion==0.1.1.post1" 2>&1 | grep -v -E "^(WARNING: Location|\s*$)" || true
fi
if [[ "${EXTRAS:-}" == *test* ]] && [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # Debian's Chromium for the studio's browser test (tests/test_studio_browser.py skips where it is missing).
  echo "installing chromium (Debian's package) for the browser test..." >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "warning: could not install chromium; the studio's browser test will be skipped" >&2
fi
"$VPY" -c "import mmdit, samplers, loaders, dense" # fail loudly if the install did not work
