#!/usr/bin/env bash
# Create ./.venv (Python 3.10+) and install contra_ray with its test extras, the Hugging Face extra (hf:
# the export round trip is tested) and, where possible, the FFCV extra. Idempotent and quick when everything
# is installed.
# torch/torchvision are pinned to the builds this workplace serves from disk; on your own machine any
# torch >= 2.2 works (pip install -e '.[dev]').
# FFCV (experts.loader=ffcv, python -m contra_ray.data prepare) builds a C extension against libturbojpeg
# and OpenCV: as root with apt-get the Debian packages below are installed first; elsewhere FFCV is skipped
# with a note (its tests skip) unless CONTRA_RAY_REQUIRE_FFCV=1 (CI), which makes a failure fatal.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, ray, kornia, mlflow, moto, datasets, contra_ray" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install -q -e ".[dev,hf]"
fi

# quick check (no import, ~0.1 s) unless CI requires FFCV, where a broken native library must fail here
if [ "${CONTRA_RAY_REQUIRE_FFCV:-0}" = 1 ]; then
  ffcv_missing() { ! .venv/bin/python -c "import ffcv" 2>/dev/null; }
else
  ffcv_missing() { ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('ffcv') is None)"; }
fi
ffcv_skip() {
  echo "setup: FFCV not installed ($1); experts.loader=ffcv and the FFCV tests are unavailable" >&2
  if [ "${CONTRA_RAY_REQUIRE_FFCV:-0}" = 1 ]; then exit 1; fi
}
if ffcv_missing; then
  FFCV_DEBS=(libturbojpeg0-dev libopencv-dev pkgconf gcc)
  need=()
  for pkg in "${FFCV_DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup: apt-get install ${need[*]} (for FFCV)" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
  fi
  if ! command -v pkg-config >/dev/null || ! pkg-config --exists libturbojpeg opencv4; then
    ffcv_skip "needs ${FFCV_DEBS[*]} (apt-get as root)"
  elif ! .venv/bin/pip install -q -e ".[ffcv]"; then
    ffcv_skip "pip install .[ffcv] failed"
  elif ffcv_missing; then
    ffcv_skip "installed but import ffcv fails"
  fi
fi
