"""ONNX export + ONNX Runtime backend (issue 4): parity with the PyTorch reference, real skipping,
in-place KV buffers, quantized builds, bad bundles, CLI."""
import json
import re
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from export.reference import TorchBackend
from helpers import VOCAB, randomize_routers, tiny_first
from runtime.bundle import Bundle, sha256_file
from runtime.errors import FirstEdgeError
from runtime.loop import SamplingConfig, generate

ROOT = Path(__file__).resolve().parents[1]
MAX_CTX = 64
SHAPES = ["fused", "split"]


def rand_ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, VOCAB, (n,), generator=g).tolist()


def backend(bundle_dir, shape, **kw):
    from runtime.ort_backend import OrtBackend

    return OrtBackend(Bundle(bundle_dir), threads=2, decode_shape=shape, **kw)


# ---------------------------------------------------------------- bundle layout
def test_bundle_manifest_lists_graphs_and_hashes(bundle_dir):
    b = Bundle(bundle_dir)
    m = b.manifest
    assert m["runtime"] == "onnxruntime" and m["target"] == "rpi" and m["dtype"] == "float32"
    g = m["graphs"]
    assert g["decode_shape"] in ("fused", "split") and sorted(g["decode_shapes"]) == ["fused", "split"]
    for f in ["prefill.onnx", "decode.onnx", "embed.onnx", "head.onnx", "layer_0.onnx", "tokenizer.json", "report.md"]:
        assert f in m["files"], f
        assert m["files"][f] == {"sha256": sha256_file(Path(bundle_dir) / f),
                                 "bytes": (Path(bundle_dir) / f).stat().st_size}
    assert all(f in m["files"] for f in g["files"])
    assert m["model"]["max_context"] == MAX_CTX and m["routing"]["pinned"] == [0]


# ---------------------------------------------------------------- parity with the PyTorch reference
def _masks(fm, n):
    rng = np.random.default_rng(11)
    yield "ones", [np.ones(fm.n_layers, bool)] * n
    yield "router", [None] * n  # the graph's own threshold mask (hand-set routers)
    rnd = []
    for _ in range(n):
        m = rng.random(fm.n_layers) < 0.5
        m[rng.integers(fm.n_layers)] = True
        rnd.append(m)
    yield "random", rnd


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_reference_generator(bundle_dir, ref_model, shape):
    fm, _ = ref_model
    be = backend(bundle_dir, shape)
    n_prompts = 10
    cfg = SamplingConfig(max_new_tokens=10, ignore_eos=True)
    kinds = set()
    for kind, masks in _masks(fm, n_prompts):
        for i, mask in enumerate(masks):
            ids = rand_ids(4 + 3 * i, 100 + i)
            ref = generate(TorchBackend(fm, MAX_CTX), ids, cfg, mask=mask, pinned=fm.pinned, keep_logits=True,
                           default_threshold=fm.threshold)
            got = generate(be, ids, cfg, mask=mask, pinned=fm.pinned, keep_logits=True,
                           default_threshold=fm.threshold)
            assert np.array_equal(got.mask, ref.mask), (kind, i)
            np.testing.assert_allclose(got.scores, ref.scores, atol=1e-5)
            assert got.tokens == ref.tokens, (kind, i)
            a = np.stack([ref.first_logits] + ref.step_logits)
            b = np.stack([got.first_logits] + got.step_logits)
            assert np.abs(a - b).max() < 1e-3, (kind, i, float(np.abs(a - b).max()))
            kinds.add((kind, int(got.mask.sum())))
    # the router masks really mixed kept and skipped layers
    assert any(k == "router" and n < fm.n_layers for k, n in kinds)


def test_prefill_outputs_match_reference(bundle_dir, ref_model):
    import onnxruntime as ort

    from runtime.ort_backend import session_options

    fm, _ = ref_model
    s = ort.InferenceSession(str(Path(bundle_dir) / "prefill.onnx"), session_options(2),
                             providers=["CPUExecutionProvider"])
    ids = np.array([rand_ids(9, 5)], np.int64)
    for thr in (0.2, 0.5, 0.8):
        outs = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"input_ids": ids,
                                                                       "threshold": np.array([thr], np.float32)})))
        with torch.inference_mode():
            logits, g, mask, ks, vs = fm.prefill(torch.from_numpy(ids), thr)
        np.testing.assert_allclose(outs["logits"], logits.numpy(), atol=1e-4)
        np.testing.assert_allclose(outs["router_scores"], g.numpy(), atol=1e-5)
        assert np.array_equal(outs["layer_mask"], mask.numpy())
        for l in range(fm.n_layers):
            assert outs[f"present.{l}.key"].shape == (1, fm.n_kv_heads, 9, fm.head_dim)
            np.testing.assert_allclose(outs[f"present.{l}.key"], ks[l].numpy(), atol=1e-4)
            np.testing.assert_allclose(outs[f"present.{l}.value"], vs[l].numpy(), atol=1e-4)


