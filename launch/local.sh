#!/usr/bin/env bash
# The README's main command: installs into .venv if needed, then trains the tiny Flamingo on
# synthetic data on CPU (a few hundred steps), then checks that it learned to look: caption
# loss on held-out pairs with their own images vs shuffled images, and captions it generates.
#   Usage: bash launch/local.sh [WORKDIR] [--config=FILE[:ARG]] [--config.train.steps=N ...]
#   e.g.   bash launch/local.sh runs/pythia --config=experiments/configs/pretrained.py:lm=imports/pythia
# Re-running with the same WORKDIR resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
source launch/install.sh dev,tpu
t1=$(date +%s)
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL=2
WORKDIR="${1:-runs/local}"
shift || true
CONFIG=experiments/configs/tiny.py
OVERRIDES=()
for arg in "$@"; do
  case "$arg" in
    --config=*) CONFIG="${arg#--config=}" ;;
    *) OVERRIDES+=("$arg") ;;
  esac
done
set -- "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
"$PYTHON" -m flamingo_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
t2=$(date +%s)
"$PYTHON" -m flamingo_jax.tools.summarize_run --workdir="$WORKDIR"
"$PYTHON" -m flamingo_jax.tools.image_text_probe --config="$CONFIG" --workdir="$WORKDIR" "$@"
# One held-out image (written by the probe), captioned by the generate command.
echo "generate --prompt='<image>' --image=$WORKDIR/example.png:"
"$PYTHON" -m flamingo_jax.generate --config="$CONFIG" --workdir="$WORKDIR" --prompt='<image>' \
    --image="$WORKDIR/example.png" --max_new_tokens=16 "$@"
t3=$(date +%s)
echo "install: $((t1 - t0)) s   training: $((t2 - t1)) s   probe: $((t3 - t2)) s"
