#!/usr/bin/env bash
# The README's test command: installs into .venv if needed, then runs the whole suite.
# Fails on any failing test and when no test ran (pytest exit 5). Extra args go to pytest
# (e.g. a file, -k NAME, -m "not slow"); TEST_WORKERS=1 runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/install.sh dev,tpu
export JAX_PLATFORMS=cpu
# One file per worker (module fixtures computed once); the heaviest files first, longest
# first, so that the quick ones fill the gaps at the end instead of a long one starting last.
if [[ $# -eq 0 ]]; then
  set -- tests/test_multiprocess.py tests/test_train_step.py tests/test_trainer.py tests/test_faults.py \
      tests/test_inference.py tests/test_contrastive.py tests/test_lm_import.py \
      tests/test_finetune.py tests
fi
exec "$PYTHON" -m pytest -q --durations=10 -n "${TEST_WORKERS:-auto}" --dist loadfile "$@"
