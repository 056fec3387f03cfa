"""ONNX export for the Raspberry Pi / ONNX Runtime target (DESIGN.md section 2).

The graphs are written directly with ``onnx.helper`` from the PyTorch weights of the FiRST model
(as onnxruntime-genai's model builder does), using ONNX Runtime's fused CPU operators:

* ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (RMSNorm, residual add),
* ``GroupQueryAttention`` (com.microsoft) with packed QKV, rotary embedding inside the op at the
  token's absolute position (``position_ids``) and, in decode, a KV buffer shared between
  ``past_key_values.{l}.*`` and ``present.{l}.*`` (ONNX Runtime writes the new entry in place),
* ``MatMulNBits`` (com.microsoft) for the int8 / int4 weight builds.

Graphs written into the bundle:

``prefill.onnx``   every layer over the prompt: logits (last position), router scores, the layer mask
                   for the ``threshold`` input, every layer's K/V for the prompt.
``extend.onnx``    prefill with a past (a chat session's next turn): new tokens through every layer after the
                   tokens already in the KV buffers, written in place; unpooled router probabilities.
``decode.onnx``    fused decode shape: one ``If`` per layer on ``layer_mask[l]`` (skipped layers run no
                   node; ONNX Runtime executes only the taken branch).
``embed.onnx``, ``layer_{l}.onnx``, ``head.onnx``   split decode shape: the runtime calls only the kept
                   layers (the shape NPU providers need).
``weights.data``   every graph's weights, each tensor once (graphs share initializer names), indexed by
                   ``weights.json``; the runtime maps it once for all its sessions (:func:`save_shared`).

Before anything is returned every graph is checked against the PyTorch reference (prefill outputs
and a few decode steps under an all-ones and a mixed mask), as Optimum's export validation does; a
mismatch raises :class:`FirstEdgeError`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from runtime.errors import FirstEdgeError
from runtime.graph_io import Dims, TensorSpec, graph_io, kv_names, model_dims
from runtime.masks import mask_str

from .quantize_onnx import ALGOS, DEFAULT_ALGO, Quantizer, check_algo, check_int8_patterns, parse_int8_weights

OPSET = 17
MS = "com.microsoft"
DECODE_SHAPES = ("fused", "split", "both")
DEFAULT_DECODE_SHAPE = "fused"  # measured faster on the 2-core CPU (docs/onnx.md)
BLOCK_SIZE = 32
QUANT_BITS = {"none": None, "int8": 8, "int4": 4}
PARITY_ATOL = 1e-3
ROUTER_EPS = 1e-6
F32 = TensorProto.FLOAT
I64 = TensorProto.INT64
I32 = TensorProto.INT32
BOOL = TensorProto.BOOL
ONNX_DTYPES = {"float32": F32, "int64": I64, "int32": I32, "bool": BOOL}


# ------------------------------------------------------------------ weights
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


class Weights:
    """Plain numpy copies of everything the graphs need (LoRA already merged by build_first_model)."""

    def __init__(self, fm, max_context: int):
        self.L, self.D = fm.n_layers, fm.hidden_size
        self.H, self.KV, self.hd = fm.n_heads, fm.n_kv_heads, fm.head_dim
        self.V = fm.vocab_size
        self.max_context = int(max_context)
        base = fm.base
        self.eps = float(getattr(fm.cfg, "rms_norm_eps", 1e-6))
        self.embed = _np(base.embed_tokens.weight)
        head_w = fm.hf.get_base_model().lm_head.weight if hasattr(fm.hf, "get_base_model") else fm.hf.lm_head.weight
        self.tied = head_w.data_ptr() == base.embed_tokens.weight.data_ptr()
        self.lm_head = self.embed if self.tied else _np(head_w)
        self.lm_head_bias = None
        self.norm = _np(base.norm.weight)
        self.layers = []
        for lay in fm.layers:
            a, m = lay.self_attn, lay.mlp
            qkv_w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0)
            qkv_b = None
            if a.q_proj.bias is not None:
                qkv_b = _np(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], 0))
            self.layers.append({
                "ln1": _np(lay.input_layernorm.weight), "ln2": _np(lay.post_attention_layernorm.weight),
                "qkv": (_np(qkv_w), qkv_b),
                "o": (_np(a.o_proj.weight), None if a.o_proj.bias is None else _np(a.o_proj.bias)),
                "gate": (_np(m.gate_proj.weight), None if m.gate_proj.bias is None else _np(m.gate_proj.bias)),
                "up": (_np(m.up_proj.weight), None if m.up_proj.bias is None else _np(m.up_proj.bias)),
                "down": (_np(m.down_proj.weight), None if m.down_proj.bias is None else _np(m.down_proj.bias)),
            })
        self.routers = [{"fc1": (_np(r.fc1.weight), _np(r.fc1.bias)), "fc2": (_np(r.fc2.weight), _np(r.fc2.bias))}
                        for r in fm.routers]
        self.pinned = np.asarray(fm.pinned_mask.cpu().numpy(), dtype=bool)
        self.pool_start = fm._pool_start()
        # rotary caches exactly as FirstModel.rope computes them (float32), half head_dim wide
        pos = torch.arange(self.max_context, dtype=torch.float32)[:, None]
        freqs = pos * fm.inv_freq.float()[None, :]
        self.cos = (freqs.cos() * fm.rope_scale).numpy().astype(np.float32)
        self.sin = (freqs.sin() * fm.rope_scale).numpy().astype(np.float32)
        self.scaling = float(fm.scaling)


# ------------------------------------------------------------------ int8 / int4 weights
def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values (< 2^bits) packed along the last axis, low-order bits first (MatMulNBits layout)."""
    if bits == 8:
        return q.astype(np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], -1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _blocks(w: np.ndarray, block: int):
    """[N, K] weight -> float32 [N, k_blocks, block], the last block zero-padded."""
    N, K = w.shape
    kb = -(-K // block)
    pad = kb * block - K
    wp = np.pad(w, ((0, 0), (0, pad))) if pad else w
    return wp.reshape(N, kb, block).astype(np.float32)


def quantize_blockwise(w: np.ndarray, bits: int, block: int = BLOCK_SIZE):
    """Symmetric round-to-nearest per-block quantization of a torch Linear weight [N, K] for MatMulNBits
    (the hand-written reference; the graphs take their weights from export/quantize_onnx.py).

    Returns (B uint8 [N, k_blocks, blob], scales float32 [N, k_blocks]); zero point is the default 2^(bits-1).
    """
    wb = _blocks(w, block)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(wb).max(axis=2, keepdims=True)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(wb / scale), -qmax - 1, qmax).astype(np.int32) + 2 ** (bits - 1)
    return np.ascontiguousarray(_pack(q.astype(np.uint8), bits)), np.ascontiguousarray(scale[..., 0])


