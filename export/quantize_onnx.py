"""Block-wise int8 / int4 weights for ``MatMulNBits`` / ``GatherBlockQuantized`` from ONNX Runtime's own quantizer
(issue 15, deliverable 3).

The graphs stay ours (export/onnx_export.py writes every node); only the numbers come from
``onnxruntime.quantization``: each torch Linear weight ``w`` [N, K] is handed, as ONNX's MatMul B = ``w.T``
[K, N], to one of the per-matrix cores of its ``MatMulNBitsQuantizer``:

``rtn``   ``DefaultWeightOnlyQuantizer.qbits_block_quant`` (the C++ ``quantize_matmul_4bits`` /
          ``quantize_matmul_8bits`` kernels, MatMulNBitsQuantizer's default algorithm), symmetric: no zero-point
          tensor, so the graph is the same as before and runs on the same kernel.
``hqq``   ``HQQWeightOnlyQuantizer.quantize_internal`` (half-quadratic optimisation of each block's zero point,
          data-free). ONNX Runtime's HQQ keeps float zero points, and ``MatMulNBits`` with float zero points has
          no pre-packed CPU kernel (measured on a 576x1536 weight: 2.3 ms a call instead of 31 us), so the
          optimised zero point is rounded to the uint8 grid and the block re-quantized with it.
``gptq``  the GPTQ core ``MatMulNBitsQuantizer`` runs for ``GPTQWeightOnlyQuantConfig``
          (``neural_compressor.weight_only.gptq``), with its error-feedback indexing fixed (see :func:`gptq`)
          and the grid of the symmetric ``rtn`` kernel, on each linear layer's Hessian ``2/n X^T X`` from the
          fp32 model's inputs to that layer over calibration prompts (the task data's train split, passed at
          build time).

Every graph asks for the same weight by the same name (prefill, extend, decode and the split graphs), so a
:class:`Quantizer` quantizes each name once and hands every graph the same bytes: the one shared
``weights.data`` (``save_shared``) keeps each tensor once. Embeddings (``GatherBlockQuantized``, read one row a
token) always use ``rtn``.

Mixed precision (``int8_weights``): the named int4 weights are stored as 8-bit ``MatMulNBits`` /
``GatherBlockQuantized`` (``rtn``'s 8-bit kernel, whatever the 4-bit algorithm), every other one stays 4-bit;
each weight still has one name and one copy, only its ``bits`` attribute differs.
"""
from __future__ import annotations

import fnmatch
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from runtime.errors import FirstEdgeError

ALGOS = ("rtn", "hqq", "gptq")
DEFAULT_ALGO = "rtn"
BLOCK_SIZE = 32
CALIB_PER_TASK = 4  # train prompts a task for GPTQ (spread over each file, seeded)
CALIB_MAX_TOKENS = 256  # prompt + reference completion, capped
GPTQ_PERCDAMP = 0.01
GPTQ_BLOCKSIZE = 128
# int8_weights=: short names for a kind of weight (the last part of the graph name); anything else is a glob over
# the full names (layers.{l}.attn.qkv_proj, layers.{l}.attn.o_proj, layers.{l}.mlp.gate_proj / up_proj / down_proj,
# lm_head, embed_tokens)
WEIGHT_KINDS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens")


