"""Shared, cached artifacts of the ExecuTorch tests: tiny bundles (fp32, 8da4w) and the C++ runner build.

Built once per pytest process (module-level cache), used by test_et.py and test_et_cpp.py. The C++ build
itself lives in tools/cpp_build.py (bench/bench_et.py builds the same runner); re-exported here.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from tools.cpp_build import cmake_exe, cpp_build, executorch_dir  # noqa: F401  (the C++ build, shared with bench/)

ROOT = Path(__file__).resolve().parents[1]
MAX_CONTEXT = 64
N_PROMPTS = 10


@functools.lru_cache(maxsize=None)
def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="first_edge_et_"))


# The shared fp32 bundle's routers pool prompt positions [min(5, T - 1), T) (a 5-token chat prefix left
# out, DESIGN.md Changes 5), so every fp32 parity test (Python and C++) runs with pool_start > 0 at no extra
# export; the 8da4w bundle is built from pool_start 0 routers (checkpoints from before pool_start).
POOL_START = 5


def tiny_model_and_run(layers: int = 6, pool_start: int = POOL_START):
    return _tiny_model_and_run(layers, pool_start)


def tiny_bundle(quantize: str = "none", layers: int = 6, pool_start: int = POOL_START) -> Path:
    return _tiny_bundle(quantize, layers, pool_start)


def reference(layers: int = 6, pool_start: int = POOL_START):
    return _reference(layers, pool_start)


@functools.lru_cache(maxsize=None)  # (cached on the full argument tuple: the wrappers above fill in defaults)
def _tiny_model_and_run(layers: int, pool_start: int):
    """A tiny llama folder plus a run folder with hand-set routers (scores straddle 0.5: mixed masks)."""
    from helpers import randomize_routers, save_tiny_model_dir

    from export.model import build_first_model

    d = workdir()
    model_dir = d / f"tiny_model_{layers}"
    if not (model_dir / "config.json").exists():
        save_tiny_model_dir(model_dir, "llama", layers=layers)
    fm, _ = build_first_model(str(model_dir), verbose=False)
    randomize_routers(fm, seed=1)
    fm.pool_start = pool_start
    run = d / f"run_{layers}" if pool_start == 0 else d / f"run_{layers}_pool{pool_start}"
    fm.save_routers(run)
    return model_dir, run


@functools.lru_cache(maxsize=None)
def _tiny_bundle(quantize: str, layers: int, pool_start: int) -> Path:
    from export.build import build

    model_dir, run = tiny_model_and_run(layers, pool_start)
    out = workdir() / (f"bundle_{quantize}_{layers}" + (f"_pool{pool_start}" if pool_start else ""))
    build("android", out, model=str(model_dir), run=str(run), quantize=quantize, max_context=MAX_CONTEXT,
          verbose=False)
    return out


@functools.lru_cache(maxsize=None)
def _reference(layers: int, pool_start: int):
    from export.model import build_first_model

    model_dir, run = tiny_model_and_run(layers, pool_start)
    fm, tok = build_first_model(str(model_dir), str(run), verbose=False)
    return fm


@functools.lru_cache(maxsize=None)
def pool_start_cases(n_new: int = 8):
    """[(prompt ids, reference GenerationResult with the routers' mask at threshold 0.5, plain-mean scores)] for
    the shared fp32 bundle: prompts shorter than, equal to and longer than POOL_START."""
    import numpy as np
    import torch

    from export.reference import TorchBackend
    from runtime.loop import SamplingConfig, generate

    fm = reference()
    assert fm.pool_start == POOL_START
    rng = np.random.default_rng(7)
    cases = []
    for T in (1, 3, POOL_START, POOL_START + 1, 9, 17):
        ids = rng.integers(5, 96, size=T).astype(np.int64)
        res = generate(TorchBackend(fm, max_context=MAX_CONTEXT), ids, SamplingConfig(max_new_tokens=n_new,
                       ignore_eos=True), threshold=0.5, keep_logits=True)
        try:
            fm.pool_start = 0
            with torch.inference_mode():
                plain = fm.prefill(torch.from_numpy(ids).view(1, -1))[1].numpy()
        finally:
            fm.pool_start = POOL_START
        cases.append((ids, res, plain))
    return cases


def prompts(n: int = N_PROMPTS):
    import numpy as np

    rng = np.random.default_rng(123)
    return [rng.integers(5, 96, size=int(rng.integers(1, 24))).astype(np.int64) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def end_of_context_case():
    """(prompt ids, mask, reference GenerationResult) for a decode that runs to the last position of the
    context with every other layer skipped, so the layers' caches end at different lengths."""
    import numpy as np

    from export.reference import TorchBackend
    from runtime.loop import SamplingConfig, generate

    fm = reference()
    ids = np.arange(5, 34)
    mask = np.ones(fm.n_layers, bool)
    mask[1::2] = False
    cfg = SamplingConfig(max_new_tokens=MAX_CONTEXT - len(ids), ignore_eos=True)
    return ids, mask, generate(TorchBackend(fm, max_context=MAX_CONTEXT), ids, cfg, mask=mask, keep_logits=True)
