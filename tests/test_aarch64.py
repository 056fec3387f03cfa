"""The Raspberry Pi path (ONNX Runtime bundle) on 64-bit ARM under qemu user-mode emulation.

scripts/aarch64.sh runs the same bundle, prompt and options with the x86 host interpreter and with
Debian's arm64 python3.11 + PyPI's aarch64 wheels under qemu-aarch64-static, and fails when the
greedy tokens differ. Skipped unless its cache was set up once with

    bash scripts/aarch64.sh --setup-only        # ~25 s, ~370 MB in ~/.cache/first-edge/aarch64

(or $FIRST_EDGE_AARCH64_CACHE); the test never downloads anything itself. Select it with
``pytest -m aarch64`` or ``pytest tests/test_aarch64.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "aarch64.sh"
CACHE = Path(os.environ.get("FIRST_EDGE_AARCH64_CACHE", Path.home() / ".cache" / "first-edge" / "aarch64"))
READY = all((CACHE / p).exists() for p in ("qemu/qemu-aarch64-static", "root/usr/bin/python3.11",
                                             "site/onnxruntime", ".stamp-site"))

pytestmark = [
    pytest.mark.aarch64,
    pytest.mark.skipif(not READY, reason=f"no aarch64 emulation cache in {CACHE} "
                                         "(set it up with: bash scripts/aarch64.sh --setup-only)"),
]


@pytest.fixture(scope="module")
def tiny_rpi_bundle(tiny_dir, tmp_path_factory):
    from export.build import build

    return build("rpi", tmp_path_factory.mktemp("aarch64") / "tiny-rpi", model=str(tiny_dir), max_context=64,
                 verbose=False)


@pytest.mark.parametrize("extra", [[], ["--mask", "101010", "--ignore-eos"]], ids=["all-layers", "mask-101010"])
def test_aarch64_tokens_match_x86(tiny_rpi_bundle, extra):
    env = dict(os.environ, FIRST_EDGE_AARCH64_CACHE=str(CACHE), FIRST_EDGE_PYTHON=sys.executable)
    cmd = ["bash", str(SCRIPT), "--bundle", str(tiny_rpi_bundle), "--prompt", "hello world",
           "--max-new-tokens", "12", "--", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    lines = {ln.split(" tokens:")[0].strip(): ln.split("tokens:")[1].strip()
             for ln in p.stdout.splitlines() if " tokens:" in ln}
    assert set(lines) == {"x86_64", "aarch64"}, p.stdout
    assert lines["x86_64"] == lines["aarch64"]
    assert "IDENTICAL (12 tokens)" in p.stdout
