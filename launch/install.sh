# Sourced by launch/local.sh and tests/run.sh: makes .venv with the pinned install.
# Re-installs only when setup.py changed since the last install (stamp = its hash).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLAMINGO_VENV:-$REPO/.venv}"
EXTRAS="${1:-dev,tpu}"
stamp="$VENV/.flamingo_install_stamp"
want="$(sha256sum "$REPO/setup.py" | cut -c1-16)-$EXTRAS"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  start=$(date +%s)
  echo "[install] creating $VENV with .[$EXTRAS] (one-off, about a minute)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$REPO[$EXTRAS]"
  echo "$want" > "$stamp"
  echo "[install] done in $(( $(date +%s) - start ))s"
fi
PYTHON="$VENV/bin/python"
export PYTHON