POOL_START = 5


@pytest.fixture(scope="session")
def pool_bundle(tiny_dir, tmp_path_factory):
    """Routers that pool from position POOL_START (the chat prefix left out): (bundle folder, reference)."""
    from export.build import build
    from export.model import build_first_model

    fm, _ = build_first_model(str(tiny_dir), verbose=False)
    randomize_routers(fm, seed=3)
    fm.pool_start = POOL_START
    run = tmp_path_factory.mktemp("run_pool")
    fm.save_routers(run)
    out = build("rpi", tmp_path_factory.mktemp("bundles") / "pool", model=str(tiny_dir), run=str(run),
                max_context=MAX_CTX, verbose=False, decode_shape="fused")
    return out, build_first_model(str(tiny_dir), str(run), verbose=False)[0]


def test_pool_start_parity_with_reference(pool_bundle):
    """Scores pooled over [min(P, T-1), T) in the graph: equal to the reference (not the plain prompt mean),
    prompts shorter than, equal to and longer than P; masks and greedy tokens identical."""
    import onnxruntime as ort

    from runtime.ort_backend import session_options

    out, fm = pool_bundle
    assert fm.pool_start == POOL_START and Bundle(out).pool_start == POOL_START
    assert Bundle(out).manifest["routing"]["pool_start"] == POOL_START
    s = ort.InferenceSession(str(Path(out) / "prefill.onnx"), session_options(2), providers=["CPUExecutionProvider"])
    be = backend(out, "fused")
    cfg = SamplingConfig(max_new_tokens=6, ignore_eos=True)
    n_mixed = 0
    for T in (1, 3, POOL_START, POOL_START + 1, 9, 17):
        ids = rand_ids(T, 300 + T)
        res = s.run(["router_scores", "layer_mask"], {"input_ids": np.array([ids], np.int64),
                                                      "threshold": np.array([fm.threshold], np.float32)})
        with torch.inference_mode():
            _, g, mask, _, _ = fm.prefill(torch.tensor([ids]))
            fm.pool_start = 0
            g_all = fm.prefill(torch.tensor([ids]))[1]
            fm.pool_start = POOL_START
        np.testing.assert_allclose(res[0], g.numpy(), atol=1e-5)
        assert np.array_equal(res[1], mask.numpy()), T
        if T > 1:
            assert np.abs(res[0] - g_all.numpy()).max() > 1e-3, T  # not the plain mean over the prompt
        ref = generate(TorchBackend(fm, MAX_CTX), ids, cfg, pinned=fm.pinned, keep_logits=True,
                       default_threshold=fm.threshold)
        got = generate(be, ids, cfg, pinned=fm.pinned, keep_logits=True, default_threshold=fm.threshold)
        assert np.array_equal(got.mask, ref.mask) and got.tokens == ref.tokens, T
        np.testing.assert_allclose(got.scores, ref.scores, atol=1e-5)
        n_mixed += not got.mask.all()
    assert n_mixed >= 2  # the routers' masks really skip layers


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures_export_and_validate(arch, tmp_path):
    from export.onnx_export import build_graphs

    fm = randomize_routers(tiny_first(arch, layers=4))
    g = build_graphs(fm, tmp_path, max_context=32, verbose=False, decode_shape="both")  # validates vs PyTorch
    assert "decode.onnx" in g["files"] and "layer_3.onnx" in g["files"]


