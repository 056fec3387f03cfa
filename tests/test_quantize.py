"""4-bit weights from ONNX Runtime's quantizer (export/quantize_onnx.py; issue 15, deliverable 3): rtn / hqq / gptq
bundles load and generate with one shared weights.data, the quantized weights are close to the fp32 ones (checked
through ONNX Runtime's own MatMulNBits), hqq and gptq differ from rtn, gptq lowers the output error it minimises,
and bad options are one-line errors."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle import Bundle
from runtime.errors import FirstEdgeError
from runtime.loop import SamplingConfig, generate

ROOT = Path(__file__).resolve().parents[1]
MAX_CTX = 64


# ---------------------------------------------------------------- one weight matrix
def _matmulnbits(qw, K: int, N: int, bits: int, x: np.ndarray) -> np.ndarray:
    """x [M, K] through a one-node MatMulNBits graph holding ``qw`` (ONNX Runtime's reading of the layout)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(qw.packed, "B"), numpy_helper.from_array(qw.scales, "S")]
    ins = ["x", "B", "S"]
    if qw.zero_points is not None:
        inits.append(numpy_helper.from_array(qw.zero_points, "Z"))
        ins.append("Z")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=32)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    from runtime.ort_backend import session_options  # the process may already run ORT on the global pool

    return ort.InferenceSession(m.SerializeToString(), session_options(2),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _weight_and_hessian(N=48, K=80, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(N, K)) * 0.05).astype(np.float32)
    # correlated inputs with a few large channels, like a transformer's
    X = rng.normal(size=(512, K)) @ (np.eye(K) + 0.3 * rng.normal(size=(K, K)))
    X[:, :3] *= 8
    return w, 2.0 / len(X) * X.T @ X, X.astype(np.float32)


