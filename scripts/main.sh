#!/usr/bin/env bash
# Set up a fresh machine and run the main job: experts -> ConTra distillation -> evaluation on the real
# CIFAR-10 in ../shared/datasets (CPU preset, local Ray, MLflow in runs/mlflow.db). Extra arguments go to
# `python -m contra_ray.pipeline` (e.g. --set distill.iterations=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # local, loopback-only Ray
exec .venv/bin/python -m contra_ray.pipeline --preset cifar10_ipc1_cpu "$@"