@dataclass
class QWeight:
    """``MatMulNBits`` inputs for one weight: B uint8 [N, k_blocks, blob], scales float32 [N, k_blocks], zero
    points uint8 [N, ceil(k_blocks * bits / 8)] or None (the default 2^(bits-1))."""
    packed: np.ndarray
    scales: np.ndarray
    zero_points: Optional[np.ndarray]

    def dequantize(self, K: int, bits: int) -> np.ndarray:
        """The weight the graph computes with, as a torch Linear weight [N, K] (for tests and error checks)."""
        N, kb, _ = self.packed.shape
        q = _unpack(self.packed.reshape(N, -1), bits)[:, :kb * (self.packed.shape[2] * 8 // bits)]
        blk = q.shape[1] // kb
        if self.zero_points is None:
            zp = np.full((N, kb), 2 ** (bits - 1), np.float32)
        else:
            zp = _unpack(self.zero_points, bits)[:, :kb].astype(np.float32)
        deq = (q.reshape(N, kb, blk).astype(np.float32) - zp[..., None]) * self.scales[..., None]
        return deq.reshape(N, kb * blk)[:, :K]


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values (< 2^bits) [N, M] packed along the last axis, low-order bits first (MatMulNBits layout)."""
    q = q.astype(np.uint8)
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], -1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _unpack(p: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return p.astype(np.uint8)
    return np.stack([p & 15, p >> 4], -1).reshape(p.shape[:-1] + (-1,))


def _to_qweight(q: np.ndarray, scales: np.ndarray, zp: Optional[np.ndarray], bits: int, block: int) -> QWeight:
    """q uint [N, k_blocks * block] (zero-padded K), scales [N, k_blocks], integer zero points [N, k_blocks] or None."""
    N, kb = scales.shape
    packed = _pack(q, bits).reshape(N, kb, block * bits // 8)
    zpp = None if zp is None else np.ascontiguousarray(_pack(zp, bits))
    return QWeight(np.ascontiguousarray(packed), np.ascontiguousarray(scales, dtype=np.float32), zpp)


# ------------------------------------------------------------------ the algorithms (one weight matrix each)
def quantize_rtn(w: np.ndarray, bits: int, block: int = BLOCK_SIZE) -> QWeight:
    """ONNX Runtime's round-to-nearest kernels (symmetric) on a torch Linear weight ``w`` [N, K]."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits)
    packed, scales, _ = DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(np.ascontiguousarray(w.T, np.float32))
    return QWeight(np.ascontiguousarray(packed), np.ascontiguousarray(scales, np.float32), None)


def quantize_hqq(w: np.ndarray, bits: int, block: int = BLOCK_SIZE) -> QWeight:
    """ONNX Runtime's HQQ (zero points optimised per block), zero points rounded to the uint grid."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    hq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block, bits=bits))
    N, K = w.shape
    with torch.inference_mode():
        _, scale, zero = hq.quantize_internal(torch.from_numpy(np.ascontiguousarray(w, np.float32)), bits=bits,
                                              group_size=block, axis=1)
    scale, zero = scale.float().numpy(), zero.float().numpy()  # [N, k_blocks]: w ~ (q - zero) * scale
    qmax = 2 ** bits - 1
    zr = np.clip(np.rint(zero), 0, qmax)
    kb = scale.shape[1]
    wb = np.pad(w, ((0, 0), (0, kb * block - K))).reshape(N, kb, block).astype(np.float32)
    q = np.clip(np.rint(wb / scale[..., None] + zr[..., None]), 0, qmax)
    return _to_qweight(q.reshape(N, -1), scale, zr, bits, block)


def gptq(W: np.ndarray, H: np.ndarray, bits: int = 4, group_size: int = BLOCK_SIZE, blocksize: int = GPTQ_BLOCKSIZE,
         percdamp: float = GPTQ_PERCDAMP):
    """GPTQ of ``W`` [K, N] (ONNX MatMul B) with the Hessian ``H`` [K, K] of its input: ONNX Runtime's
    ``neural_compressor.weight_only.gptq`` (same damping, block loop and Hessian convention), with two changes:

    * the error feedback reads the upper Cholesky factor ``U`` of H^-1 by rows (``U[i, i+1:]`` within a block,
      ``U[i1:i2, i2:]`` to the later rows), as the GPTQ paper does; onnxruntime 1.32's copy reads it by columns
      (``Hinv1[i:, i]``, ``Hinv[i2:, i1:i2]``), which are zero below the diagonal, so its "GPTQ" never moves an
      unquantized weight and equals round-to-nearest on its grid (measured: identical output error at every
      damping and block size);
    * each group's grid is the one of ONNX Runtime's symmetric RTN kernel (scale = the group's largest-magnitude
      value / -2^(bits-1), zero point 2^(bits-1): no zero-point tensor, the same MatMulNBits kernel as ``rtn``),
      computed from the error-compensated weights when the group's first row is reached.

    Returns (q uint8 [K, N] in [0, 2^bits), scales float32 [k_blocks, N])."""
    W = np.array(W, np.float32)
    H = np.array(H, np.float64)
    K, N = W.shape
    half = 2 ** (bits - 1)
    blocksize = max(group_size, blocksize // group_size * group_size)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[dead, :] = 0
    H[np.arange(K), np.arange(K)] += percdamp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32)  # H^-1 = U^T U, U upper triangular
    kb = -(-K // group_size)
    q = np.empty((K, N), np.uint8)
    scales = np.ones((kb, N), np.float32)
    s = scales[0]
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[i1:i2].copy()
        U1 = U[i1:i2, i1:i2]
        Err1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            r = i1 + i
            if r % group_size == 0:
                g = W1[i:i + group_size]
                m = g[np.abs(g).argmax(axis=0), np.arange(N)]
                s = np.where(m != 0, m / -half, 1.0).astype(np.float32)
                scales[r // group_size] = s
            w = W1[i]
            qi = np.clip(np.rint(w / s) + half, 0, 2 * half - 1)
            q[r] = qi
            err = (w - (qi - half) * s) / U1[i, i]
            W1[i + 1:] -= np.outer(U1[i, i + 1:], err)
            Err1[i] = err
        W[i2:] -= U[i1:i2, i2:].T @ Err1
    return q, scales


def quantize_gptq(w: np.ndarray, H: np.ndarray, bits: int, block: int = BLOCK_SIZE) -> QWeight:
    """GPTQ (:func:`gptq`, symmetric, group = block) of a torch Linear weight ``w`` [N, K] with the Hessian ``H``
    [K, K] of its input."""
    N, K = w.shape
    q, scales = gptq(w.T, H, bits, block)
    kb = scales.shape[0]
    qp = np.full((N, kb * block), 2 ** (bits - 1), np.uint8)
    qp[:, :K] = q.T
    return _to_qweight(qp, scales.T, None, bits, block)


# ------------------------------------------------------------------ calibration (GPTQ)
def calibration_ids(data_dir, tok, end_id: int, per_task: int = CALIB_PER_TASK, seed: int = 0,
                    max_tokens: int = CALIB_MAX_TOKENS) -> List[np.ndarray]:
    """Chat-formatted train prompts followed by their reference completions, ``per_task`` a task spread over each
    task's train file (seeded), each capped at ``max_tokens`` tokens."""
    from .data import Encoder, load_split
    from .importance import spread_sample

    if not Path(data_dir).is_dir():
        raise FirstEdgeError(f"calibration data folder not found: {data_dir}")
    enc = Encoder(tok, end_id, max_prompt_tokens=max_tokens - 32, max_completion_tokens=32)
    seqs = []
    for task, recs in load_split(data_dir, "train").items():
        for r in spread_sample(recs, per_task, seed=seed):
            e = enc(r)
            seqs.append(np.asarray((e.prompt_ids + e.completion_ids)[:max_tokens], np.int64))
    if not seqs:
        raise FirstEdgeError(f"no train records for calibration in {data_dir}")
    return seqs


def hessians(fm, seqs: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
    """``2/n X^T X`` of the input X of every quantized linear layer (graph names: ``layers.{l}.attn.qkv_proj``,
    ``...o_proj``, ``...mlp.gate_proj``/``up_proj`` (one input), ``...down_proj``, ``lm_head``) over every
    position of ``seqs``, every layer kept, the fp32 model (ONNX Runtime's gptq_quantize also collects them from
    the unquantized model in one pass)."""
    import torch

    acc: Dict[str, "torch.Tensor"] = {}
    count = [0]

    def add(name, x):  # float32 sums in place (one [K, K] buffer a layer input), float64 at the end
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if name in acc:
            acc[name].addmm_(x.T, x)
        else:
            acc[name] = x.T @ x

    hooks = []
    for l, lay in enumerate(fm.layers):
        a, m = lay.self_attn, lay.mlp
        for mod, name in ((a.q_proj, f"layers.{l}.attn.qkv_proj"), (a.o_proj, f"layers.{l}.attn.o_proj"),
                          (m.gate_proj, f"layers.{l}.mlp.gate_proj"), (m.down_proj, f"layers.{l}.mlp.down_proj")):
            hooks.append(mod.register_forward_pre_hook(lambda _m, inp, n=name: add(n, inp[0])))  # noqa: B023
    try:
        with torch.inference_mode():
            for ids in seqs:
                t = torch.from_numpy(np.asarray(ids, np.int64)).view(1, -1)
                cos, sin = fm.rope(torch.arange(t.shape[1]).view(1, -1))
                h = fm.embed(t)
                for l in range(fm.n_layers):
                    h = fm.layer(l, h, cos, sin)[0]
                add("lm_head", fm.base.norm(h))
                count[0] += t.shape[1]
    finally:
        for hk in hooks:
            hk.remove()
    n = max(count[0], 1)
    out = {k: v.to(torch.float64).numpy() * (2.0 / n) for k, v in acc.items()}
    for l in range(fm.n_layers):
        out[f"layers.{l}.mlp.up_proj"] = out[f"layers.{l}.mlp.gate_proj"]
    return out


# ------------------------------------------------------------------ one quantizer a build
class Quantizer:
    """Quantizes each named weight once for every graph of a build (same name -> same bytes)."""

    def __init__(self, bits: int, algo: str = DEFAULT_ALGO, block: int = BLOCK_SIZE, fm=None,
                 calibration: Optional[Sequence[np.ndarray]] = None, verbose: bool = False,
                 int8_weights: Optional[str] = None):
        check_algo(algo, bits, calibration)
        self.bits, self.algo, self.block = bits, algo, block
        self.int8_patterns = parse_int8_weights(int8_weights, bits)
        self.int8_names: List[str] = []
        self.verbose = verbose
        self._cache: Dict[str, QWeight] = {}
        self._src: Dict[str, tuple] = {}
        self._h: Optional[Dict[str, np.ndarray]] = None
        self.seconds = 0.0
        self.calib_tokens = 0
        if algo == "gptq":
            if fm is None:
                raise FirstEdgeError("--quant-algo gptq needs the model to collect calibration activations")
            t0 = time.time()
            self._h = hessians(fm, calibration)
            self.calib_tokens = int(sum(len(s) for s in calibration))
            self.calib_prompts = len(calibration)
            self.seconds += time.time() - t0

    def bits_for(self, name: str) -> int:
        """8 for a weight ``int8_weights`` names, else the build's bits."""
        return 8 if self.int8_patterns and weight_matches(name, self.int8_patterns) else self.bits

    def linear(self, name: str, w: np.ndarray) -> QWeight:
        """The quantized form of the torch Linear weight ``w`` [N, K] the graphs call ``name`` (with
        :meth:`bits_for` ``name`` bits)."""
        key = (w.shape, float(w.reshape(-1)[:: max(1, w.size // 64)].sum()))
        if name in self._cache:
            if self._src[name] != key:
                raise FirstEdgeError(f"ONNX export: weight {name} quantized twice with different values")
            return self._cache[name]
        t0 = time.time()
        if self.bits_for(name) != self.bits:
            qw = quantize_rtn(w, self.bits_for(name), self.block)
            self.int8_names.append(name)
        elif self.algo == "hqq":
            qw = quantize_hqq(w, self.bits, self.block)
        elif self.algo == "gptq":
            if name not in self._h:
                raise FirstEdgeError(f"ONNX export: no calibration activations for {name}")
            qw = quantize_gptq(w, self._h[name], self.bits, self.block)
        else:
            qw = quantize_rtn(w, self.bits, self.block)
        self.seconds += time.time() - t0
        if self.verbose and self.algo != "rtn" and name.endswith("down_proj"):
            print(f"[first-edge] {self.algo}: {name.rsplit('.', 2)[0]} quantized ({self.seconds:.0f}s so far)",
                  file=sys.stderr)
        self._cache[name], self._src[name] = qw, key
        return qw

    def embedding(self, name: str, table: np.ndarray) -> QWeight:
        """The embedding table [V, D] for GatherBlockQuantized (rows quantized along D, always ``rtn``)."""
        if name not in self._cache:
            self._cache[name] = quantize_rtn(table, self.bits_for(name), self.block)
            self._src[name] = None
            if self.bits_for(name) != self.bits:
                self.int8_names.append(name)
        return self._cache[name]

    def describe(self) -> dict:
        d = {"algorithm": self.algo, "bits": self.bits, "block_size": self.block,
             "symmetric": self.algo != "hqq", "library": "onnxruntime.quantization " + _ort_version(),
             "embeddings": "rtn"}
        if self.int8_patterns:
            d["int8_weights"] = {"rule": ",".join(self.int8_patterns), "algorithm": "rtn", "bits": 8,
                                 "names": sorted(self.int8_names)}
        if self.algo == "gptq":
            d["calibration"] = {"prompts": self.calib_prompts, "tokens": self.calib_tokens, "split": "train",
                                "percdamp": GPTQ_PERCDAMP, "blocksize": GPTQ_BLOCKSIZE}
        return d


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def check_algo(algo, bits: Optional[int], calibration=None) -> None:
    """One-line errors for an algorithm that does not exist, does not apply, or lacks calibration data."""
    if algo not in ALGOS:
        raise FirstEdgeError(f"unknown --quant-algo {algo!r} (choose from {', '.join(ALGOS)})")
    if bits is None and algo != DEFAULT_ALGO:
        raise FirstEdgeError(f"--quant-algo {algo} needs --quantize int4")
    if bits == 8 and algo != "rtn":
        raise FirstEdgeError(f"--quant-algo {algo} is for --quantize int4 (int8 uses rtn)")
    if algo == "gptq" and not calibration:
        raise FirstEdgeError("--quant-algo gptq needs calibration prompts: pass --data DIR (the task data folder)")


def parse_int8_weights(spec, bits: Optional[int]) -> tuple:
    """``int8_weights=`` (comma-separated kinds or globs over weight names, see ``WEIGHT_KINDS``) as a tuple of
    patterns; one-line errors for an empty entry, a character outside names and globs, or a build without int4."""
    if spec is None or spec == "" or (isinstance(spec, (list, tuple)) and not spec):
        return ()
    items = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    if bits != 4:
        raise FirstEdgeError(f"int8_weights={','.join(items)} is for --quantize int4 (8-bit copies of some int4 weights)")
    for p in items:
        if not p or not all(c.isalnum() or c in "._*?[]-" for c in p):
            raise FirstEdgeError(f"int8_weights={','.join(items)}: bad entry {p!r} (comma-separated kinds "
                                 f"{', '.join(WEIGHT_KINDS)} or globs over names like layers.0.mlp.down_proj)")
    return tuple(items)


def weight_matches(name: str, patterns: Sequence[str]) -> bool:
    """``name`` (e.g. layers.3.mlp.down_proj) is a kind in ``patterns`` or matches one of its globs."""
    kind = name.rsplit(".", 1)[-1]
    return any(p == kind if p in WEIGHT_KINDS else fnmatch.fnmatchcase(name, p) for p in patterns)


def quantized_names(n_layers: int) -> List[str]:
    """The names of every weight an int4 build quantizes (the graph names)."""
    names = [f"layers.{l}.{k}" for l in range(n_layers)
             for k in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return names + ["lm_head", "embed_tokens"]


def check_int8_patterns(patterns: Sequence[str], n_layers: int) -> None:
    """Every pattern names at least one weight of the model (one-line error otherwise)."""
    names = quantized_names(n_layers)
    for p in patterns:
        if not any(weight_matches(n, (p,)) for n in names):
            raise FirstEdgeError(f"int8_weights: {p!r} matches no weight of this model (kinds: {', '.join(WEIGHT_KINDS)}; "
                                 f"names like layers.0.mlp.down_proj, layers.{n_layers - 1}.*)")