def test_decode_graphs_tied_head_and_constant_total(tmp_path):
    """Decode-speed structure (issue 15, deliverable 1), on a model with tied embeddings (as SmolLM2): the decode
    graphs' LM head is MatMul over a Transpose of the one stored embedding (ONNX Runtime folds and pre-packs it),
    prefill and extend keep Gemm(transB) on it; GroupQueryAttention's total_sequence_length in decode is one
    constant shared by every layer (no per-layer Add/Squeeze). build_graphs validates both decode shapes against
    PyTorch (all-ones and mixed masks, extend)."""
    import onnx

    from export.onnx_export import _graphs, build_graphs

    fm = randomize_routers(tiny_first("llama", layers=3, tie_word_embeddings=True))
    assert fm.hf.lm_head.weight.data_ptr() == fm.base.embed_tokens.weight.data_ptr()
    build_graphs(fm, tmp_path, max_context=32, verbose=False, decode_shape="both")
    idx = json.loads((tmp_path / "weights.json").read_text())
    assert "lm_head.weight" not in idx["tensors"]  # one copy: the embedding

    def nodes(f):
        return [n for g in _graphs(onnx.load(str(tmp_path / f), load_external_data=False).graph) for n in g.node]

    for f in ("decode.onnx", "head.onnx"):
        ns = nodes(f)
        head = next(n for n in ns if n.name == "lm_head")
        tr = next(n for n in ns if n.output[0] == head.input[1])
        assert head.op_type == "MatMul" and tr.op_type == "Transpose" and tr.input[0] == "embed_tokens.weight", f
    for f in ("prefill.onnx", "extend.onnx"):
        head = next(n for n in nodes(f) if n.name == "lm_head")
        assert head.op_type == "Gemm" and head.input[1] == "embed_tokens.weight", f
    for f in ("decode.onnx", "layer_1.onnx"):
        ns = nodes(f)
        gqa = [n for n in ns if n.op_type == "GroupQueryAttention"]
        assert gqa and all(n.input[6] == "decode.total_len" for n in gqa), f
        assert not [n for n in ns if n.op_type == "Squeeze"], f

def test_validation_catches_a_wrong_graph(tmp_path, monkeypatch):
    """The export validation can fail: a graph with a wrong norm epsilon is refused."""
    import export.onnx_export as oe

    fm = tiny_first("llama", layers=2)
    orig = oe.Weights.__init__

    def broken(self, *a, **k):
        orig(self, *a, **k)
        self.layers[1]["ln2"] = self.layers[1]["ln2"] * 1.5

    monkeypatch.setattr(oe.Weights, "__init__", broken)
    with pytest.raises(FirstEdgeError, match="validation failed"):
        oe.build_graphs(fm, tmp_path, max_context=32, verbose=False, decode_shape="fused")


# ---------------------------------------------------------------- in-place KV, real skipping
@pytest.mark.parametrize("shape", SHAPES)
def test_kv_buffers_written_in_place_only_for_kept_layers(bundle_dir, shape):
    be = backend(bundle_dir, shape)
    L = be.n_layers
    bufs = [(k.ctypes.data, v.ctypes.data) for k, v in zip(be.k, be.v)]
    ids = rand_ids(7, 1)
    mask = np.array([l % 3 != 1 for l in range(L)])
    res = generate(be, ids, SamplingConfig(max_new_tokens=6, ignore_eos=True), mask=mask)
    steps = len(res.tokens) - 1
    assert [(k.ctypes.data, v.ctypes.data) for k, v in zip(be.k, be.v)] == bufs  # never reallocated
    for l in range(L):
        assert be.k[l].shape == (1, be.n_kv, MAX_CTX, be.head_dim)
        assert be.lengths[l] == len(ids) + (steps if mask[l] else 0)
        written = np.abs(be.k[l][0, :, len(ids):len(ids) + steps]).sum()
        assert (written > 0) == bool(mask[l]), l
        assert np.abs(be.v[l][0, :, be.lengths[l]:]).sum() == 0  # nothing beyond the layer's length


def _profiled_nodes(files):
    names = []
    for f in files:
        for ev in json.load(open(f)):
            if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
                names.append(ev["name"][:-len("_kernel_time")])
    return names


@pytest.mark.parametrize("shape", SHAPES)
def test_profiler_shows_skipped_layers_did_not_run(bundle_dir, shape, tmp_path):
    be = backend(bundle_dir, shape, profile=str(tmp_path))
    mask = np.array([True, False, True, False, False, True])
    generate(be, rand_ids(6, 2), SamplingConfig(max_new_tokens=4, ignore_eos=True), mask=mask)
    files = be.end_profiling()
    nodes = _profiled_nodes(files)
    for l in range(len(mask)):
        ran = [n for n in nodes if n.startswith(f"layers.{l}.") and ".attn.gqa" in n]
        if mask[l]:
            assert len(ran) == 3, (l, ran)  # 3 decode steps (the first token comes from prefill)
        else:
            assert not ran, (l, ran)
    assert any("lm_head" in n for n in nodes)