_ACTIVE_QUANTIZER: Optional[Quantizer] = None  # set by build_graphs for one build (each weight quantized once)


def _quantizer(bits: int) -> Quantizer:
    q = _ACTIVE_QUANTIZER
    return q if q is not None and q.bits == bits else Quantizer(bits, block=BLOCK_SIZE)


# ------------------------------------------------------------------ graph building
class GraphBuilder:
    """A graph under construction: nodes, initializers, unique names."""

    def __init__(self, bits: Optional[int] = None):
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.bits = bits
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, domain: str = "", name: Optional[str] = None,
           outputs: Optional[Sequence[str]] = None, **attrs) -> List[str]:
        nm = name or self.name(op_type)
        outs = list(outputs) if outputs is not None else [f"{nm}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=nm, domain=domain or None, **attrs))
        return outs

    def linear(self, x: str, w: np.ndarray, b: Optional[np.ndarray], prefix: str) -> str:
        """x @ w.T + b for a torch Linear weight w [N, K]."""
        N, K = w.shape
        if self.bits is None:
            y = self.op("MatMul", [x, self.const(prefix + ".weight", np.ascontiguousarray(w.T))], name=prefix)[0]
        else:
            qz = _quantizer(self.bits)
            qw = qz.linear(prefix, w)
            ins = [x, self.const(prefix + ".qweight", qw.packed), self.const(prefix + ".scales", qw.scales)]
            if qw.zero_points is not None:
                ins.append(self.const(prefix + ".zero_points", qw.zero_points))
            y = self.op("MatMulNBits", ins,
                        domain=MS, name=prefix, K=K, N=N, bits=qz.bits_for(prefix), block_size=BLOCK_SIZE,
                        accuracy_level=4)[0]
        if b is not None:
            y = self.op("Add", [y, self.const(prefix + ".bias", b)], name=prefix + "/bias")[0]
        return y

    def embed(self, ids: str, weights: "Weights", out: Optional[str] = None) -> str:
        """Token embedding: Gather (fp32) or GatherBlockQuantized (same block format as MatMulNBits)."""
        outs = [out] if out else None
        if self.bits is None:
            return self.op("Gather", [self.const("embed_tokens.weight", weights.embed), ids], name="embed_tokens",
                           outputs=outs)[0]
        qz = _quantizer(self.bits)
        qw = qz.embedding("embed_tokens", weights.embed)
        bits = qz.bits_for("embed_tokens")
        return self.op("GatherBlockQuantized", [self.const("embed_tokens.qweight", qw.packed.reshape(weights.V, -1)), ids,
                                                self.const("embed_tokens.scales", qw.scales)],
                       domain=MS, name="embed_tokens", outputs=outs, bits=bits, block_size=BLOCK_SIZE,
                       gather_axis=0, quantize_axis=1)[0]

    def rmsnorm(self, x: str, w: np.ndarray, eps: float, prefix: str) -> str:
        return self.op("SimplifiedLayerNormalization", [x, self.const(prefix + ".weight", w)], name=prefix,
                       axis=-1, epsilon=eps, stash_type=1)[0]


def _layer_body(g: GraphBuilder, weights: Weights, l: int, h: str, pos_ids: str, seqlens: str, total: str,
                past_k: Optional[str], past_v: Optional[str], cos: str, sin: str,
                present_names: Tuple[str, str]) -> str:
    """One decoder layer (Llama family) with GroupQueryAttention; returns the output hidden name."""
    p = weights.layers[l]
    pre = f"layers.{l}"
    x = g.rmsnorm(h, p["ln1"], weights.eps, pre + ".input_layernorm")
    qkv = g.linear(x, *p["qkv"], pre + ".attn.qkv_proj")
    att = g.op("GroupQueryAttention",
               [qkv, "", "", past_k or "", past_v or "", seqlens, total, cos, sin, pos_ids],
               domain=MS, name=pre + ".attn.gqa",
               outputs=[g.name(pre + ".attn.out"), present_names[0], present_names[1]],
               num_heads=weights.H, kv_num_heads=weights.KV, do_rotary=1, rotary_interleaved=0, scale=weights.scaling)[0]
    o = g.linear(att, *p["o"], pre + ".attn.o_proj")
    x2, _, _, h1 = g.op("SkipSimplifiedLayerNormalization", [o, h, g.const(pre + ".post_attention_layernorm.weight", p["ln2"])],
                        n_out=4, domain=MS, name=pre + ".post_attention_layernorm", epsilon=weights.eps)
    gate = g.linear(x2, *p["gate"], pre + ".mlp.gate_proj")
    up = g.linear(x2, *p["up"], pre + ".mlp.up_proj")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=pre + ".mlp.sigmoid")[0]], name=pre + ".mlp.silu")[0]
    y = g.linear(g.op("Mul", [act, up], name=pre + ".mlp.mul")[0], *p["down"], pre + ".mlp.down_proj")
    return g.op("Add", [h1, y], name=pre + ".residual")[0]


