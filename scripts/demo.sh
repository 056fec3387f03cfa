#!/usr/bin/env bash
# The README's main command: set up the host environment, then run the main job on the
# embedded default model (SmolLM2-135M-Instruct). Extra arguments go to python -m export.demo.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup.sh")"
cd "$ROOT"
exec "$VENV/bin/python" -m export.demo --data "${FIRST_EDGE_DATA:-$ROOT/../shared/data}" "$@"