# ---------------------------------------------------------------- quantized builds
@pytest.mark.parametrize("quant,bits", [("int8", 8), ("int4", 4)])
def test_quantized_bundle_uses_matmulnbits_and_runs(tiny_dir, run_dir, ref_model, tmp_path, quant, bits):
    import onnx

    from export.build import build

    out = build("rpi", tmp_path / quant, model=str(tiny_dir), run=str(run_dir), quantize=quant,
                max_context=MAX_CTX, verbose=False)  # validated against the fp32 graphs while building
    m = onnx.load(str(out / "layer_0.onnx" if (out / "layer_0.onnx").exists() else out / "prefill.onnx"),
                  load_external_data=False)
    ops = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert ops and all(a.i == bits for n in ops for a in n.attribute if a.name == "bits")
    b = Bundle(out)
    assert b.manifest["quantization"] == quant
    fm, _ = ref_model
    be = backend(out, None)
    ids = rand_ids(8, 4)
    got = generate(be, ids, SamplingConfig(max_new_tokens=8, ignore_eos=True), mask=np.ones(fm.n_layers, bool),
                   keep_logits=True)
    ref = generate(TorchBackend(fm, MAX_CTX), ids, SamplingConfig(max_new_tokens=1), mask=np.ones(fm.n_layers, bool),
                   keep_logits=True)
    a, c = ref.first_logits, got.first_logits
    cos = float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    assert cos > (0.999 if bits == 8 else 0.85), cos
    assert len(got.tokens) == 8


# ---------------------------------------------------------------- bad bundles
def _copy(bundle_dir, tmp_path) -> Path:
    d = tmp_path / "b"
    shutil.copytree(bundle_dir, d)
    return d


def _edit_manifest(d: Path, fn):
    mf = d / "manifest.json"
    m = json.loads(mf.read_text())
    fn(m)
    mf.write_text(json.dumps(m))


def _load(d):
    from runtime.backends import load_backend

    return load_backend(Bundle(d))


def test_bad_bundle_missing_file(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path)
    (d / "weights.data").unlink()
    with pytest.raises(FirstEdgeError, match="bundle file missing: weights.data") as e:
        _load(d)
    assert "\n" not in str(e.value)


def test_bad_bundle_hash_mismatch(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path)
    f = d / "weights.data"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(FirstEdgeError, match="weights.data does not match its sha256") as e:
        _load(d)
    assert "\n" not in str(e.value)


def test_bad_bundle_unknown_version(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path)
    _edit_manifest(d, lambda m: m.update(format_version=99))
    with pytest.raises(FirstEdgeError, match="unknown bundle format version 99"):
        _load(d)


@pytest.mark.parametrize("key,value,match", [
    ("vocab_size", VOCAB + 1, "logits"),
    ("head_dim", 8, "head_dim"),
    ("max_context", 128, "max_context"),
    ("n_layers", 5, "n_layers"),
])
def test_bad_bundle_dims_not_matching_graph(bundle_dir, tmp_path, key, value, match):
    d = _copy(bundle_dir, tmp_path)
    _edit_manifest(d, lambda m: m["model"].update({key: value}))
    with pytest.raises(FirstEdgeError, match=f"bundle dims do not match the graphs.*{match}"):
        _load(d)


@pytest.mark.parametrize("value", [-1, 2.5, "3", True])
def test_bad_bundle_pool_start(bundle_dir, tmp_path, value):
    d = _copy(bundle_dir, tmp_path)
    assert Bundle(d).pool_start == 0
    _edit_manifest(d, lambda m: m["routing"].update(pool_start=value))
    with pytest.raises(FirstEdgeError, match="manifest routing.pool_start must be a non-negative integer") as e:
        _load(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value,match", [([99], "pinned layer 99 is out of range"), (["x"], "list of layer indices"),
                                         (3, "list of layer indices"), ([True], "list of layer indices")])
def test_bad_bundle_pinned(bundle_dir, tmp_path, value, match):
    d = _copy(bundle_dir, tmp_path)
    _edit_manifest(d, lambda m: m["routing"].update(pinned=value))
    with pytest.raises(FirstEdgeError, match=f"manifest routing.pinned.*{match}") as e:
        _load(d)
    assert "\n" not in str(e.value)


def _rename_entry(m, old, new):
    m["files"][new] = m["files"].pop(old)