def _head(g: GraphBuilder, weights: Weights, h2d: str, out: str, decode: bool = False):
    """logits [1, V] from the last hidden state [1, D].

    Tied fp32 embeddings: the one stored copy [V, D] feeds the Gather and the LM head. In the decode graphs the
    head is ``MatMul(x, Transpose(embed))``: ONNX Runtime folds the Transpose of the constant when the session is
    created and pre-packs the [D, V] result for MLAS's MatMul, which decodes a row 15 % faster than ``Gemm(transB=1)``
    on [V, D] (measured: 5.7 vs 6.6 ms per token for SmolLM2's 49152 x 576 head, bit-identical logits; docs/onnx.md);
    the folded copy exists only inside the session that packs it. Prefill and extend (one head row per call, and
    sessions that may not pre-pack) keep the ``Gemm``, which reads the shared weights as they are."""
    x = g.rmsnorm(h2d, weights.norm, weights.eps, "norm")
    if g.bits is None and weights.tied:
        emb = "embed_tokens.weight"
        if not any(t.name == emb for t in g.inits):
            g.const(emb, weights.embed)
        if decode:
            wt = g.op("Transpose", [emb], name="lm_head.transpose", perm=[1, 0])[0]
            g.op("MatMul", [x, wt], name="lm_head", outputs=[out])
        else:
            g.op("Gemm", [x, emb], name="lm_head", outputs=[out], transB=1)
    elif g.bits is None:
        g.op("MatMul", [x, g.const("lm_head.weight", np.ascontiguousarray(weights.lm_head.T))], name="lm_head", outputs=[out])
    else:
        y = g.linear(x, weights.lm_head, None, "lm_head")
        g.op("Identity", [y], name="lm_head/out", outputs=[out])


def _rope_inits(g: GraphBuilder, weights: Weights):
    return g.const("rope.cos_cache", weights.cos), g.const("rope.sin_cache", weights.sin)


def _model(g: GraphBuilder, name: str, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                          producer_name="first-edge")
    m.ir_version = 9
    return m


def value_infos(specs: Sequence[TensorSpec], l: Optional[int] = None) -> List[onnx.ValueInfoProto]:
    """ONNX value infos of a graph's inputs or outputs from the I/O contract (runtime/graph_io.py);
    ``l`` fills the ``{l}`` of a ``layer`` entry."""
    return [helper.make_tensor_value_info(s.name if l is None else s.name.replace("{l}", str(l)),
                                          ONNX_DTYPES[s.dtype], list(s.shape)) for s in specs]


def contract(weights: "Weights", decode_shapes=("fused", "split")) -> dict:
    return graph_io("onnxruntime", Dims(weights.L, weights.D, weights.KV, weights.hd, weights.V, weights.max_context), decode_shapes)


def _router_prob(g: GraphBuilder, weights: Weights, l: int, h: str, ones_d: str) -> str:
    """p[l, t] = sigmoid(router_l(h_l[t])) for every position: [1, T, 1]."""
    r = weights.routers[l]
    rp = f"routers.{l}"
    xn = g.op("SimplifiedLayerNormalization", [h, ones_d], name=rp + ".norm", axis=-1, epsilon=ROUTER_EPS,
              stash_type=1)[0]
    z = g.op("MatMul", [xn, g.const(rp + ".fc1.weight", np.ascontiguousarray(r["fc1"][0].T))], name=rp + ".fc1")[0]
    z = g.op("Add", [z, g.const(rp + ".fc1.bias", r["fc1"][1])], name=rp + ".fc1/bias")[0]
    z = g.op("Mul", [z, g.op("Sigmoid", [z], name=rp + ".sig1")[0]], name=rp + ".silu")[0]
    z = g.op("MatMul", [z, g.const(rp + ".fc2.weight", np.ascontiguousarray(r["fc2"][0].T))], name=rp + ".fc2")[0]
    z = g.op("Add", [z, g.const(rp + ".fc2.bias", r["fc2"][1])], name=rp + ".fc2/bias")[0]
    return g.op("Sigmoid", [z], name=rp + ".prob")[0]


