#!/usr/bin/env bash
# The README's test command: installs into .venv if needed, then runs the whole suite.
# Fails on any failing test and when no test ran (pytest exit 5). Extra args go to pytest
# (e.g. a file, -k NAME); `--fast` first: only the tests not marked slow; TEST_WORKERS=1 runs
# in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/install.sh dev,tpu
# The CIDEr tests run pycocoevalcap's Java tokenizer (evaluation/metrics.py).
if ! command -v java >/dev/null 2>&1; then
  echo "[install] no java on the PATH: apt-get install default-jre-headless (the CIDEr tokenizer)"
  if ! (apt-get update -qq && apt-get install -y -qq default-jre-headless) >/dev/null 2>&1; then
    echo "error: the tests need a Java runtime on the PATH (e.g. default-jre-headless)" >&2
    exit 1
  fi
fi
export JAX_PLATFORMS=cpu
# --fast: the inner-loop tier, every test not marked slow (< 3 minutes on 2 cores).
if [[ "${1:-}" == "--fast" ]]; then
  shift
  set -- -m "not slow" tests "$@"
fi
# One file per worker (module fixtures computed once); the heaviest files first, longest
# first, so that the quick ones fill the gaps at the end instead of a long one starting last.
if [[ $# -eq 0 ]]; then
  set -- tests/test_multiprocess.py tests/test_train_step.py tests/test_trainer.py tests/test_faults.py \
      tests/test_inference.py tests/test_contrastive.py tests/test_lm_import.py \
      tests/test_finetune.py tests
fi
exec "$PYTHON" -m pytest -q --durations=10 -n "${TEST_WORKERS:-auto}" --dist loadfile "$@"
