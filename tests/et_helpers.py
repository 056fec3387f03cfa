"""Shared, cached artifacts of the ExecuTorch tests: tiny bundles (fp32, 8da4w) and the C++ runner build.

Built once per pytest process (module-level cache), used by test_et.py and test_et_cpp.py.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_CONTEXT = 64
N_PROMPTS = 10


@functools.lru_cache(maxsize=None)
def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="first_edge_et_"))


@functools.lru_cache(maxsize=None)
def tiny_model_and_run(layers: int = 6):
    """A tiny llama folder plus a run folder with hand-set routers (scores straddle 0.5: mixed masks)."""
    from helpers import randomize_routers, save_tiny_model_dir

    from export.model import build_first_model

    d = workdir()
    model_dir = save_tiny_model_dir(d / f"tiny_model_{layers}", "llama", layers=layers)
    fm, _ = build_first_model(str(model_dir), verbose=False)
    randomize_routers(fm, seed=1)
    run = d / f"run_{layers}"
    fm.save_routers(run)
    return model_dir, run


@functools.lru_cache(maxsize=None)
def tiny_bundle(quantize: str = "none", layers: int = 6) -> Path:
    from export.build import build

    model_dir, run = tiny_model_and_run(layers)
    out = workdir() / f"bundle_{quantize}_{layers}"
    build("android", out, model=str(model_dir), run=str(run), quantize=quantize, max_context=MAX_CONTEXT,
          verbose=False)
    return out


@functools.lru_cache(maxsize=None)
def reference(layers: int = 6):
    from export.model import build_first_model

    model_dir, run = tiny_model_and_run(layers)
    fm, tok = build_first_model(str(model_dir), str(run), verbose=False)
    return fm


def prompts(n: int = N_PROMPTS):
    import numpy as np

    rng = np.random.default_rng(123)
    return [rng.integers(5, 96, size=int(rng.integers(1, 24))).astype(np.int64) for _ in range(n)]


def executorch_dir() -> str:
    return importlib.util.find_spec("executorch").submodule_search_locations[0]


def cmake_exe() -> str:
    exe = Path(sys.executable).parent / "cmake"
    return str(exe) if exe.exists() else (shutil.which("cmake") or "cmake")


@functools.lru_cache(maxsize=None)
def cpp_build(asan: bool = False) -> Path:
    """Configure + build runtime/cpp into runtime/cpp/build (kept between runs: incremental)."""
    b = ROOT / "runtime" / "cpp" / ("build-asan" if asan else "build")
    cm = cmake_exe()
    args = [cm, "-S", str(ROOT / "runtime" / "cpp"), "-B", str(b), f"-DCMAKE_PREFIX_PATH={executorch_dir()}",
            f"-DFIRST_EDGE_ASAN={'ON' if asan else 'OFF'}"]
    subprocess.run(args, check=True, capture_output=True, text=True)
    r = subprocess.run([cm, "--build", str(b), "-j", str(min(2, os.cpu_count() or 1))], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError("C++ build failed:\n" + r.stdout[-3000:] + r.stderr[-3000:])
    return b


@functools.lru_cache(maxsize=None)
def end_of_context_case():
    """(prompt ids, mask, reference GenerationResult) for a decode that runs to the last position of the
    context with every other layer skipped, so the layers' caches end at different lengths."""
    import numpy as np

    from export.generate import TorchBackend
    from runtime.loop import SamplingConfig, generate

    fm = reference()
    ids = np.arange(5, 34)
    mask = np.ones(fm.n_layers, bool)
    mask[1::2] = False
    cfg = SamplingConfig(max_new_tokens=MAX_CONTEXT - len(ids), ignore_eos=True)
    return ids, mask, generate(TorchBackend(fm, max_context=MAX_CONTEXT), ids, cfg, mask=mask, keep_logits=True)