@pytest.mark.parametrize("case,match", [
    ("dotdot", "manifest names a file outside the bundle: '../tokenizer.json'"),
    ("absolute", "manifest names a file outside the bundle: '/etc/passwd'"),
    ("backslash", "manifest names a file outside the bundle"),
    ("symlink_listed", "bundle file tokenizer.json leaves the bundle folder"),
    ("symlink_unlisted", "bundle folder holds a link that leaves it: extra.data"),
    ("graph_not_listed", "manifest does not list the required file ../decode.onnx"),
    ("external_data_not_listed", "graph decode.onnx reads external data 'weights.data' that the manifest does not list"),
    ("entry_malformed", "manifest entry of report.md must be"),
])
def test_bad_bundle_file_access_is_confined(bundle_dir, tmp_path, case, match):
    """Every path a manifest names resolves inside the bundle folder, else it is refused before it is read."""
    d = _copy(bundle_dir, tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    if case == "dotdot":
        _edit_manifest(d, lambda m: _rename_entry(m, "tokenizer.json", "../tokenizer.json"))
    elif case == "absolute":
        _edit_manifest(d, lambda m: _rename_entry(m, "tokenizer.json", "/etc/passwd"))
    elif case == "backslash":
        _edit_manifest(d, lambda m: _rename_entry(m, "report.md", "..\\report.md"))
    elif case == "symlink_listed":
        (d / "tokenizer.json").unlink()
        (d / "tokenizer.json").symlink_to(outside)
    elif case == "symlink_unlisted":
        (d / "extra.data").symlink_to(outside)
    elif case == "graph_not_listed":
        _edit_manifest(d, lambda m: m["graphs"].update(decode="../decode.onnx"))
    elif case == "external_data_not_listed":
        _edit_manifest(d, lambda m: (m["files"].pop("weights.data"), m["graphs"]["files"].remove("weights.data")))
    elif case == "entry_malformed":
        _edit_manifest(d, lambda m: m["files"].update({"report.md": "0" * 64}))
    with pytest.raises(FirstEdgeError, match=re.escape(match) if "'" in match else match) as e:
        Bundle(d)
    assert "\n" not in str(e.value)


def test_onnx_external_locations_reads_every_graph(bundle_dir):
    from runtime.bundle import onnx_external_locations

    for f in ("prefill.onnx", "extend.onnx", "decode.onnx", "layer_2.onnx", "head.onnx"):
        assert onnx_external_locations(Path(bundle_dir) / f) == {"weights.data"}, f


# ---------------------------------------------------------------- one copy of the weights (issue 15)
def _ext(t):
    return {e.key: e.value for e in t.external_data}


def test_bundle_stores_each_weight_once(bundle_dir):
    """Every graph's external initializers point into the one weights.data; a name shared by several graphs is
    one region of the file (same offset), and the index agrees with the graphs."""
    import onnx

    from export.onnx_export import _graphs

    d = Path(bundle_dir)
    idx = json.loads((d / "weights.json").read_text())
    assert idx["data"] == "weights.data" and "weights.json" in Bundle(d).manifest["graphs"]["files"]
    seen = {}
    for f in ["prefill.onnx", "extend.onnx", "decode.onnx", "embed.onnx", "head.onnx"] + [f"layer_{l}.onnx" for l in range(6)]:
        m = onnx.load(str(d / f), load_external_data=False)
        names = set()
        for g in _graphs(m.graph):
            for t in g.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    e = _ext(t)
                    assert e["location"] == "weights.data"
                    region = (int(e["offset"]), int(e["length"]))
                    assert seen.setdefault(t.name, region) == region, t.name
                    assert (idx["tensors"][t.name]["offset"], idx["tensors"][t.name]["length"]) == region
                    names.add(t.name)
        assert names == set(idx["graphs"][f]), f
    # the graphs share names: the layer weights are in prefill, extend, decode and layer_l alike
    for f in ("prefill.onnx", "extend.onnx", "decode.onnx", "layer_0.onnx"):
        assert "layers.0.attn.qkv_proj.weight" in idx["graphs"][f]
    regions = sorted(seen.values())
    assert all(a[0] + a[1] <= b[0] for a, b in zip(regions, regions[1:]))  # no tensor stored twice or overlapping
    assert (d / "weights.data").stat().st_size == regions[-1][0] + regions[-1][1]
    assert all(off % idx["alignment"] == 0 for off, _ in regions)


@pytest.mark.parametrize("prepack", ["none", "decode", "all"])
def test_sessions_share_one_weights_buffer(bundle_dir, ref_model, prepack):
    """Prefill, extend and decode sessions read the same OrtValues over one memory map of weights.data (whichever
    sessions pre-pack), and the results are still the reference's."""
    from runtime.ort_backend import OrtBackend

    be = OrtBackend(Bundle(bundle_dir), threads=2, decode_shape="fused", prepack=prepack)
    be.load_extend()
    sw = be.shared
    idx = json.loads((Path(bundle_dir) / "weights.json").read_text())
    assert set(sw.values) == {n for g in ("prefill.onnx", "extend.onnx", "decode.onnx") for n in idx["graphs"][g]}
    assert len(sw.values) == len({id(v) for v in sw.values.values()})  # one OrtValue per tensor, for every session
    base = sw.map.ctypes.data
    for n, v in sw.values.items():  # each OrtValue is a view of the one mapping (no copy)
        assert v.data_ptr() == base + sw.tensors[n]["offset"], n
    fm, _ = ref_model
    ids = rand_ids(9, 1)
    cfg = SamplingConfig(max_new_tokens=5, ignore_eos=True)
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    ref = generate(TorchBackend(fm, MAX_CTX), ids, cfg, mask=mask, keep_logits=True)
    got = generate(be, ids, cfg, mask=mask, keep_logits=True)
    assert got.tokens == ref.tokens
    assert np.abs(np.stack(got.step_logits) - np.stack(ref.step_logits)).max() < 1e-3
    from export.onnx_export import check_extend

    assert check_extend(TorchBackend(fm, MAX_CTX), be, np.array(ids), mask, 3, np.random.default_rng(0), VOCAB) < 1e-2
    be.close()


def test_bad_prepack_option(bundle_dir):
    with pytest.raises(FirstEdgeError, match="prepack must be one of all, decode, none"):
        backend(bundle_dir, "fused", prepack="some")
    with pytest.raises(FirstEdgeError, match="prepack_cache=DIR needs prepack=disk"):
        backend(bundle_dir, "fused", prepack_cache="x")


# ---------------------------------------------------------------- pre-packed weights mapped from a cache (prepack=disk)
def _run(be, seed=3):
    """Greedy tokens and every step's logits of one generation and one chat extend (mixed mask)."""
    ids = rand_ids(9, seed)
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    r = generate(be, ids, SamplingConfig(max_new_tokens=5, ignore_eos=True), mask=mask, keep_logits=True)
    logits, probs = be.extend(np.array(rand_ids(4, seed + 1)), int(be.lengths.min()))
    return r.tokens, np.stack(r.step_logits), logits.copy(), probs.copy()


def _same(a, b):
    assert a[0] == b[0]
    for x, y in zip(a[1:], b[1:]):
        assert np.array_equal(x, y)


def _caches(root: Path):
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def int4_bundle(tiny_dir, run_dir, tmp_path_factory):
    from export.build import build

    return build("rpi", tmp_path_factory.mktemp("int4") / "b", model=str(tiny_dir), run=str(run_dir),
                 quantize="int4", max_context=MAX_CTX, verbose=False)


@pytest.mark.parametrize("kind,shape", [("fp32", "fused"), ("fp32", "split"), ("int4", None)])
def test_prepack_disk_matches_and_reuses_its_cache(bundle_dir, int4_bundle, tmp_path, kind, shape, recwarn):
    """prepack=disk: the first load writes each packing session's graph with its pre-packed weights (fp32: the
    decode graph(s); int4: every graph), later loads map them from there; outputs are bit-identical to the default
    sessions, and loading does not write again."""
    d = bundle_dir if kind == "fp32" else int4_bundle
    root = tmp_path / "cache"
    ref = backend(d, shape)
    want = _run(ref)
    ref.close()
    first = backend(d, shape, prepack="disk", prepack_cache=str(root))
    assert first._pages == []  # made now: this load packed on the heap
    _same(_run(first), want)
    first.close()
    made = _caches(root)
    graphs = {p.split(".")[1] for p in made}
    if kind == "int4":
        assert graphs == {"prefill", "extend", "decode"}
    elif shape == "fused":
        assert graphs == {"decode"}
    else:
        assert graphs == {"embed", "head"} | {f"layer_{l}" for l in range(6)}
    for p in made:
        meta = json.loads((root / p / "meta.json").read_text())
        assert set(meta["files"]) == {f"{meta['graph']}", f"{meta['graph']}.data"}
    stamp = {f: f.stat().st_mtime_ns for f in root.rglob("*")}
    again = backend(d, shape, prepack="disk", prepack_cache=str(root))
    assert len(again._pages) == (len(made) - (1 if kind == "int4" else 0))  # extend: loaded by _run below
    assert all(p.ranges for p in again._pages)  # the packed weights are file pages of the cache (dropped after load)
    _same(_run(again), want)
    assert len(again._pages) == len(made)
    again.close()
    assert {f: f.stat().st_mtime_ns for f in root.rglob("*")} == stamp and _caches(root) == made
    assert not [w for w in recwarn.list if "prepack" in str(w.message)]


@pytest.mark.parametrize("damage", ["truncated", "altered", "meta", "graph"])
def test_prepack_disk_damaged_cache_is_rebuilt(bundle_dir, tmp_path, damage):
    """A cache is untrusted input: a truncated or altered file (or one whose meta.json was rewritten to match a broken
    graph) gives one warning line, is rebuilt, and the outputs stay the default sessions'."""
    from runtime.bundle import sha256_file

    root = tmp_path / "cache"
    want = _run(backend(bundle_dir, "fused"))
    backend(bundle_dir, "fused", prepack="disk", prepack_cache=str(root)).close()
    (c,) = [root / p for p in _caches(root)]
    data, graph, meta = c / "decode.onnx.data", c / "decode.onnx", c / "meta.json"
    if damage == "truncated":
        data.write_bytes(data.read_bytes()[:-100])
        match = "decode.onnx.data has .* bytes, not .* \\(truncated\\?\\)"
    elif damage == "altered":
        b = bytearray(data.read_bytes())
        b[len(b) // 2] ^= 0xFF
        data.write_bytes(bytes(b))
        match = "decode.onnx.data does not match its sha256"
    elif damage == "meta":
        meta.write_text("{")
        match = "meta.json is unreadable"
    else:
        graph.write_bytes(b"not a graph")
        m = json.loads(meta.read_text())
        m["files"]["decode.onnx"] = {"bytes": graph.stat().st_size, "sha256": sha256_file(graph)}
        meta.write_text(json.dumps(m))
        match = "onnxruntime cannot load it"
    with pytest.warns(UserWarning, match="prepack=disk: rebuilding the pre-packed cache .*" + match) as w:
        be = backend(bundle_dir, "fused", prepack="disk", prepack_cache=str(root))
    assert [str(x.message).count("\n") for x in w.list if "prepack" in str(x.message)] == [0]
    _same(_run(be), want)
    be.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        be = backend(bundle_dir, "fused", prepack="disk", prepack_cache=str(root))  # the rebuilt cache is used
    assert len(be._pages) == 1
    _same(_run(be), want)
    be.close()


def test_prepack_disk_unwritable_cache_falls_back(bundle_dir, tmp_path):
    """An unwritable cache folder: one warning line for the backend (here 8 packing split graphs), packing in memory."""
    (tmp_path / "file").write_text("x")
    want = _run(backend(bundle_dir, "split"))
    with pytest.warns(UserWarning, match="prepack=disk: cannot write the pre-packed cache in .*; packing in memory") \
            as w:
        be = backend(bundle_dir, "split", prepack="disk", prepack_cache=str(tmp_path / "file" / "cache"))
    assert len([x for x in w.list if "prepack" in str(x.message)]) == 1 and be._pages == []
    _same(_run(be), want)
    be.close()


def test_prepack_disk_cache_follows_the_bundle(bundle_dir, tmp_path):
    """A changed bundle (a weight altered and the manifest re-hashed) gets its own cache and its own outputs."""
    root = tmp_path / "cache"
    d = _copy(bundle_dir, tmp_path)
    backend(d, "fused", prepack="disk", prepack_cache=str(root)).close()
    before = _caches(root)
    idx = json.loads((d / "weights.json").read_text())
    t = idx["tensors"]["layers.1.attn.qkv_proj.weight"]
    w = np.memmap(d / "weights.data", dtype=np.float32, mode="r+", offset=t["offset"], shape=(t["length"] // 4,))
    w[:] *= 1.5
    w.flush()
    del w
    _edit_manifest(d, lambda m: m["files"].update({"weights.data": {"sha256": sha256_file(d / "weights.data"),
                                                                    "bytes": (d / "weights.data").stat().st_size}}))
    want = _run(backend(d, "fused"))
    be = backend(d, "fused", prepack="disk", prepack_cache=str(root))
    assert len(_caches(root)) == 2 and set(before) < set(_caches(root)) and be._pages == []
    got = _run(be)
    _same(got, want)
    be.close()
    be = backend(d, "fused", prepack="disk", prepack_cache=str(root))
    assert len(be._pages) == 1
    _same(_run(be), want)
    be.close()


@pytest.mark.parametrize("case,match", [
    ("truncated", r"weights.data has \d+ bytes, the manifest says \d+ \(truncated or modified\)"),
    ("truncated_rehashed", "shared weights file weights.data is .* too short for tensor"),
    ("index_missing", "bundle file missing: weights.json"),
    ("index_malformed", "shared weights index weights.json is malformed"),
    ("index_bad_entry", "shared weights index weights.json: bad entry for tensor"),
    ("index_outside", "manifest does not list the required file ../weights.json"),
    ("index_not_listed", "manifest does not list the required file weights.json"),
    ("data_not_listed", "the shared weights file 'other.data' is not a file the manifest lists"),
])
def test_bad_shared_weights_are_refused(bundle_dir, tmp_path, case, match):
    d = _copy(bundle_dir, tmp_path)
    f, ix = d / "weights.data", d / "weights.json"

    def rehash(m, name):
        m["files"][name] = {"sha256": sha256_file(d / name), "bytes": (d / name).stat().st_size}

    if case.startswith("truncated"):
        f.write_bytes(f.read_bytes()[:-4096])
        if case == "truncated_rehashed":
            _edit_manifest(d, lambda m: rehash(m, "weights.data"))
    elif case == "index_missing":
        ix.unlink()
    elif case in ("index_malformed", "index_bad_entry"):
        if case == "index_malformed":
            ix.write_text("{\"data\": 1")
        else:
            j = json.loads(ix.read_text())
            t = next(iter(j["tensors"].values()))
            t["length"] += 4
            ix.write_text(json.dumps(j))
        _edit_manifest(d, lambda m: rehash(m, "weights.json"))
    elif case == "index_outside":
        _edit_manifest(d, lambda m: m["graphs"].update(weights_index="../weights.json"))
    elif case == "index_not_listed":
        _edit_manifest(d, lambda m: (m["files"].pop("weights.json"), m["graphs"]["files"].remove("weights.json")))
    elif case == "data_not_listed":  # the index names another (unlisted) data file; the graphs do not read it
        (d / "other.data").write_bytes(f.read_bytes())
        j = json.loads(ix.read_text())
        j["data"] = "other.data"
        ix.write_text(json.dumps(j))
        _edit_manifest(d, lambda m: rehash(m, "weights.json"))
    with pytest.raises(FirstEdgeError, match=match) as e:
        _load(d)
    assert "\n" not in str(e.value)


def test_bad_bundle_truncated_onnx(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path)
    f = d / "decode.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(FirstEdgeError, match=r"decode.onnx has \d+ bytes, the manifest says \d+ \(truncated or modified\)"):
        _load(d)
    # even with a manifest that agrees with the truncated file, loading fails with a clear message
    _edit_manifest(d, lambda m: m["files"].update({"decode.onnx": {"sha256": sha256_file(f), "bytes": f.stat().st_size}}))
    with pytest.raises(FirstEdgeError, match="cannot load graph decode.onnx"):
        _load(d)


def test_prompt_too_long_and_wrong_mask_length(bundle_dir):
    be = backend(bundle_dir, "fused")
    with pytest.raises(FirstEdgeError, match="longer than the context of 64"):
        generate(be, rand_ids(70, 0), SamplingConfig(max_new_tokens=2))
    with pytest.raises(FirstEdgeError, match="prompt has 64 tokens"):
        be.prefill(np.array(rand_ids(64, 0)), 0.5)
    be.prefill(np.array(rand_ids(5, 0)), 0.5)
    with pytest.raises(FirstEdgeError, match="layer mask has length 5, the model has 6 layers"):
        be.decode(3, 5, np.ones(5, bool))


def test_missing_decode_shape_is_refused(tiny_dir, tmp_path):
    from export.build import build

    out = build("rpi", tmp_path / "f", model=str(tiny_dir), max_context=32, verbose=False, decode_shape="fused",
                validate_graphs=False)
    assert not (out / "layer_0.onnx").exists()
    with pytest.raises(FirstEdgeError, match="no split decode graphs"):
        backend(out, "split")


# ---------------------------------------------------------------- CLI
def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "runtime"] + args, capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=120, **kw)


def test_cli_runs_bundle_and_reports_errors(bundle_dir):
    p = _cli(["--bundle", str(bundle_dir), "--prompt", "w5 w6 w7", "--max-new-tokens", "5", "--ignore-eos", "--json"])
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    assert stats["new_tokens"] == 5 and stats["runtime"] == "onnxruntime" and "prefill_ms" in stats
    p = _cli(["--bundle", str(bundle_dir), "--prompt", "w5", "--mask", "101", "--max-new-tokens", "2"])
    assert p.returncode == 2 and "layer mask has length 3, the model has 6 layers" in p.stderr
    p = _cli(["--bundle", str(bundle_dir), "--prompt", " ".join(["w9"] * 80), "--max-new-tokens", "2"])
    assert p.returncode == 2 and "longer than the context of 64 tokens" in p.stderr
    p = _cli(["--bundle", str(bundle_dir), "--prompt", "w5", "--backend-opt", "decode_shape=split", "--keep", "3",
              "--max-new-tokens", "3", "--stream"])
    assert p.returncode == 0 and "layers kept 3/6" in p.stderr, p.stderr


def test_blockwise_quantizers_round_trip():
    from export.onnx_export import BLOCK_SIZE, quantize_blockwise

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 96)).astype(np.float32)
    for bits in (4, 8):
        q, s = quantize_blockwise(w, bits)
        vals = q.reshape(8, 3, -1)
        if bits == 4:
            vals = np.stack([vals & 15, vals >> 4], -1).reshape(8, 3, BLOCK_SIZE)
        deq = (vals.astype(np.float32) - 2 ** (bits - 1)) * s[..., None]
        assert np.abs(deq.reshape(8, 96) - w).max() <= s.max() / 2 + 1e-6
