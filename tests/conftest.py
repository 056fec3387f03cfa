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