@pytest.mark.parametrize("algo,bits", [("rtn", 4), ("rtn", 8), ("hqq", 4), ("gptq", 4)])
def test_quantized_weight_close_to_fp32_through_onnxruntime(algo, bits):
    from export.quantize_onnx import quantize_gptq, quantize_hqq, quantize_rtn

    w, H, X = _weight_and_hessian()
    N, K = w.shape  # K = 80: the last block is padded
    qw = {"rtn": lambda: quantize_rtn(w, bits), "hqq": lambda: quantize_hqq(w, bits),
          "gptq": lambda: quantize_gptq(w, H, bits)}[algo]()
    assert qw.packed.dtype == np.uint8 and qw.packed.shape == (N, 3, 32 * bits // 8)
    assert qw.scales.shape == (N, 3) and (qw.zero_points is None) == (algo != "hqq")
    deq = qw.dequantize(K, bits)
    rel = np.linalg.norm(deq - w) / np.linalg.norm(w)
    # 4-bit RTN of a normal weight: ~0.1; GPTQ trades weight error for output error; garbage is ~1
    assert rel < {4: 0.25 if algo == "gptq" else 0.13, 8: 0.01}[bits], rel
    # ONNX Runtime's MatMulNBits computes with exactly this dequantized weight
    y = _matmulnbits(qw, K, N, bits, X[:16])
    np.testing.assert_allclose(y, X[:16] @ deq.T, rtol=1e-4, atol=1e-4)
    assert np.abs(y - X[:16] @ w.T).max() < 0.3 * np.abs(X[:16] @ w.T).max()


def test_gptq_lowers_output_error_and_hqq_gptq_differ_from_rtn():
    from export.quantize_onnx import quantize_gptq, quantize_hqq, quantize_rtn

    w, H, _ = _weight_and_hessian(seed=1)
    K = w.shape[1]
    deq = {a: f().dequantize(K, 4) for a, f in (("rtn", lambda: quantize_rtn(w, 4)), ("hqq", lambda: quantize_hqq(w, 4)),
                                                 ("gptq", lambda: quantize_gptq(w, H, 4)))}

    def out_err(d):  # the layer's output error over the calibration inputs, relative
        e = d - w
        return float(np.einsum("nk,kj,nj->", e, H, e) / np.einsum("nk,kj,nj->", w, H, w))

    assert not np.array_equal(deq["hqq"], deq["rtn"]) and not np.array_equal(deq["gptq"], deq["rtn"])
    assert out_err(deq["gptq"]) < 0.7 * out_err(deq["rtn"]), (out_err(deq["gptq"]), out_err(deq["rtn"]))
    # with a diagonal Hessian there is nothing to compensate: GPTQ is the rtn kernel's grid, rounded to nearest
    g = quantize_gptq(w, np.eye(K), 4).dequantize(K, 4)
    np.testing.assert_allclose(g, deq["rtn"], atol=1e-6)


# ---------------------------------------------------------------- bundles
@pytest.fixture(scope="module")
def calib_data(data_dir, tmp_path_factory):
    from helpers import tiny_vocab_data

    return tiny_vocab_data(data_dir, tmp_path_factory.mktemp("calib"), tasks=("arithmetic", "translate", "qa"), n=3)


@pytest.fixture(scope="module")
def bundles(tiny_dir, run_dir, calib_data, tmp_path_factory):
    from export.build import build

    root = tmp_path_factory.mktemp("qbundles")
    out = {}
    for quant, algo in (("int4", "rtn"), ("int4", "hqq"), ("int4", "gptq"), ("int8", "rtn")):
        out[quant, algo] = build("rpi", root / f"{quant}-{algo}", model=str(tiny_dir), run=str(run_dir), quantize=quant,
                                 max_context=MAX_CTX, verbose=False, decode_shape="both", quant_algo=algo,
                                 data=str(calib_data) if algo == "gptq" else None)
    return out


def _tensors(bundle: Path):
    idx = json.loads((bundle / "weights.json").read_text())
    raw = (bundle / idx["data"]).read_bytes()
    return idx, {n: raw[e["offset"]:e["offset"] + e["length"]] for n, e in idx["tensors"].items()}


@pytest.mark.parametrize("key", [("int4", "rtn"), ("int4", "hqq"), ("int4", "gptq"), ("int8", "rtn")])
def test_bundle_loads_generates_and_shares_weights_once(bundles, ref_model, key):
    import onnx

    from export.reference import TorchBackend
    from runtime.ort_backend import OrtBackend

    out = bundles[key]
    b = Bundle(out)
    assert b.manifest["quantization"] == key[0]
    assert b.manifest["graphs"]["quantizer"]["algorithm"] == key[1]
    # one weights.data for every graph; each tensor stored once, regions disjoint, every graph points into it
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".data")) == ["weights.data"]
    idx, tensors = _tensors(out)
    spans = sorted((e["offset"], e["offset"] + e["length"]) for e in idx["tensors"].values())
    assert all(a[1] <= b_[0] for a, b_ in zip(spans, spans[1:]))
    assert (out / "weights.data").stat().st_size == spans[-1][1]
    graphs = list(idx["graphs"])
    assert {"prefill.onnx", "extend.onnx", "decode.onnx", "layer_0.onnx"} <= set(graphs)
    for f in graphs:
        m = onnx.load(str(out / f), load_external_data=False)
        locs = {e.value for g in [m.graph] + [a.g for n in m.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
                for t in g.initializer for e in t.external_data if e.key == "location"}
        assert locs <= {"weights.data"}
    # the quantized layer weights are shared by prefill, decode and the split layer graph (one name, one region)
    name = "layers.1.mlp.down_proj.qweight"
    assert name in idx["tensors"] and all(name in idx["graphs"][f] for f in ("prefill.onnx", "extend.onnx", "layer_1.onnx"))
    # no duplicated contents (only the tied embedding and LM head may coincide under rtn)
    digests = {}
    for n, raw in tensors.items():
        digests.setdefault(hashlib.sha256(raw).hexdigest(), []).append(n)
    dups = [sorted(v) for v in digests.values() if len(v) > 1]
    assert all(d == ["embed_tokens.qweight", "lm_head.qweight"] for d in dups), dups
    # loads and generates; prefill logits close to the PyTorch fp32 model
    fm, _ = ref_model
    be = OrtBackend(b, threads=1)
    ids = np.random.default_rng(4).integers(3, 90, 8).astype(np.int64)
    got = generate(be, ids, SamplingConfig(max_new_tokens=6, ignore_eos=True), mask=np.ones(fm.n_layers, bool),
                   keep_logits=True)
    ref = generate(TorchBackend(fm, MAX_CTX), ids, SamplingConfig(max_new_tokens=1), mask=np.ones(fm.n_layers, bool),
                   keep_logits=True)
    a, c = ref.first_logits, got.first_logits
    cos = float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    assert cos > (0.999 if key[0] == "int8" else 0.85), cos
    assert len(got.tokens) == 6
    be.close()


def _all_nodes(g):
    import onnx

    for n in g.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def test_hqq_and_gptq_bundles_hold_other_weights_than_rtn(bundles):
    import onnx

    _, rtn = _tensors(bundles["int4", "rtn"])
    for algo in ("hqq", "gptq"):
        idx, t = _tensors(bundles["int4", algo])
        assert t["embed_tokens.qweight"] == rtn["embed_tokens.qweight"]  # embeddings: rtn for every algorithm
        for n in ("layers.0.attn.qkv_proj.qweight", "layers.1.mlp.down_proj.qweight", "lm_head.qweight"):
            assert t[n] != rtn[n], (algo, n)
        m = onnx.load(str(bundles["int4", algo] / "decode.onnx"), load_external_data=False)
        zps = [n for n in _all_nodes(m.graph) if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]]
        assert bool(zps) == (algo == "hqq")  # hqq: uint8 zero points; rtn and gptq: symmetric
    q = json.loads((bundles["int4", "gptq"] / "manifest.json").read_text())["graphs"]["quantizer"]
    assert q["calibration"]["prompts"] == 9 and q["calibration"]["split"] == "train"


