#!/usr/bin/env bash
# The miniature Figure 2 (experiments/configs/fewshot_demo.py): trains a tiny Flamingo on the
# synthetic mixture on CPU, evaluates the held-out attributes task (which shape? asked
# without saying so) at 0/1/2/4/8 shots over 3 seeds, and
# writes WORKDIR/accuracy_vs_shots.{png,md} (chance drawn). Re-running resumes every stage.
#   Usage: bash launch/fewshot_demo.sh [WORKDIR] [--config.train.steps=N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/install.sh dev,tpu
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL=2
WORKDIR="${1:-runs/fewshot_demo}"
shift || true
CONFIG=experiments/configs/fewshot_demo.py
t0=$(date +%s)
"$PYTHON" -m flamingo_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
t1=$(date +%s)
TASK="$WORKDIR/attributes_task"
[ -f "$TASK/attributes.json" ] || "$PYTHON" -m flamingo_jax.tools.fewshot_demo --make_task="$TASK"
EVALS=()
for seed in 0 1 2; do
  "$PYTHON" -m flamingo_jax.evaluate --workdir="$WORKDIR" --task=attributes \
      --data_dir="$TASK" --shots=0,1,2,4,8 --seed="$seed" --output="$WORKDIR/eval/seed$seed" \
      --batch_size=16 > /dev/null
  EVALS+=("$WORKDIR/eval/seed$seed")
done
t2=$(date +%s)
"$PYTHON" -m flamingo_jax.tools.fewshot_demo --results="$(IFS=,; echo "${EVALS[*]}")" \
    --task_dir="$TASK" --output="$WORKDIR"
echo "plot: $WORKDIR/accuracy_vs_shots.png   training: $((t1 - t0)) s   evaluation: $((t2 - t1)) s"