def _last_logits(g: GraphBuilder, weights: Weights, h: str):
    last = g.op("Gather", [h, g.const("last_idx", np.array(-1, np.int64))], name="last_position", axis=1)[0]
    last = g.op("Reshape", [last, g.const("shape_1xD", np.array([1, weights.D], np.int64))], name="last_hidden")[0]
    _head(g, weights, last, "logits")


def build_prefill(weights: Weights, bits: Optional[int]) -> onnx.ModelProto:
    g = GraphBuilder(bits)
    cos, sin = _rope_inits(g, weights)
    T = g.op("Shape", ["input_ids"], name="seq_len", start=1, end=2)[0]  # [1] int64
    T32 = g.op("Cast", [T], name="seq_len_i32", to=I32)[0]
    seqlens = g.op("Sub", [T32, g.const("one_i32", np.array([1], np.int32))], name="seqlens_k")[0]
    total = g.op("Squeeze", [T32], name="total_len")[0]
    pos = g.op("Range", [g.const("zero_i64", np.array(0, np.int64)), g.op("Squeeze", [T], name="T_scalar")[0],
                         g.const("one_i64", np.array(1, np.int64))], name="positions")[0]
    pos_ids = g.op("Unsqueeze", [pos, g.const("axes0", np.array([0], np.int64))], name="position_ids")[0]
    # router scores pool the positions [min(P, T - 1), T) (DESIGN.md section 1; P baked in)
    pool_start = g.op("Min", [g.const("router.pool_start", np.array([weights.pool_start], np.int64)),
                              g.op("Sub", [T, g.const("one_i64_1", np.array([1], np.int64))], name="last_pos")[0]],
                      name="router.pool_from")[0]  # [1] int64
    pool_end = g.const("router.pool_end", np.array([np.iinfo(np.int64).max], np.int64))
    pool_axes = g.const("router.pool_axes", np.array([1], np.int64))
    h = g.embed("input_ids", weights)
    ones_d = g.const("router.norm_ones", np.ones(weights.D, np.float32))
    scores = []
    for l in range(weights.L):
        pr = _router_prob(g, weights, l, h, ones_d)  # [1, T, 1]
        pooled = g.op("Slice", [pr, pool_start, pool_end, pool_axes], name=f"routers.{l}.pooled")[0]
        scores.append(g.op("ReduceMean", [pooled], name=f"routers.{l}.mean", keepdims=0)[0])  # scalar
        _, _, pk, pv = kv_names(l)
        h = _layer_body(g, weights, l, h, pos_ids, seqlens, total, None, None, cos, sin, (pk, pv))
    g.op("Concat", [g.op("Unsqueeze", [s, g.const(f"axes0_{i}", np.array([0], np.int64))], name=f"score_{i}")[0]
                    for i, s in enumerate(scores)], name="router_scores", outputs=["router_scores"], axis=0)
    ge = g.op("GreaterOrEqual", ["router_scores", "threshold"], name="threshold_mask")[0]
    g.op("Or", [ge, g.const("pinned_mask", weights.pinned)], name="layer_mask", outputs=["layer_mask"])
    _last_logits(g, weights, h)
    io = contract(weights)["prefill"]
    return _model(g, "first_prefill", value_infos(io["inputs"]), value_infos(io["outputs"]))


