#!/usr/bin/env bash
# Run the Raspberry Pi path (ONNX Runtime bundle, python -m runtime) on 64-bit ARM under qemu user-mode
# emulation on an x86_64 Debian 12 host, and check that it generates the same tokens as the x86 run.
#
#   bash scripts/aarch64.sh [--bundle DIR] [--prompt TEXT] [--max-new-tokens N] [--threads N]
#                           [--setup-only] [-- EXTRA python -m runtime OPTIONS (e.g. --mask 101010)]
#
# Without --bundle it builds a tiny random Llama bundle (rpi target, needs the host venv with torch) in the
# cache. Greedy decoding both times (the runtime's default), same bundle, prompt, options and thread count.
# Prints both token lists; exit status 0 when identical, 1 when they differ, 2 on a usage/setup error.
#
# Setup (once, idempotent; nothing is installed into the system, no binfmt handler is registered, the
# system's apt state is untouched): with a private apt configuration it downloads Debian bookworm's arm64
# python3.11 and the libraries it needs plus qemu-user-static for amd64, unpacks them with dpkg-deb -x,
# and installs PyPI's aarch64 wheels of numpy, onnxruntime and tokenizers (versions from constraints.txt)
# with pip --target. Everything lives in $FIRST_EDGE_AARCH64_CACHE (default ~/.cache/first-edge/aarch64):
#   apt/       private apt state, lists and the downloaded .debs
#   root/      the arm64 root (dpkg-deb -x of the .debs) + a fake proc/cpuinfo (see below)
#   qemu/      qemu-aarch64-static (taken from the amd64 qemu-user-static .deb)
#   site/      the aarch64 wheels (PYTHONPATH)
#
# Environment: FIRST_EDGE_AARCH64_CACHE, FIRST_EDGE_AARCH64_CPU (qemu -cpu; default cortex-a72, the
# Raspberry Pi 4's core; cortex-a76 is the Pi 5's), FIRST_EDGE_PYTHON (host python; default the project
# venv), FIRST_EDGE_DEBIAN_MIRROR / FIRST_EDGE_DEBIAN_SECURITY (default deb.debian.org).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FIRST_EDGE_AARCH64_CACHE:-$HOME/.cache/first-edge/aarch64}"
QCPU="${FIRST_EDGE_AARCH64_CPU:-cortex-a72}"
MIRROR="${FIRST_EDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${FIRST_EDGE_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
if [[ -n "${FIRST_EDGE_PYTHON:-}" ]]; then HOSTPY="$FIRST_EDGE_PYTHON"
elif [[ -x "$HOME/.cache/first-edge/venv/bin/python" ]]; then HOSTPY="$HOME/.cache/first-edge/venv/bin/python"
else HOSTPY=python3; fi

# arm64 packages: python3.11 and its shared-library closure (apt-cache depends --recurse, without
# dpkg/perl/tar, which only the maintainer scripts use; we never run those)
ARM64_PKGS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11 libc6 libgcc-s1
gcc-12-base libstdc++6 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1
libncursesw6 libtinfo6 libreadline8 readline-common libdb5.3 libgdbm6 libgdbm-compat4 libnsl2 libtirpc3
libtirpc-common libgssapi-krb5-2 libk5crypto3 libkrb5-3 libkrb5support0 libcom-err2 libkeyutils1
libcrypt1 libzstd1 media-types"
WHEELS="numpy onnxruntime tokenizers"

BUNDLE="" PROMPT="What is 47 plus 38?" MAXNEW=8 THREADS=1 SETUP_ONLY=0 EXTRA=()
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle) BUNDLE="$2"; shift 2 ;;
    --prompt) PROMPT="$2"; shift 2 ;;
    --max-new-tokens) MAXNEW="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --setup-only) SETUP_ONLY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[aarch64] $*" >&2; }

[[ "$(uname -m)" == x86_64 ]] || die "this script emulates aarch64 on an x86_64 host (this is $(uname -m))"
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "needs apt-get and dpkg-deb (Debian)"
[[ -r "$KEYRING" ]] || die "missing $KEYRING (debian-archive-keyring)"

