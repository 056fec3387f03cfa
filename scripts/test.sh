#!/usr/bin/env bash
# The README's test command: set up the host environment, then run the whole suite.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup.sh")"
export FIRST_EDGE_DATA="${FIRST_EDGE_DATA:-$ROOT/../shared/data}"
# the aarch64 emulation cache of tests/test_aarch64.py (Debian arm64 python + PyPI aarch64 wheels, about
# 25 s the first time, nothing installed system-wide); FIRST_EDGE_AARCH64=0 skips it, and where it cannot
# be set up (no Debian mirror, not x86_64) only that test is skipped
if [[ "${FIRST_EDGE_AARCH64:-1}" != 0 ]]; then
  FIRST_EDGE_PYTHON="$VENV/bin/python" bash "$ROOT/scripts/aarch64.sh" --setup-only >/dev/null 2>&1 \
    || echo "[test] aarch64 emulation setup failed: tests/test_aarch64.py will be skipped" >&2
fi
# clang with libFuzzer for tests/test_fuzz_cpp.py (Debian's clang-14 unpacked into a cache, a few seconds
# the first time, nothing installed system-wide); FIRST_EDGE_FUZZ_CPP=0 skips it, a failure skips that test
if [[ "${FIRST_EDGE_FUZZ_CPP:-1}" != 0 ]]; then
  bash "$ROOT/scripts/fuzz_cpp.sh" --setup-only >/dev/null 2>&1 \
    || echo "[test] clang/libFuzzer setup failed: tests/test_fuzz_cpp.py will be skipped" >&2
fi
# the Android toolchain of tests/test_android.py (Debian's aapt/aapt2, zipalign, apksigner, android.jar API 23,
# dx, junit4, org.json unpacked into ~/.cache/first-edge/android with a private apt configuration, about 10 s
# the first time, nothing installed system-wide); the test also sets it up itself, and where it cannot be set
# up the Android tests fail (they do not skip)
bash "$ROOT/scripts/android_cache.sh" >/dev/null 2>&1 \
  || echo "[test] Android toolchain setup failed: tests/test_android.py will fail (see bash scripts/android_cache.sh)" >&2
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q "$@"
