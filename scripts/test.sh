#!/usr/bin/env bash
# The README's test command: set up the host environment, then run the whole suite.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup.sh")"
export FIRST_EDGE_DATA="${FIRST_EDGE_DATA:-$ROOT/../shared/data}"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q "$@"
