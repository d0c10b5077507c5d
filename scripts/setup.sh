#!/usr/bin/env bash
# Create ./.venv (Python 3.10+) and install contra_ray with its test extras. Idempotent.
# torch/torchvision are pinned to the builds this workplace serves from disk; on your own machine any
# torch >= 2.2 works (pip install -e '.[dev]').
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, ray, kornia, mlflow, contra_ray" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install -q -e ".[dev]"
fi
