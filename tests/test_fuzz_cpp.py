"""A short fixed libFuzzer run on the C++ runner's manifest parsing and bundle validation.

scripts/fuzz_cpp.sh builds runtime/cpp/fuzz/fuzz_manifest.cpp (Json::parse + load_bundle_info, no
ExecuTorch) with clang -fsanitize=fuzzer,address,undefined and runs it from a seed corpus made from the
real bundle manifests in runtime/cpp/fuzz/seeds/. Skipped unless the clang cache was set up once with

    bash scripts/fuzz_cpp.sh --setup-only     # ~10 s, Debian bookworm's clang-14 in ~/.cache/first-edge/clang

(or $FIRST_EDGE_CLANG_CACHE); the test never downloads anything itself (it passes the cached clang++ as
FIRST_EDGE_CLANGXX). The long campaign is ``bash scripts/fuzz_cpp.sh --seconds 300``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "fuzz_cpp.sh"
CACHE = Path(os.environ.get("FIRST_EDGE_CLANG_CACHE", Path.home() / ".cache" / "first-edge" / "clang"))
CLANGXX = CACHE / "clang++"
READY = CLANGXX.exists() and (CACHE / "root" / "usr" / "lib" / "llvm-14" / "bin" / "clang").exists()

pytestmark = pytest.mark.skipif(
    not READY or shutil.which("python3") is None,
    reason=f"no clang cache in {CACHE} (set it up once with: bash scripts/fuzz_cpp.sh --setup-only)")


def test_libfuzzer_manifest_short_run(tmp_path):
    env = dict(os.environ, FIRST_EDGE_CLANGXX=str(CLANGXX), FIRST_EDGE_FUZZ_DIR=str(tmp_path / "build-fuzz"))
    r = subprocess.run(["bash", str(SCRIPT), "--runs", "2000"], env=env, capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out + "\n" + (tmp_path / "build-fuzz" / "last.log").read_text(errors="replace")[-4000:]
    assert "executions: 2000" in out and "no crash" in out, out
