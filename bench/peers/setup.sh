#!/usr/bin/env bash
# Build the peer-runtime virtual environments used by bench/ (their pins clash, so one venv each).
#
#   bash bench/peers/setup.sh onnx    # optimum-onnx 0.1.0 + ORT 1.32 (transformers 4.57.6)  -> venv-onnx
#   bash bench/peers/setup.sh genai   # onnxruntime-genai 0.18.0 + its model builder (transformers 5.24) -> venv-genai
#   bash bench/peers/setup.sh et      # executorch 1.5.1 + optimum-executorch 1.1.0 (transformers 5.0.0rc1) -> venv-et
#   bash bench/peers/setup.sh onnx genai et
#
# Venvs go under ${FIRST_EDGE_PEERS:-~/.cache/first-edge/peers}. Exact versions come from the lock files
# here (measured working; see ../../docs/onnx.md for the pitfalls). torch is pinned to 2.13.0 (CPU wheel).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${FIRST_EDGE_PEERS:-$HOME/.cache/first-edge/peers}
PY=${PY:-python3.11}
export HF_HUB_OFFLINE=1
mkdir -p "$ROOT"
[[ $# -ge 1 ]] || { echo "usage: $0 onnx|genai|et [...]" >&2; exit 2; }
mk() {  # mk <venv name> <lock file>
  local v="$ROOT/$1" lock="$HERE/$2"
  if [[ -x "$v/bin/python" && -f "$v/.first-edge-ok" && -z "${FRESH:-}" ]]; then
    echo "== $v exists (FRESH=1 to rebuild)"; return 0
  fi
  rm -rf "$v"
  "$PY" -m venv "$v"
  "$v/bin/pip" install -q -U pip
  "$v/bin/pip" install -q -c "$HERE/constraints.txt" -r "$lock"
}
for what in "$@"; do
  case "$what" in
    onnx)  mk venv-onnx requirements-onnx.lock ;;
    genai) mk venv-genai requirements-genai.lock ;;
    et)    mk venv-et requirements-et.lock
           # optimum-executorch pins optimum~=2.0.0 / transformers==5.0.0rc1: install it without re-resolving
           "$ROOT/venv-et/bin/pip" install -q -c "$HERE/constraints.txt" --no-deps optimum==2.0.0 optimum-executorch==1.1.0 ;;
    *) echo "unknown peer venv: $what (onnx|genai|et)" >&2; exit 2 ;;
  esac
  v=$ROOT/venv-$what
  "$v/bin/python" -c 'import torch; print("== '"$what"': torch", torch.__version__)'
  touch "$v/.first-edge-ok"
done