# ---------------------------------------------------------------- one-line errors
def test_bad_quant_options_are_one_line_errors(tiny_dir, tmp_path):
    from export.build import build

    cases = [({"quant_algo": "gptq"}, "int4", "--quant-algo gptq needs calibration prompts: pass --data DIR"),
             ({"quant_algo": "awq"}, "int4", "unknown --quant-algo 'awq' (choose from rtn, hqq, gptq)"),
             ({"quant_algo": "hqq"}, "none", "--quant-algo hqq needs --quantize int4"),
             ({"quant_algo": "gptq", "data": str(tmp_path / "nope")}, "int4", "no such folder"),
             ({"quant_algo": "rtn", "calib_per_task": "8"}, "int4", "calib_per_task=8: a positive number")]
    for kw, quant, msg in cases:
        with pytest.raises(FirstEdgeError) as e:
            build("rpi", tmp_path / "b", model=str(tiny_dir), quantize=quant, max_context=MAX_CTX, verbose=False, **kw)
        assert msg in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args,msg", [(["--quant-algo", "gptq"], "needs calibration prompts: pass --data DIR"),
                                      (["--opt", "quant_algo=foo"], "unknown --quant-algo 'foo'")])
def test_cli_quant_algo_errors(tiny_dir, tmp_path, args, msg):
    p = subprocess.run([sys.executable, "-m", "export.build", "--target", "rpi", "--model", str(tiny_dir),
                        "--quantize", "int4", "--out", str(tmp_path / "b")] + args,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and msg in p.stderr, p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.strip()]) == 1, p.stderr


# ---------------------------------------------------------------- mixed precision (int8_weights)
MIXED = "lm_head,embed_tokens,down_proj,layers.0.*"


def _expected_8bit(name: str, n_layers: int) -> bool:
    return name in ("lm_head", "embed_tokens") or name.endswith("down_proj") or name.startswith("layers.0.")