def build_extend(weights: Weights, bits: Optional[int]) -> onnx.ModelProto:
    """Prefill with a past (a chat session's next turn): T new tokens at positions S..S+T-1 through every
    layer, S = ``past_length`` tokens already in every layer's buffer. GroupQueryAttention writes the new
    K/V in place at S.. of the buffers bound as both past and present; the per-token router probabilities
    of the new tokens come out unpooled (the runtime pools the turn's user span)."""
    g = GraphBuilder(bits)
    cos, sin = _rope_inits(g, weights)
    T = g.op("Shape", ["input_ids"], name="seq_len", start=1, end=2)[0]  # [1] int64
    T32 = g.op("Cast", [T], name="seq_len_i32", to=I32)[0]
    end32 = g.op("Add", ["past_length", T32], name="total_1")[0]  # [1] int32: S + T
    seqlens = g.op("Sub", [end32, g.const("one_i32", np.array([1], np.int32))], name="seqlens_k")[0]
    total = g.op("Squeeze", [end32], name="total_len")[0]
    start = g.op("Squeeze", [g.op("Cast", ["past_length"], name="past_i64", to=I64)[0]], name="start")[0]
    end = g.op("Squeeze", [g.op("Cast", [end32], name="end_i64", to=I64)[0]], name="end")[0]
    pos = g.op("Range", [start, end, g.const("one_i64", np.array(1, np.int64))], name="positions")[0]
    pos_ids = g.op("Unsqueeze", [pos, g.const("axes0", np.array([0], np.int64))], name="position_ids")[0]
    h = g.embed("input_ids", weights)
    ones_d = g.const("router.norm_ones", np.ones(weights.D, np.float32))
    shape_1t = g.const("shape_1xT", np.array([1, -1], np.int64))
    probs = []
    for l in range(weights.L):
        pr = _router_prob(g, weights, l, h, ones_d)  # [1, T, 1]
        probs.append(g.op("Reshape", [pr, shape_1t], name=f"routers.{l}.row")[0])  # [1, T]
        pk, pv, prk, prv = kv_names(l)
        h = _layer_body(g, weights, l, h, pos_ids, seqlens, total, pk, pv, cos, sin, (prk, prv))
    g.op("Concat", probs, name="router_probs", outputs=["router_probs"], axis=0)
    _last_logits(g, weights, h)
    io = contract(weights)["extend"]
    return _model(g, "first_extend", value_infos(io["inputs"]), value_infos(io["outputs"]))


def _decode_total(g: GraphBuilder, weights: Weights) -> str:
    """GroupQueryAttention's ``total_sequence_length`` for one decode token: the constant ``max_context``, shared by
    every layer. With the KV buffer shared between past and present, ONNX Runtime's CPU kernel takes each layer's
    valid length from ``seqlens_k`` (the layer's ``past_length``) and uses the total only as the present length's
    lower bound (the buffer is ``max_context`` long anyway), for the rotary cache bound (``max_context`` rows) and
    for "first prompt" (total == 1 token: never, max_context > 1). So no per-layer ``Add``/``Squeeze`` computes it
    on every token (60 nodes fewer per token for 30 layers; parity tests unchanged)."""
    return g.const("decode.total_len", np.array(weights.max_context, np.int32))


def build_decode_fused(weights: Weights, bits: Optional[int]) -> onnx.ModelProto:
    """One graph; layer l sits in the then-branch of an ``If`` on layer_mask[l]."""
    g = GraphBuilder(bits)
    cos, sin = _rope_inits(g, weights)
    pos_ids = g.op("Reshape", ["position", g.const("shape_1x1", np.array([1, 1], np.int64))], name="position_ids")[0]
    total = _decode_total(g, weights)
    h = g.embed("input_ids", weights)
    for l in range(weights.L):
        pk, pv, prk, prv = kv_names(l)
        idx = g.const(f"layer_idx_{l}", np.array(l, np.int64))
        cond = g.op("Gather", ["layer_mask", idx], name=f"layers.{l}.keep")[0]
        seqlens = g.op("Gather", ["past_lengths", g.const(f"layer_idx1_{l}", np.array([l], np.int64))],
                       name=f"layers.{l}.seqlens_k")[0]
        # then: run the layer (its weights live inside the branch, so ONNX Runtime prepacks them normally)
        tg = GraphBuilder(bits)
        t_out = _layer_body(tg, weights, l, h, pos_ids, seqlens, total, pk, pv, cos, sin, (f"then{l}/k", f"then{l}/v"))
        tg.op("Identity", [t_out], name=f"layers.{l}.h_out", outputs=[f"then{l}/h"])
        then_g = helper.make_graph(tg.nodes, f"layer_{l}_run", [], [
            helper.make_tensor_value_info(f"then{l}/h", F32, None),
            helper.make_tensor_value_info(f"then{l}/k", F32, None),
            helper.make_tensor_value_info(f"then{l}/v", F32, None)], initializer=tg.inits)
        # else: pass the hidden state through; the KV buffers are handed back untouched (Identity on the
        # same buffer copies nothing when the output is bound to it)
        eg = GraphBuilder()
        eg.op("Identity", [h], name=f"layers.{l}.skip_h", outputs=[f"else{l}/h"])
        eg.op("Identity", [pk], name=f"layers.{l}.skip_k", outputs=[f"else{l}/k"])
        eg.op("Identity", [pv], name=f"layers.{l}.skip_v", outputs=[f"else{l}/v"])
        else_g = helper.make_graph(eg.nodes, f"layer_{l}_skip", [], [
            helper.make_tensor_value_info(f"else{l}/h", F32, None),
            helper.make_tensor_value_info(f"else{l}/k", F32, None),
            helper.make_tensor_value_info(f"else{l}/v", F32, None)])
        h_new = f"layers.{l}/h"
        g.nodes.append(helper.make_node("If", [cond], [h_new, prk, prv], name=f"layers.{l}.if",
                                        then_branch=then_g, else_branch=else_g))
        h = h_new
    h2 = g.op("Reshape", [h, g.const("shape_1xD", np.array([1, weights.D], np.int64))], name="last_hidden")[0]
    _head(g, weights, h2, "logits", decode=True)
    io = contract(weights)["decode"]
    return _model(g, "first_decode_fused", value_infos(io["inputs"]), value_infos(io["outputs"]))


