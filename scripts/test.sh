#!/usr/bin/env bash
# Set up a fresh machine and run the test suite on CPU (real CIFAR-10 from ../shared is extracted once
# into .cache/test). Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CONTRA_RAY_TEST_CACHE=${CONTRA_RAY_TEST_CACHE:-$PWD/.cache/test}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
mkdir -p "$CONTRA_RAY_TEST_CACHE"
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
