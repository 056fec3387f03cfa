"""Atomic outputs: a build or a training run killed part-way (a real SIGKILL of a child process) leaves
either what was there before or something that is refused clearly, and --resume continues a run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import tiny_vocab_data
from runtime.bundle import Bundle
from runtime.errors import FirstEdgeError

ROOT = Path(__file__).resolve().parents[1]


def _kill_when(cmd, ready, timeout: float = 300.0) -> bool:
    """Run ``cmd`` in a child; SIGKILL it as soon as ``ready()`` holds. False if it ended first."""
    p = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if ready():
                p.send_signal(signal.SIGKILL)
                p.wait()
                return True
            if p.poll() is not None:
                return False
            time.sleep(0.01)
        raise AssertionError(f"{cmd} did not reach the kill point in {timeout} s")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _build(tiny_dir, out):
    return ["-m", "export.build", "--target", "rpi", "--model", str(tiny_dir), "--max-context", "64", "--out", str(out)]


def test_killed_build_leaves_the_previous_bundle_or_nothing(tiny_dir, tmp_path):
    out = tmp_path / "dist" / "b"

    def mid_build():  # graphs written into the temporary folder, no manifest yet
        return any((d / "prefill.onnx").exists() for d in out.parent.glob(".b.building-*"))

    assert _kill_when(_build(tiny_dir, out), mid_build), "the build ended before the kill point"
    assert not out.exists(), "a killed first build must not leave a bundle at --out"
    leftovers = list(out.parent.glob(".b.building-*"))
    assert leftovers
    with pytest.raises(FirstEdgeError, match="no manifest.json"):
        Bundle(leftovers[0])
    # a complete build: validated, renamed into place, the stale temporary folder removed
    r = subprocess.run([sys.executable, *_build(tiny_dir, out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    before = Bundle(out).manifest["files"]
    assert not list(out.parent.glob(".b.*"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a normal folder, not the temporary folder's 0700
    # killing a rebuild keeps the previous bundle, whole
    assert _kill_when(_build(tiny_dir, out), mid_build)
    assert Bundle(out).manifest["files"] == before
    from runtime.backends import load_backend
    from runtime.loop import SamplingConfig, generate

    res = generate(load_backend(Bundle(out), threads=1), [5, 6, 7], SamplingConfig(max_new_tokens=3))
    assert len(res.tokens) == 3


def test_build_refuses_to_replace_a_folder_that_is_not_a_bundle(tiny_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = subprocess.run([sys.executable, *_build(tiny_dir, out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "is not a bundle" in r.stderr.strip().splitlines()[-1]
    assert (out / "notes.txt").read_text() == "keep me"


def test_killed_training_resumes_from_the_last_complete_checkpoint(tiny_dir, data_dir, tmp_path):
    data = tiny_vocab_data(data_dir, tmp_path / "data", n=4)
    run = tmp_path / "run"
    cmd = ["-m", "export.finetune", "--recipe", "e2e", "--preset", "tiny", "--model", str(tiny_dir), "--data", str(data),
           "--out", str(run), "--soft-steps", "30", "--hard-steps", "30", "--save-every", "5", "--no-progress"]

    def checkpointed():
        try:
            return torch.load(run / "checkpoint.pt", weights_only=False)["step"] >= 10
        except (OSError, RuntimeError, EOFError, KeyError, ValueError):
            return False

    assert _kill_when(cmd, checkpointed), "training ended before the kill point"
    step = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert 10 <= step < 60 and not (run / "routers.json").exists()
    assert not list(run.glob("*.tmp")) or all(p.name.endswith(".tmp") for p in run.glob("*.tmp"))
    from export.model import build_first_model

    with pytest.raises(FirstEdgeError, match="no routers in"):
        build_first_model(str(tiny_dir), str(run), verbose=False)
    # a new run into the same folder is not silently started over; --resume continues from the checkpoint
    r = subprocess.run([sys.executable, *cmd, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    log = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 61))
    fm, _ = build_first_model(str(tiny_dir), str(run), verbose=False)
    assert json.loads((run / "routers.json").read_text())["train"]["steps"] == 60
