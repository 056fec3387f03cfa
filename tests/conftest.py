import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ.get("FIRST_EDGE_DATA", ROOT.parent / "shared" / "data"))
    if not d.exists():
        pytest.fail(f"task data folder not found: {d} (set FIRST_EDGE_DATA)")
    return d


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from helpers import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model (SmolLM2-135M-Instruct), loaded once per session."""
    from export.model import build_first_model

    fm, tok = build_first_model(None, verbose=False)
    return fm, tok


# The tiny ONNX Runtime bundle of tests/test_onnx.py and tests/test_session.py (built once per run): hand-set
# routers (mixed masks at threshold 0.5), layer 0 pinned, max_context 64, both decode shapes.
@pytest.fixture(scope="session")
def run_dir(tiny_dir, tmp_path_factory):
    """A run folder with hand-set routers (mixed masks at threshold 0.5) and a pinned layer."""
    from export.model import build_first_model

    from helpers import randomize_routers

    fm, _ = build_first_model(str(tiny_dir), verbose=False)
    randomize_routers(fm, seed=3)
    fm.set_pinned([0])
    d = tmp_path_factory.mktemp("run")
    fm.save_routers(d)
    return d


@pytest.fixture(scope="session")
def ref_model(tiny_dir, run_dir):
    from export.model import build_first_model

    return build_first_model(str(tiny_dir), str(run_dir), verbose=False)


@pytest.fixture(scope="session")
def bundle_dir(tiny_dir, run_dir, tmp_path_factory):
    """One fp32 bundle with both decode shapes, built once through export.build."""
    from export.build import build

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return build("rpi", out, model=str(tiny_dir), run=str(run_dir), max_context=64, verbose=False,
                 decode_shape="both")