@pytest.fixture(scope="module")
def mixed_bundle(bundles, tiny_dir, run_dir, calib_data, tmp_path_factory):
    from export.build import build

    return build("rpi", tmp_path_factory.mktemp("mixed") / "int4-gptq-mixed", model=str(tiny_dir), run=str(run_dir),
                 quantize="int4", max_context=MAX_CTX, verbose=False, decode_shape="both", quant_algo="gptq",
                 data=str(calib_data), int8_weights=MIXED)


def _qnodes(bundle: Path):
    """(op_type, weight name, bits) of every MatMulNBits / GatherBlockQuantized node of every graph."""
    import onnx

    idx = json.loads((bundle / "weights.json").read_text())
    out = set()
    for f in idx["graphs"]:
        m = onnx.load(str(bundle / f), load_external_data=False)
        for n in _all_nodes(m.graph):
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
                bits = next(a.i for a in n.attribute if a.name == "bits")
                w = n.input[1] if n.op_type == "MatMulNBits" else n.input[0]
                out.add((n.op_type, w.rsplit(".", 1)[0], bits))
    return out


def test_mixed_precision_bundle_bits_bytes_and_manifest(mixed_bundle, bundles, ref_model):
    from export.quantize_onnx import quantize_rtn

    fm, _ = ref_model
    L = fm.n_layers
    nodes = _qnodes(mixed_bundle)
    names = {w for _, w, _ in nodes}
    assert {"lm_head", "embed_tokens", f"layers.{L - 1}.attn.qkv_proj"} <= names
    for op, w, bits in nodes:  # every graph asks for the same name at the same bits
        assert bits == (8 if _expected_8bit(w, L) else 4), (op, w, bits)
    assert len({w for _, w, _ in nodes}) == len({(w, b) for _, w, b in nodes})
    q = json.loads((mixed_bundle / "manifest.json").read_text())["graphs"]["quantizer"]
    assert q["algorithm"] == "gptq" and q["int8_weights"]["rule"] == MIXED
    assert sorted(q["int8_weights"]["names"]) == sorted(w for w in names if _expected_8bit(w, L))
    # one copy of each tensor; 8-bit weights are rtn's 8-bit kernel, the 4-bit ones exactly the plain gptq bundle's
    idx, t = _tensors(mixed_bundle)
    _, plain = _tensors(bundles["int4", "gptq"])
    assert len(idx["tensors"]) == len(set(idx["tensors"]))
    for n in t:
        if n.endswith(".qweight") or n.endswith(".scales"):
            if _expected_8bit(n.rsplit(".", 1)[0], L):
                assert t[n] != plain[n] and len(t[n]) >= len(plain[n]), n
            else:
                assert t[n] == plain[n], n
    w = fm.layers[1].mlp.down_proj.weight.detach().numpy()
    assert t["layers.1.mlp.down_proj.qweight"] == quantize_rtn(w, 8).packed.tobytes()
    emb = fm.base.embed_tokens.weight.detach().numpy()
    assert len(t["embed_tokens.qweight"]) == emb.size  # 8 bits: one byte a weight


