"""The device runtime imports and runs without torch (or transformers) installed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = r"""
import sys, importlib.abc
BLOCKED = ("torch", "transformers", "onnx", "safetensors", "export")
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the device runtime must not need it")
        return None
sys.meta_path.insert(0, Blocker())
import runpy
sys.argv = ["runtime"] + sys.argv[1:]
try:
    runpy.run_module("runtime", run_name="__main__", alter_sys=True)
finally:
    bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("IMPORTED_BLOCKED=" + ",".join(bad), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def bundle_dir(tiny_dir, tmp_path_factory):
    from export.build import build

    return build("rpi", tmp_path_factory.mktemp("nt") / "b", model=str(tiny_dir), max_context=48, verbose=False,
                 decode_shape="both", validate_graphs=False)


def test_blocker_really_blocks():
    p = subprocess.run([sys.executable, "-c", BLOCKER.replace('runpy.run_module("runtime"', 'import torch  #')
                        .replace(', run_name="__main__", alter_sys=True)', '')],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=str(ROOT))
    assert p.returncode != 0 and "torch is blocked" in p.stderr


@pytest.mark.parametrize("shape", ["fused", "split"])
def test_runtime_runs_a_bundle_without_torch(bundle_dir, shape):
    p = subprocess.run([sys.executable, "-c", BLOCKER, "--bundle", str(bundle_dir), "--prompt", "w5 w6 w7 w8",
                        "--max-new-tokens", "6", "--ignore-eos", "--json", "--backend-opt", f"decode_shape={shape}"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=str(ROOT),
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "IMPORTED_BLOCKED=\n" in p.stderr + "\n" and "IMPORTED_BLOCKED=" in p.stderr
    assert [l for l in p.stderr.splitlines() if l.startswith("IMPORTED_BLOCKED=")] == ["IMPORTED_BLOCKED="]
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    assert stats["new_tokens"] == 6 and stats["runtime"] == "onnxruntime"