# shellcheck source=scripts/debian_cache.sh
source "$REPO/scripts/debian_cache.sh"

setup() {
  local t0 t step_key pins
  t0=$(now)
  apt_private_init arm64 arm64 amd64
  apt_private_update "deb [signed-by=$KEYRING] $MIRROR bookworm main
deb [signed-by=$KEYRING] $MIRROR bookworm-updates main
deb [signed-by=$KEYRING] $SECURITY bookworm-security main"
  local pkgs=() p
  for p in $ARM64_PKGS; do
    case "$p" in readline-common|media-types|libtirpc-common) pkgs+=("$p") ;; *) pkgs+=("$p:arm64") ;; esac
  done
  apt_private_download "root qemu" "${pkgs[@]}" qemu-user-static:amd64

  step_key="$(cd "$CACHE/apt/debs" && ls ./*_arm64.deb ./*_all.deb | tr '\n' ' ')"
  if ! stamp_ok root "$step_key" || [[ ! -x "$CACHE/root/usr/bin/python3.11" ]]; then
    t=$(now); log "dpkg-deb -x the arm64 packages into $CACHE/root"
    rm -rf "$CACHE/root.tmp" && mkdir -p "$CACHE/root.tmp"
    local d
    for d in "$CACHE"/apt/debs/*_arm64.deb "$CACHE"/apt/debs/*_all.deb; do dpkg-deb -x "$d" "$CACHE/root.tmp"; done
    # qemu-user resolves absolute paths inside -L ROOT first, so the emulated process reads this cpuinfo.
    # Without it ONNX Runtime's cpuinfo parses the x86 host's /proc/cpuinfo, finds no ARM core and
    # segfaults on import. A Cortex-A72 like the Raspberry Pi 4 (matches the default qemu -cpu).
    mkdir -p "$CACHE/root.tmp/proc"
    local i n; n=$(nproc)
    for ((i = 0; i < n; i++)); do
      printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i"
    done > "$CACHE/root.tmp/proc/cpuinfo"
    rm -rf "$CACHE/root" && mv "$CACHE/root.tmp" "$CACHE/root"
    stamp_set root "$step_key"; log "  done in $(since "$t") s"
  fi

  step_key="$(cd "$CACHE/apt/debs" && ls ./qemu-user-static_*_amd64.deb)"
  if ! stamp_ok qemu "$step_key" || [[ ! -x "$CACHE/qemu/qemu-aarch64-static" ]]; then
    t=$(now); log "dpkg-deb -x qemu-user-static (amd64), keeping qemu-aarch64-static"
    rm -rf "$CACHE/qemu.tmp" "$CACHE/qemu" && mkdir -p "$CACHE/qemu.tmp" "$CACHE/qemu"
    dpkg-deb -x "$CACHE"/apt/debs/qemu-user-static_*_amd64.deb "$CACHE/qemu.tmp"
    mv "$CACHE/qemu.tmp/usr/bin/qemu-aarch64-static" "$CACHE/qemu/"
    rm -rf "$CACHE/qemu.tmp"
    stamp_set qemu "$step_key"; log "  done in $(since "$t") s"
  fi

  pins="$(grep -iE '^(numpy|onnxruntime|tokenizers)==' "$REPO/constraints.txt" | sort | tr '\n' ' ')"
  [[ $(wc -w <<<"$pins") -eq 3 ]] || die "constraints.txt does not pin numpy, onnxruntime and tokenizers"
  if ! stamp_ok site "$pins" || [[ ! -d "$CACHE/site/onnxruntime" ]]; then
    t=$(now); log "pip install --target site (aarch64 wheels): $pins"
    rm -rf "$CACHE/site.tmp"
    # shellcheck disable=SC2086
    "$HOSTPY" -m pip install -q --disable-pip-version-check --no-warn-script-location --target "$CACHE/site.tmp" \
      --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
      --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64 \
      --platform manylinux_2_28_aarch64 --platform any -c "$REPO/constraints.txt" $pins >&2
    rm -rf "$CACHE/site" && mv "$CACHE/site.tmp" "$CACHE/site"
    stamp_set site "$pins"; log "  done in $(since "$t") s"
  fi

  # smoke test of the emulated interpreter and the wheels
  aarch64_py -c "import platform, numpy, onnxruntime, tokenizers; assert platform.machine() == 'aarch64'" \
    || die "the emulated python cannot import numpy/onnxruntime/tokenizers"
  log "setup ready in $(since "$t0") s ($(du -sh "$CACHE" | cut -f1) in $CACHE)"
}

aarch64_py() {
  PYTHONPATH="$CACHE/site:$REPO" PYTHONDONTWRITEBYTECODE=1 \
    "$CACHE/qemu/qemu-aarch64-static" -cpu "$QCPU" -L "$CACHE/root" "$CACHE/root/usr/bin/python3.11" "$@"
}

setup
[[ $SETUP_ONLY == 1 ]] && exit 0

if [[ -z "$BUNDLE" ]]; then
  BUNDLE="$CACHE/tiny-rpi"
  if [[ ! -f "$BUNDLE/manifest.json" ]]; then
    t=$(now); log "no --bundle: building a tiny random Llama bundle in $BUNDLE"
    (cd "$REPO" && "$HOSTPY" - "$CACHE/tiny_llama" "$BUNDLE" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import save_tiny_model_dir
from export.build import build
build("rpi", Path(sys.argv[2]), model=str(save_tiny_model_dir(Path(sys.argv[1]))), max_context=64, verbose=False)
EOF
    ) >&2
    log "  done in $(since "$t") s"
  fi
fi
[[ -f "$BUNDLE/manifest.json" ]] || die "$BUNDLE is not a bundle (no manifest.json)"
BUNDLE="$(cd "$BUNDLE" && pwd)"

ARGS=(--bundle "$BUNDLE" --prompt "$PROMPT" --max-new-tokens "$MAXNEW" --threads "$THREADS" "${EXTRA[@]}")
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT

run_one() {  # NAME CMD...: run, show the text and stats, leave the token line in $TMP/NAME.tokens
  local name="$1" t rc=0; shift
  t=$(now)
  (cd "$REPO" && "$@" "$REPO/scripts/aarch64_tokens.py" "${ARGS[@]}") >"$TMP/$name.out" 2>"$TMP/$name.err" || rc=$?
  local secs; secs=$(since "$t")
  if [[ $rc != 0 ]]; then cat "$TMP/$name.out" "$TMP/$name.err" >&2; die "$name run failed (exit $rc)"; fi
  grep -v '^FIRST_EDGE_TOKENS ' "$TMP/$name.out" | sed "s/^/[$name] /"
  sed "s/^/[$name] /" "$TMP/$name.err" >&2
  grep '^FIRST_EDGE_TOKENS ' "$TMP/$name.out" | sed 's/^FIRST_EDGE_TOKENS //' > "$TMP/$name.tokens"
  echo "[$name] wall ${secs} s"
}

log "bundle $BUNDLE, prompt ${PROMPT@Q}, --max-new-tokens $MAXNEW --threads $THREADS ${EXTRA[*]}"
run_one x86_64 "$HOSTPY"
run_one aarch64 aarch64_py
"$HOSTPY" - "$TMP/x86_64.tokens" "$TMP/aarch64.tokens" <<'EOF'
import json, sys
x, a = (json.load(open(p)) for p in sys.argv[1:3])
assert x["machine"] == "x86_64" and a["machine"] == "aarch64", (x["machine"], a["machine"])
print("x86_64  tokens:", x["tokens"], x["stop_reason"])
print("aarch64 tokens:", a["tokens"], a["stop_reason"])
if x["tokens"] != a["tokens"]:
    n = next((i for i, (p, q) in enumerate(zip(x["tokens"], a["tokens"])) if p != q), min(len(x["tokens"]), len(a["tokens"])))
    print(f"DIFFERENT (first difference at generated token {n})")
    sys.exit(1)
print(f"IDENTICAL ({len(x['tokens'])} tokens)")
EOF