def build_split(weights: Weights, bits: Optional[int]) -> Dict[str, onnx.ModelProto]:
    """embed, layer_{l}, head graphs; the runtime calls only the kept layers."""
    res = {}
    io = contract(weights)
    g = GraphBuilder(bits)
    g.embed("input_ids", weights, out="hidden_states")
    res["embed"] = _model(g, "first_embed", value_infos(io["embed"]["inputs"]), value_infos(io["embed"]["outputs"]))
    for l in range(weights.L):
        g = GraphBuilder(bits)
        cos, sin = _rope_inits(g, weights)
        pos_ids = g.op("Reshape", ["position", g.const("shape_1x1", np.array([1, 1], np.int64))], name="position_ids")[0]
        total = _decode_total(g, weights)
        pk, pv, prk, prv = kv_names(l)
        out = _layer_body(g, weights, l, "hidden_states", pos_ids, "past_length", total, pk, pv, cos, sin, (prk, prv))
        g.op("Identity", [out], name="h_out", outputs=["hidden_states_out"])
        res[f"layer_{l}"] = _model(g, f"first_layer_{l}", value_infos(io["layer"]["inputs"], l),
                                   value_infos(io["layer"]["outputs"], l))
    g = GraphBuilder(bits)
    h2 = g.op("Reshape", ["hidden_states", g.const("shape_1xD", np.array([1, weights.D], np.int64))], name="last_hidden")[0]
    _head(g, weights, h2, "logits", decode=True)
    res["head"] = _model(g, "first_head", value_infos(io["head"]["inputs"]), value_infos(io["head"]["outputs"]))
    return res


WEIGHTS_DATA = "weights.data"
WEIGHTS_INDEX = "weights.json"
EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay inside their graph
DATA_ALIGN = 4096  # every tensor starts on a page: ONNX Runtime memory-maps aligned external data directly
NP_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.UINT8: "uint8", TensorProto.INT64: "int64",
             TensorProto.INT32: "int32", TensorProto.BOOL: "bool", TensorProto.FLOAT16: "float16"}


def _graphs(g: onnx.GraphProto):
    """A graph and every subgraph (If branches) below it."""
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


def save_shared(models: Dict[str, Callable[[], onnx.ModelProto]], out: Path) -> List[str]:
    """Write graphs whose weights live in ONE external-data file for the whole bundle (``weights.data``).

    Graphs name their initializers alike (``layers.0.attn.qkv_proj.weight`` is the same tensor in prefill,
    extend and decode), so each name is stored once, at a page-aligned offset, and every graph's external-data
    entry points at it; the same name with different contents is an export bug. ``weights.json`` indexes the
    file (name -> offset, length, dtype, shape) and lists each graph's tensors (``models``: file name -> a
    function that builds the graph); the runtime memory-maps the file once and hands every session the same
    tensors (runtime/ort_backend.py ``SharedWeights``). Returns the file names written."""
    tensors: Dict[str, dict] = {}
    digests: Dict[str, bytes] = {}
    graphs_index: Dict[str, List[str]] = {}

    data_path = out / WEIGHTS_DATA
    with open(data_path, "wb") as f:
        for fname, build in models.items():
            model = build()  # one graph in memory at a time
            names = []
            for g in _graphs(model.graph):
                for t in g.initializer:
                    raw = numpy_helper.to_array(t).tobytes() if not t.HasField("raw_data") else t.raw_data
                    if len(raw) < EXTERNAL_MIN_BYTES:
                        continue
                    dig = hashlib.sha256(raw).digest()
                    if t.name in tensors:
                        if digests[t.name] != dig:
                            raise FirstEdgeError(f"ONNX export: initializer {t.name} differs between graphs")
                        ent = tensors[t.name]
                    else:
                        pad = -f.tell() % DATA_ALIGN
                        f.write(b"\0" * pad)
                        ent = {"offset": f.tell(), "length": len(raw), "dtype": NP_DTYPES[t.data_type],
                               "shape": [int(d) for d in t.dims]}
                        f.write(raw)
                        tensors[t.name], digests[t.name] = ent, dig
                    t.ClearField("raw_data")
                    for fld in ("float_data", "int32_data", "int64_data"):
                        t.ClearField(fld)
                    del t.external_data[:]
                    t.data_location = TensorProto.EXTERNAL
                    for k, v in (("location", WEIGHTS_DATA), ("offset", str(ent["offset"])), ("length", str(ent["length"]))):
                        e = t.external_data.add()
                        e.key, e.value = k, v
                    names.append(t.name)
            graphs_index[fname] = sorted(set(names))
            onnx.save_model(model, str(out / fname))
    (out / WEIGHTS_INDEX).write_text(json.dumps({"data": WEIGHTS_DATA, "alignment": DATA_ALIGN, "tensors": tensors,
                                                 "graphs": graphs_index}, indent=1))
    return list(models) + [WEIGHTS_DATA, WEIGHTS_INDEX]


