#!/usr/bin/env bash
# Build the optimum-executorch peer venv (its own: it pins transformers==5.0.0rc1, which clashes
# with the host venv's 5.24). Exact versions from requirements-et.lock (measured in
# ../shared/peers, copied here so bench/ runs without that folder).
#   usage: bash bench/peers/setup_et.sh      -> prints the venv path
#   FIRST_EDGE_PEER_VENV_ET overrides the location (default ~/.cache/first-edge/peers/venv-et)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
V="${FIRST_EDGE_PEER_VENV_ET:-$HOME/.cache/first-edge/peers/venv-et}"
PY="${PY:-python3.11}"
stamp="$V/.stamp"
want="$(sha256sum "$HERE/requirements-et.lock" | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then echo "$V"; exit 0; fi
rm -rf "$V"; mkdir -p "$(dirname "$V")"
"$PY" -m venv "$V" >&2
"$V/bin/pip" install -q -U pip >&2
echo "torch==2.13.0" > "$V/constraints.txt"
"$V/bin/pip" install -q -c "$V/constraints.txt" -r "$HERE/requirements-et.lock" >&2
# optimum-executorch pins optimum~=2.0.0 / transformers==5.0.0rc1: never let pip re-resolve
"$V/bin/pip" install -q -c "$V/constraints.txt" --no-deps optimum==2.0.0 optimum-executorch==1.1.0 >&2
echo "$want" > "$stamp"
echo "$V"