def _dequantized_model(fm, bundle: Path):
    """A copy of ``fm`` whose quantized weights are the bundle's, dequantized (the PyTorch twin of the bundle)."""
    import copy

    import torch

    from export.quantize_onnx import QWeight

    import onnx
    from onnx import numpy_helper

    # the prefill graph holds every weight (small ones inline, the rest in weights.data)
    t = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(bundle / "prefill.onnx")).graph.initializer}
    bits = {w: b for _, w, b in _qnodes(bundle)}
    fq = copy.deepcopy(fm)

    def deq(name, N, K):
        packed = t[name + ".qweight"].reshape(N, -1, 32 * bits[name] // 8)
        scales = t[name + ".scales"].reshape(N, -1)
        return torch.from_numpy(QWeight(packed, scales, None).dequantize(K, bits[name]).copy())

    with torch.no_grad():
        for l, lay in enumerate(fq.layers):
            a, m = lay.self_attn, lay.mlp
            qkv = [a.q_proj, a.k_proj, a.v_proj]
            full = deq(f"layers.{l}.attn.qkv_proj", sum(p.weight.shape[0] for p in qkv), qkv[0].weight.shape[1])
            for p, part in zip(qkv, torch.split(full, [p.weight.shape[0] for p in qkv])):
                p.weight.copy_(part)
            for mod, n in ((a.o_proj, "attn.o_proj"), (m.gate_proj, "mlp.gate_proj"), (m.up_proj, "mlp.up_proj"),
                           (m.down_proj, "mlp.down_proj")):
                mod.weight.copy_(deq(f"layers.{l}.{n}", *mod.weight.shape))
        emb = fq.base.embed_tokens.weight
        head = fq.hf.lm_head.weight
        if head is emb:  # tied in PyTorch, two tensors in the bundle: untie the copy
            fq.hf.lm_head.weight = torch.nn.Parameter(head.detach().clone())
            head = fq.hf.lm_head.weight
        emb.copy_(deq("embed_tokens", *emb.shape))
        head.copy_(deq("lm_head", *head.shape))
    return fq


def test_mixed_precision_bundle_matches_its_dequantized_pytorch_twin(mixed_bundle, ref_model):
    from export.reference import TorchBackend
    from runtime.ort_backend import OrtBackend

    fm, _ = ref_model
    twin = _dequantized_model(fm, mixed_bundle)
    be = OrtBackend(Bundle(mixed_bundle), threads=1)
    ids = np.random.default_rng(5).integers(3, 90, 10).astype(np.int64)
    mask = np.ones(fm.n_layers, bool)
    got = generate(be, ids, SamplingConfig(max_new_tokens=1), mask=mask, keep_logits=True)
    be.close()
    ref = generate(TorchBackend(twin, MAX_CTX), ids, SamplingConfig(max_new_tokens=1), mask=mask, keep_logits=True)
    orig = generate(TorchBackend(fm, MAX_CTX), ids, SamplingConfig(max_new_tokens=1), mask=mask, keep_logits=True)

    def dist(a, c):
        return float(np.abs(np.asarray(a) - np.asarray(c)).max() / np.abs(np.asarray(a)).max())

    # ONNX Runtime computes with the twin's weights (int8 activations of accuracy_level 4 are the only difference):
    # much closer to the twin than the twin is to the fp32 model
    d_twin = dist(ref.first_logits, got.first_logits)
    assert d_twin < 0.05 and d_twin < 0.5 * dist(orig.first_logits, ref.first_logits), d_twin


def test_int8_weights_bad_values_are_one_line_errors(tiny_dir, tmp_path):
    from export.build import build

    cases = [({"int8_weights": "lm_head"}, "int8", "int8_weights=lm_head is for --quantize int4"),
             ({"int8_weights": "lm_head"}, "none", "int8_weights=lm_head is for --quantize int4"),
             ({"int8_weights": "lm_head,,down_proj"}, "int4", "bad entry ''"),
             ({"int8_weights": "down proj"}, "int4", "bad entry 'down proj'"),
             ({"int8_weights": "layers.99.*"}, "int4", "'layers.99.*' matches no weight of this model"),
             ({"int8_weights": "lm_heads"}, "int4", "'lm_heads' matches no weight")]
    for kw, quant, msg in cases:
        with pytest.raises(FirstEdgeError) as e:
            build("rpi", tmp_path / "b", model=str(tiny_dir), quantize=quant, max_context=MAX_CTX, verbose=False, **kw)
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "b").exists()


def test_cli_int8_weights_error(tiny_dir, tmp_path):
    p = subprocess.run([sys.executable, "-m", "export.build", "--target", "rpi", "--model", str(tiny_dir),
                        "--quantize", "int8", "--int8-weights", "lm_head", "--out", str(tmp_path / "b")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "int8_weights=lm_head is for --quantize int4" in p.stderr, p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.strip()]) == 1, p.stderr
