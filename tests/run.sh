#!/usr/bin/env bash
# The README's test command: installs into .venv if needed, then runs the whole suite.
# Fails on any failing test and when no test ran (pytest exit 5). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/install.sh dev,tpu
export JAX_PLATFORMS=cpu
exec "$PYTHON" -m pytest tests -q --durations=10 "$@"
