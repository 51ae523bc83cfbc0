#!/usr/bin/env bash
# The README's main command: installs into .venv if needed, then the paper's two stages in
# miniature on synthetic data on CPU: (1) contrastive pretraining of the vision encoder
# (docs/paper.md §5) and its zero-shot retrieval, (2) the tiny Flamingo on that frozen encoder,
# then checks that it learned to look: caption loss on held-out pairs with their own images vs
# shuffled images, and captions it generates.
#   Usage: bash launch/local.sh [WORKDIR] [--config=FILE[:ARG]] [--config.train.steps=N ...]
#   e.g.   bash launch/local.sh runs/pythia --config=experiments/configs/pretrained.py:lm=imports/pythia
# With --config= the first stage is skipped (the config names its towers). Overrides go to the
# Flamingo stage. Re-running with the same WORKDIR resumes each stage from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
source launch/install.sh dev,tpu
t1=$(date +%s)
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL=2
WORKDIR="${1:-runs/local}"
shift || true
CONFIG=
OVERRIDES=()
for arg in "$@"; do
  case "$arg" in
    --config=*) CONFIG="${arg#--config=}" ;;
    *) OVERRIDES+=("$arg") ;;
  esac
done
set -- "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
if [[ -z "$CONFIG" ]]; then
  CONFIG=experiments/configs/tiny.py
  CONTRASTIVE=experiments/configs/contrastive_tiny.py
  echo "== stage 1: contrastive pretraining of the vision encoder ($CONTRASTIVE) =="
  "$PYTHON" -m flamingo_jax.train --config="$CONTRASTIVE" --workdir="$WORKDIR/contrastive"
  "$PYTHON" -m flamingo_jax.tools.retrieval --workdir="$WORKDIR/contrastive"
  # The import (written whole or not at all) is made once; every resume reads the same one.
  if [[ ! -d "$WORKDIR/contrastive_nfnet" ]]; then
    "$PYTHON" -m flamingo_jax.tools.import_weights --kind=contrastive \
        --source="$WORKDIR/contrastive" --output="$WORKDIR/contrastive_nfnet"
  fi
  set -- --config.model.vision.init_checkpoint="$WORKDIR/contrastive_nfnet/params" "$@"
  echo "== stage 2: Flamingo ($CONFIG) on the frozen pretrained encoder =="
fi
t2=$(date +%s)
"$PYTHON" -m flamingo_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
t3=$(date +%s)
"$PYTHON" -m flamingo_jax.tools.summarize_run --workdir="$WORKDIR"
# The run's own config.json (with the overrides it trained with) is the config from here on.
"$PYTHON" -m flamingo_jax.tools.image_text_probe --workdir="$WORKDIR"
# One held-out image (written by the probe), captioned by the generate command.
echo "generate --workdir=$WORKDIR --prompt='<image>' --image=$WORKDIR/example.png:"
"$PYTHON" -m flamingo_jax.generate --workdir="$WORKDIR" --prompt='<image>' \
    --image="$WORKDIR/example.png" --max_new_tokens=16
t4=$(date +%s)
echo "install: $((t1 - t0)) s   vision pretraining: $((t2 - t1)) s   training: $((t3 - t2)) s" \
     "  probe: $((t4 - t3)) s"
