"""Model folders, router checkpoints and the generate CLI: the happy path and every error path."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.loading import check_model_dir, load_model
from export.model import build_first_model
from helpers import randomize_routers, save_tiny_model_dir, tiny_first
from runtime.errors import FirstEdgeError

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_local_folder_loads_and_generates(tiny_dir):
    fm, tok = build_first_model(str(tiny_dir), verbose=False)
    assert fm.n_layers == 6 and fm.cfg.model_type == "llama"
    from export.reference import run_generation

    res = run_generation(fm, tok, "w5 w6 w7", max_new_tokens=4, ignore_eos=True)
    assert len(res.tokens) == 4 and res.layers_kept == 6


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_llama_family_folders_load(tmp_path, arch):
    d = save_tiny_model_dir(tmp_path / arch, arch)
    lm = load_model(str(d), verbose=False)
    assert lm.model.config.model_type == arch


def test_missing_folder(tmp_path):
    with pytest.raises(FirstEdgeError, match="model folder not found"):
        check_model_dir(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(FirstEdgeError, match="no config.json"):
        check_model_dir(tmp_path)


def _with_config(tmp_path, tiny_dir, **changes):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_unsupported_architecture(tmp_path, tiny_dir):
    d = _with_config(tmp_path, tiny_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(FirstEdgeError, match="unsupported architecture 'gpt2'"):
        load_model(str(d), verbose=False)


def test_not_a_decoder(tmp_path, tiny_dir):
    d = _with_config(tmp_path, tiny_dir, model_type="bert")
    with pytest.raises(FirstEdgeError, match="not a decoder-only language model"):
        load_model(str(d), verbose=False)
    d2 = _with_config(tmp_path / "x", tiny_dir, model_type="t5", is_encoder_decoder=True)
    with pytest.raises(FirstEdgeError, match="not a decoder-only"):
        check_model_dir(d2)


def test_corrupt_checkpoint(tmp_path, tiny_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(FirstEdgeError, match="corrupt or unreadable checkpoint"):
        load_model(str(d), verbose=False)


def test_no_weights_and_bad_json(tmp_path, tiny_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FirstEdgeError, match="no weights"):
        check_model_dir(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(FirstEdgeError, match="not valid JSON"):
        check_model_dir(d)


def test_cli_error_is_one_line_not_a_traceback(tmp_path):
    r = run_cli("export.generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: model folder not found")
    assert "Traceback" not in r.stderr


def test_cli_generates_with_mask_and_stats(tiny_dir):
    r = run_cli("export.generate", "--model", str(tiny_dir), "--prompt", "w5 w9", "--mask", "101101",
                "--max-new-tokens", "5", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["mask"] == "101101" and stats["layers_kept"] == 4 and stats["new_tokens"] == 5
    r = run_cli("export.generate", "--model", str(tiny_dir), "--prompt", "w5", "--mask", "10")
    assert r.returncode == 2 and "layer mask has length 2, the model has 6 layers" in r.stderr


# ---------------------------------------------------------------- router checkpoints
def test_routers_save_load_roundtrip(tmp_path):
    fm = randomize_routers(tiny_first("llama"), seed=4)
    fm.set_pinned([0])
    fm.threshold = 0.6
    fm.save_routers(tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "routers.json").read_text())
    assert cfg["base_model"]["model_type"] == "llama" and cfg["pinned"] == [0]
    fm2 = tiny_first("llama")  # same base weights (seed 0), untrained routers
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert not torch.allclose(fm2.prefill(ids)[1], fm.prefill(ids)[1])
    fm2.load_routers(tmp_path / "r")
    assert torch.equal(fm2.prefill(ids)[1], fm.prefill(ids)[1])
    assert fm2.pinned == [0] and fm2.threshold == 0.6


def test_routers_pool_start_roundtrip_and_bad_values(tmp_path):
    fm = randomize_routers(tiny_first("llama"), seed=4)
    fm.pool_start = 3
    fm.save_routers(tmp_path / "r")
    cfg_file = tmp_path / "r" / "routers.json"
    assert json.loads(cfg_file.read_text())["pool_start"] == 3
    fm2 = tiny_first("llama")
    assert fm2.pool_start == 0
    fm2.load_routers(tmp_path / "r")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert fm2.pool_start == 3 and torch.equal(fm2.prefill(ids)[1], fm.prefill(ids)[1])
    # a checkpoint from before pool_start (no key) loads as 0: every prompt token pooled
    cfg = json.loads(cfg_file.read_text())
    del cfg["pool_start"]
    cfg_file.write_text(json.dumps(cfg))
    fm2.load_routers(tmp_path / "r")
    assert fm2.pool_start == 0
    for bad in (-1, 2.5, "3", True, None):
        cfg["pool_start"] = bad
        cfg_file.write_text(json.dumps(cfg))
        fm3 = tiny_first("llama")
        with pytest.raises(FirstEdgeError, match="pool_start must be a non-negative integer") as e:
            fm3.load_routers(tmp_path / "r")
        assert "\n" not in str(e.value) and "routers.json" in str(e.value)
        assert fm3.pool_start == 0


def test_routers_refused_on_wrong_base(tmp_path):
    tiny_first("llama", seed=0).save_routers(tmp_path / "r")
    other = tiny_first("llama", seed=1)  # same shapes, other weights
    with pytest.raises(FirstEdgeError, match="trained for another base model"):
        other.load_routers(tmp_path / "r")
    bigger = tiny_first("llama", layers=4)
    with pytest.raises(FirstEdgeError, match="n_layers"):
        bigger.load_routers(tmp_path / "r")
    with pytest.raises(FirstEdgeError, match="no routers in"):
        other.load_routers(tmp_path / "missing")
