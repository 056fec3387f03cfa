"""Property-based fuzzing of the Python runtimes (hypothesis, fixed seed, a short slice in CI).

Surfaces: the bundle manifest (every field: deleted, retyped, huge, negative, non-finite, path-like), the
graph files (bit flips and truncation, with a manifest that agrees with the damaged file), and the
run-time inputs of the generation loop (prompts, thresholds, budgets, masks, token counts). Expected in
every case: a correct result or a one-line FirstEdgeError naming the problem; never another exception.
A longer campaign: ``FIRST_EDGE_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py``.
"""
from __future__ import annotations

import json
import os
from datetime import timedelta
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from runtime.bundle import Bundle
from runtime.errors import FirstEdgeError
from runtime.loop import SamplingConfig, generate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("FIRST_EDGE_FUZZ_EXAMPLES", "60"))
# each case must end within a time bound (no hang); generous for a loaded 2-core CI machine
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=30), derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
MAX_CTX = 48


@pytest.fixture(scope="module")
def bundle(tiny_dir, tmp_path_factory):
    from export.build import build
    from export.model import build_first_model

    from helpers import randomize_routers

    fm, _ = build_first_model(str(tiny_dir), verbose=False)
    randomize_routers(fm, seed=5)
    run = tmp_path_factory.mktemp("fuzz_run")
    fm.save_routers(run)
    return build("rpi", tmp_path_factory.mktemp("fuzz") / "b", model=str(tiny_dir), run=str(run),
                 max_context=MAX_CTX, verbose=False, decode_shape="both")


def _one_line_or_ok(fn):
    try:
        return fn()
    except FirstEdgeError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)
        return None


def _load_and_run(path: Path):
    """What ``python -m runtime`` does with a bundle: validate, open the graphs and the tokenizer, generate."""
    from runtime.backends import load_backend
    from runtime.tokenizer import BundleTokenizer

    bundle = Bundle(path)
    be = load_backend(bundle, threads=1)
    ids = BundleTokenizer(bundle).encode_prompt("w5 w9")
    cfg = SamplingConfig(max_new_tokens=2, eos_ids=bundle.eos_ids)
    return generate(be, ids, cfg, pinned=bundle.pinned, default_threshold=bundle.default_threshold)


