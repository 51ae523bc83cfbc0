#!/usr/bin/env bash
# The README's main command: installs into .venv if needed, then runs the tiny Flamingo on CPU.
# Until the trainer lands (issue 5) this builds the tiny model, prints its parameter table and
# runs one forward/backward pass.   Usage: bash launch/local.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/install.sh dev,tpu
export JAX_PLATFORMS=cpu
WORKDIR="${1:-runs/local}"
mkdir -p "$WORKDIR"
exec "$PYTHON" -m flamingo_jax.tools.smoke --config=experiments/configs/tiny.py
