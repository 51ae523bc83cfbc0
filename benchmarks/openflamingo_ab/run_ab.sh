#!/usr/bin/env bash
# Interleaved A/B of one training step: OpenFlamingo 2.0.1 (PyTorch) vs flamingo_jax at matched
# shapes (matched_config.py beside this file; docs/benchmarks.md).
#   REF_PY=~/.cache/flamingo-refvenv/bin/python JAX_PY=.venv/bin/python \
#     bash benchmarks/openflamingo_ab/run_ab.sh OUT.jsonl ROUNDS small|large
# Run from the project root with nothing else on the machine. One JSON line per run is appended
# to OUT.jsonl; the summary prints each round's ratio of tokens/s (ours / theirs) and the median.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$1; ROUNDS=${2:-3}; SIZE=${3:-small}
case $SIZE in
  small) REF_ARGS="--image_size 64" ;;
  large) REF_ARGS="--image_size 64 --lm_layers 8 --lm_dim 512 --lm_heads 8 --xattn_every 2 --seq_len 256" ;;
  *) echo "size must be small or large" >&2; exit 2 ;;
esac
for r in $(seq 1 "$ROUNDS"); do
  line=$("$REF_PY" "$HERE/openflamingo_step.py" $REF_ARGS --warmup 2 --steps 5 --threads 2 --quiet 2>/dev/null | tail -1)
  echo "{\"round\": $r, \"side\": \"ref\", \"tokens_per_s\": $(echo "$line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])'), \"result\": $line}" >> "$OUT"
  line=$("$JAX_PY" -m flamingo_jax.tools.bench_step --config="$HERE/matched_config.py:$SIZE" --steps=5 --json 2>/dev/null | tail -1)
  echo "{\"round\": $r, \"side\": \"jax\", \"tokens_per_s\": $(echo "$line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_sec"])'), \"result\": $line}" >> "$OUT"
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["round"], {})[r["side"]] = r["tokens_per_s"]
ratios = [v["jax"] / v["ref"] for v in by.values() if "jax" in v and "ref" in v]
for k, v in sorted(by.items()):
    print(f"round {k}: ref {v.get('ref', 0):.1f} tok/s  jax {v.get('jax', 0):.1f} tok/s")
print(f"median jax/ref tokens/s ratio: {statistics.median(ratios):.3f}")
PY