# ---------------------------------------------------------------- manifest
def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):  # the head of long lists (graphs.io, layer files)
            yield from _paths(v, prefix + (i,))


ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**63), st.sampled_from([0, -1, 1, 2**31, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["../x", "/etc/passwd", "", "tokenizer.json", "T", "S", "float16", "model.pte", "a" * 64]),
    st.lists(st.integers(-3, 100), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@st.composite
def manifest_mutation(draw, manifest):
    paths = [p for p in _paths(manifest) if p]
    path = draw(st.sampled_from(paths))
    how = draw(st.sampled_from(["delete", "replace", "scale"]))
    value = draw(ODD_VALUES)
    factor = draw(st.sampled_from([-1, 0, 2, 1000]))
    return path, how, value, factor


def _apply(m, path, how, value, factor):
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    k = path[-1]
    if how == "delete":
        del parent[k]
    elif how == "scale" and isinstance(parent[k], (int, float)) and not isinstance(parent[k], bool):
        parent[k] = parent[k] * factor
    else:
        parent[k] = value


@pytest.mark.parametrize("target", ["rpi", "android"])
def test_fuzz_manifest_fields(bundle, target, tmp_path_factory):
    if target == "android":
        from et_helpers import tiny_bundle  # the ExecuTorch test bundle (built once per session)

        bundle = tiny_bundle("none")
    d = tmp_path_factory.mktemp("fuzz_manifest") / "b"
    shutil.copytree(bundle, d)
    mf = d / "manifest.json"
    good = json.loads(mf.read_text())
    counts = {"ok": 0, "refused": 0}

    @seed(1)
    @FUZZ
    @given(st.data())
    def case(data):
        m = json.loads(json.dumps(good))
        _apply(m, *data.draw(manifest_mutation(good)))
        mf.write_text(json.dumps(m, allow_nan=True))
        counts["ok" if _one_line_or_ok(lambda: _load_and_run(d)) is not None else "refused"] += 1

    case()
    mf.write_text(json.dumps(good))
    print(f"[fuzz] manifest ({target}): {sum(counts.values())} cases, {counts}")
    assert counts["refused"] > 0


# ---------------------------------------------------------------- graph files (in a child: a crash fails the test)
CHILD = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from runtime.bundle import Bundle, write_manifest
from runtime.errors import FirstEdgeError
from runtime.backends import load_backend
from runtime.loop import SamplingConfig, generate
d, cases = Path(sys.argv[2]), json.loads(sys.argv[3])
good = {n: (d / n).read_bytes() for n in ("prefill.onnx", "decode.onnx", "layer_1.onnx", "tokenizer.json")}
m0 = json.loads((d / "manifest.json").read_text())
res = {"ok": 0, "refused": 0}
for name, kind, pos, bit in cases:
    data = bytearray(good[name])
    if kind == "flip":
        data[pos % len(data)] ^= 1 << bit
    else:
        data = data[: pos % len(data)]
    (d / name).write_bytes(bytes(data))
    m = json.loads(json.dumps(m0)); m.pop("files")
    write_manifest(d, m)  # a manifest that agrees with the damaged file
    try:
        be = load_backend(Bundle(d), threads=1, decode_shape="split" if name.startswith("layer") else "fused")
        generate(be, [5, 6, 7], SamplingConfig(max_new_tokens=2))
        res["ok"] += 1
    except FirstEdgeError as e:
        assert "\n" not in str(e), str(e)
        res["refused"] += 1
    (d / name).write_bytes(good[name])
print(json.dumps(res))
"""


def test_fuzz_graph_files(bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_files") / "b"
    shutil.copytree(bundle, d)
    rng = np.random.default_rng(0)
    names = ["prefill.onnx", "decode.onnx", "layer_1.onnx", "tokenizer.json"]
    n = max(8, EXAMPLES // 2)
    cases = [(names[i % 4], "flip" if i % 3 else "cut", int(rng.integers(0, 1 << 30)), int(rng.integers(0, 8)))
             for i in range(n)]
    r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(d), json.dumps(cases)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"[fuzz] graph files: {n} cases, {res}")
    assert res["refused"] > 0


# ---------------------------------------------------------------- run-time inputs
@pytest.fixture(scope="module")
def backends(bundle):
    from runtime.backends import load_backend

    return {s: load_backend(Bundle(bundle), threads=1, decode_shape=s) for s in ("fused", "split")}


def test_fuzz_runtime_inputs(backends):
    counts = {"ok": 0, "refused": 0}
    L = next(iter(backends.values())).n_layers

    @seed(2)
    @FUZZ
    @given(shape=st.sampled_from(["fused", "split"]),
           ids=st.one_of(st.lists(st.integers(3, 90), min_size=1, max_size=12),  # mostly valid, some not
                         st.lists(st.integers(3, 90), min_size=1, max_size=12),
                         st.lists(st.integers(-5, 200), max_size=60)),
           threshold=st.one_of(st.none(), st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True)),
           keep=st.one_of(st.none(), st.none(), st.integers(1, L), st.integers(-2, L + 2)),
           mask=st.one_of(st.none(), st.none(), st.none(), st.lists(st.booleans(), min_size=L, max_size=L),
                          st.lists(st.booleans(), max_size=L + 2), st.text(alphabet="01x ", max_size=L + 2)),
           n_new=st.one_of(st.integers(1, 6), st.integers(-1, MAX_CTX + 5)))
    def case(shape, ids, threshold, keep, mask, n_new):
        def run():
            cfg = SamplingConfig(max_new_tokens=n_new)
            res = generate(backends[shape], ids, cfg, threshold=threshold, keep=keep,
                           mask=None if mask is None else (mask if isinstance(mask, list) else list(mask)))
            assert 1 <= len(res.tokens) <= n_new and len(ids) + len(res.tokens) <= MAX_CTX + 1
            if keep is not None and mask is None:
                assert int(res.mask.sum()) == keep
            return res

        counts["ok" if _one_line_or_ok(run) is not None else "refused"] += 1

    case()
    print(f"[fuzz] run-time inputs: {sum(counts.values())} cases, {counts}")
    assert counts["ok"] > 0 and counts["refused"] > 0


def test_fuzz_text_prompts(bundle):
    """The device CLI's path from text: empty, whitespace-only, very long (past the context), control
    characters, any Unicode; a correct result or a one-line error."""
    from runtime.__main__ import main as runtime_main

    counts = {"ok": 0, "refused": 0}

    @seed(3)
    @FUZZ
    @given(prompt=st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\n\t ", "w5 " * 200, "\x00", "\ud7ff"]),
                            st.text(alphabet="w5 9\n", min_size=100, max_size=400)),
           n_new=st.integers(0, 8))
    def case(prompt, n_new):
        try:
            runtime_main(["--bundle", str(bundle), "--prompt", prompt, "--max-new-tokens", str(n_new), "--threads", "1"])
            counts["ok"] += 1
        except SystemExit as e:  # cli_main: a FirstEdgeError is one line on stderr and exit status 2
            assert e.code in (0, 2, None), e.code
            counts["ok" if e.code in (0, None) else "refused"] += 1

    case()
    print(f"[fuzz] text prompts: {sum(counts.values())} cases, {counts}")
    assert counts["ok"] > 0 and counts["refused"] > 0