# ------------------------------------------------------------------ validation
def validate(fm, out_dir: Path, graphs: dict, max_context: int, bits: Optional[int], verbose: bool = True):
    """Check the written graphs against the PyTorch reference (Optimum-style export validation)."""
    from export.reference import TorchBackend
    from runtime.ort_backend import OrtBackend
    from runtime.loop import SamplingConfig, generate

    shapes = graphs["decode_shapes"]
    rng = np.random.default_rng(0)
    T = int(min(12, max_context // 4))
    ids = rng.integers(3, min(fm.vocab_size, 1000), T).astype(np.int64)
    L = fm.n_layers
    mixed = np.ones(L, bool)
    mixed[1::2] = False
    mixed[0] = True
    n_new = int(min(6, max_context - T - 1))
    cfg = SamplingConfig(max_new_tokens=n_new, ignore_eos=True)
    fm_thr = fm.threshold
    problems = []
    for shape in shapes:
        be = OrtBackend.from_dir(out_dir, graphs, dims=model_dims(fm, max_context),
                                 decode_shape=shape)
        for mask in (np.ones(L, bool), mixed):
            ref = generate(TorchBackend(fm, max_context), ids, cfg, mask=mask, keep_logits=True, default_threshold=fm_thr)
            got = generate(be, ids, cfg, mask=mask, keep_logits=True, default_threshold=fm_thr)
            a = np.stack([ref.first_logits] + ref.step_logits)
            b = np.stack([got.first_logits] + got.step_logits)
            err = float(np.abs(a - b).max())
            if bits is None:
                if not np.allclose(ref.scores, got.scores, atol=1e-4):
                    problems.append(f"{shape}: router scores differ by {np.abs(ref.scores - got.scores).max():.2e}")
                if err > PARITY_ATOL * max(1.0, float(np.abs(a).max()) / 10):
                    problems.append(f"{shape} decode, mask {mask_str(mask)}: "
                                    f"logits differ by {err:.2e} (> {PARITY_ATOL})")
            else:
                # greedy paths may diverge after the first token: compare the prefill logits
                a0, b0 = a[0], b[0]
                cos = float((a0 * b0).sum() / (np.linalg.norm(a0) * np.linalg.norm(b0) + 1e-12))
                if verbose:
                    print(f"[first-edge] int{bits} prefill logits cosine to PyTorch fp32: {cos:.4f}", file=sys.stderr)
                if not np.isfinite(b).all() or cos < 0.8:
                    problems.append(f"{shape} int{bits}: logits far from fp32 (cosine {cos:.3f})")
            if verbose:
                print(f"[first-edge] validate {shape} mask={mask_str(mask)}: "
                      f"max |logits diff| {err:.2e}", file=sys.stderr)
        # the graph's own threshold mask equals the reference mask rule
        _, g_ort, m_ort = be.prefill(ids, fm_thr)
        with torch.inference_mode():
            _, g_ref, m_ref, _, _ = fm.prefill(torch.from_numpy(ids).view(1, -1), fm_thr)
        if not np.array_equal(m_ort, m_ref.numpy()) and np.abs(g_ref.numpy() - fm_thr).min() > 1e-4:
            problems.append(f"{shape}: prefill layer_mask differs from the reference")
        # prompts no longer than pool_start pool only their last token
        for n in sorted({1, min(T, max(fm.pool_start, 1))}):
            _, g_ort, _ = be.prefill(ids[:n], fm_thr)
            with torch.inference_mode():
                g_ref = fm.prefill(torch.from_numpy(ids[:n]).view(1, -1), fm_thr)[1].numpy()
            if bits is None and not np.allclose(g_ort, g_ref, atol=1e-4):
                problems.append(f"{shape}: router scores of a {n}-token prompt differ by "
                                f"{np.abs(g_ort - g_ref).max():.2e}")
        # extend (a session's next turn) after a decode with the mixed mask: logits and router probabilities
        # against the reference doing the same
        err = check_extend(TorchBackend(fm, max_context), be, ids, mixed, n_new, rng, fm.vocab_size)
        if verbose:
            print(f"[first-edge] validate {shape} extend: max |diff| {err:.2e}", file=sys.stderr)
        if bits is None and err > PARITY_ATOL * 10:
            problems.append(f"{shape} extend: logits or router probabilities differ by {err:.2e}")
        be.close()
    if problems:
        raise FirstEdgeError("ONNX export validation failed: " + "; ".join(problems))


def check_extend(ref, be, ids: np.ndarray, mask: np.ndarray, n_new: int, rng, vocab: int) -> float:
    """Prefill ``ids``, decode ``n_new`` tokens under ``mask``, then extend from the prompt's end with the
    decoded tokens and a few more (a session's next turn) on both backends; the largest difference of the
    extend's logits and router probabilities (relative to the logits' scale for the logits)."""
    from runtime.loop import SamplingConfig, generate

    cfg = SamplingConfig(max_new_tokens=n_new, ignore_eos=True)
    more = rng.integers(3, min(vocab, 1000), 4)
    outs = []
    for b in (ref, be):
        r = generate(b, ids, cfg, mask=mask)
        outs.append(b.extend(np.concatenate([np.asarray(r.tokens[:-1], np.int64), more]), len(ids)))
    (la, pa), (lb, pb) = outs
    return max(float(np.abs(la - lb).max()) / max(1.0, float(np.abs(la).max()) / 10), float(np.abs(pa - pb).max()))


# ------------------------------------------------------------------ entry point (export/build.py)
def build_graphs(fm, out_dir, *, quantize: str = "none", max_context: int = 1024, verbose: bool = True,
                 decode_shape: str = DEFAULT_DECODE_SHAPE, validate_graphs=True, quant_algo: str = DEFAULT_ALGO,
                 calibration=None, int8_weights=None, **opts) -> dict:
    """``quant_algo`` (int4; int8 is always rtn): rtn|hqq|gptq (export/quantize_onnx.py); ``calibration``: token
    id sequences for gptq (export/build.py reads them from ``--data``); ``int8_weights`` (int4): comma-separated
    weight kinds or name globs stored at 8 bits (mixed precision, export/quantize_onnx.py)."""
    global _ACTIVE_QUANTIZER
    if opts:
        raise FirstEdgeError(f"unknown option(s) for --target rpi: {', '.join(sorted(opts))} "
                             f"(known: decode_shape=fused|split|both, validate_graphs=0|1, "
                             f"quant_algo={'|'.join(ALGOS)}, int8_weights=KIND|GLOB,...)")
    if decode_shape not in DECODE_SHAPES:
        raise FirstEdgeError(f"decode_shape must be one of {', '.join(DECODE_SHAPES)}, got {decode_shape!r}")
    if quantize not in QUANT_BITS:
        raise FirstEdgeError(f"--quantize {quantize}: choose none, int8 or int4")
    if str(validate_graphs) in ("0", "false", "False", "no"):
        validate_graphs = False
    bits = QUANT_BITS[quantize]
    check_algo(quant_algo, bits, calibration)
    int8_patterns = parse_int8_weights(int8_weights, bits)
    check_int8_patterns(int8_patterns, fm.n_layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    weights = Weights(fm, max_context)
    models = {"prefill.onnx": lambda: build_prefill(weights, bits), "extend.onnx": lambda: build_extend(weights, bits)}
    graphs = {"prefill": "prefill.onnx", "extend": "extend.onnx"}
    if decode_shape in ("fused", "both"):
        models["decode.onnx"] = lambda: build_decode_fused(weights, bits)
        graphs["decode"] = "decode.onnx"
    if decode_shape in ("split", "both"):
        split = {}
        names = ["embed"] + [f"layer_{l}" for l in range(weights.L)] + ["head"]
        for name in names:  # built together, saved one by one (small graphs)
            models[f"{name}.onnx"] = (lambda n=name: (split or split.update(build_split(weights, bits)) or split).pop(n))
        graphs["split"] = {"embed": "embed.onnx", "layers": [f"layer_{l}.onnx" for l in range(weights.L)],
                           "head": "head.onnx"}
    quantizer = None if bits is None else Quantizer(bits, quant_algo, block=BLOCK_SIZE, fm=fm, calibration=calibration,
                                                    verbose=verbose, int8_weights=int8_patterns)
    _ACTIVE_QUANTIZER = quantizer
    try:
        files = save_shared(models, out)
    finally:
        _ACTIVE_QUANTIZER = None
    del models
    res = {
        "files": files,
        "decode_shape": decode_shape if decode_shape != "both" else DEFAULT_DECODE_SHAPE,
        "decode_shapes": ["fused", "split"] if decode_shape == "both" else [decode_shape],
        **graphs,
        "weights_index": WEIGHTS_INDEX,  # one weights.data for every graph, shared by the sessions
        "kv_layout": "BNSH",
        "kv_cache": "shared_buffer",  # past_key_values.{l}.* and present.{l}.* are one max_context buffer
        "opset": OPSET,
        "weights": "float32" if bits is None else f"MatMulNBits int{bits} block {BLOCK_SIZE} {quant_algo}, "
                                                  f"accuracy_level 4; embeddings GatherBlockQuantized int{bits} rtn"
                                                  + (f"; 8-bit rtn: {','.join(int8_patterns)}" if int8_patterns else ""),
        "dtype": "float32",
    }
    if quantizer is not None:
        res["quantizer"] = quantizer.describe()
    if verbose:
        print(f"[first-edge] ONNX graphs written in {time.time() - t0:.1f}s ({quantize}"
              f"{'' if quantizer is None else f' {quant_algo}, quantizer {quantizer.seconds:.1f}s'})", file=sys.stderr)
    if validate_graphs:
        t1 = time.time()
        if bits is not None:
            # the exact check runs on the fp32 graphs of the same export; the quantized graphs get a sanity check
            with tempfile.TemporaryDirectory() as td:
                fp = build_graphs(fm, td, quantize="none", max_context=max_context, verbose=False,
                                  decode_shape=decode_shape, validate_graphs=True)
                del fp
        validate(fm, out, res, max_context, bits, verbose)
        if verbose:
            print(f"[first-edge] ONNX graphs match PyTorch ({time.time() - t1:.1f}s)", file=sys.stderr)
    return res
