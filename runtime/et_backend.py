"""ExecuTorch backend of the generation loop (Python, ``executorch.runtime``).

Runs a bundle's ``model.pte``: ``prefill`` once, then per token ``embed``, the kept ``layer_{l}`` methods
only, and ``head``. The backend owns one K and one V buffer per layer, ``[max_context, n_kv, head_dim]``
(sequence-major), allocated once; ``layer_{l}`` reads the first S positions as a zero-copy view (graph
inputs are not memory-planned in our .pte, so ExecuTorch reads the caller's memory directly) and the new
token's entry is written in place afterwards.

Note on torch: ExecuTorch's Python bindings import torch themselves (the wheel's extension needs its
symbols) and exchange torch tensors. This module is the only place in ``runtime/`` that touches torch,
and only through the module object ExecuTorch already loaded, to wrap numpy buffers without copying.
The device's C++ runner (runtime/cpp) has no such dependency.
"""
from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from .bundle import Bundle
from .errors import FirstEdgeError, first_line
from .graph_io import Dims, check_io, index, kv_names
from .masks import check_mask

_RT = None


def _runtime(threads: Optional[int] = None):
    """(executorch Runtime, torch module), imported once; sets the XNNPACK thread pool size."""
    global _RT
    if _RT is None:
        try:
            from executorch.runtime import Runtime
            import executorch.extension.pybindings.portable_lib as pl
        except ImportError as e:
            raise FirstEdgeError(f"the ExecuTorch Python runtime is not installed ({e}); pip install executorch") from None
        _RT = (Runtime.get(), importlib.import_module("torch"), pl)
    rt, th, pl = _RT
    if threads:
        th.set_num_threads(1)  # torch is only glue here (see docs/executorch.md: thread effects)
        try:
            pl._unsafe_reset_threadpool(int(threads))
        except Exception:  # noqa: BLE001 - older wheels: keep the default pool
            pass
    return rt, th


SCALAR_TYPES = {"int32": 3, "int64": 4, "float32": 6, "bool": 11}  # ExecuTorch ScalarType codes


class EtProgram:
    """The .pte's methods plus runtime-owned per-layer KV buffers; counts decode layer calls.

    ``io`` is the graph I/O contract (runtime/graph_io.py; from the manifest's ``graphs.io``): every method's
    signature is checked against it when loading, and arguments and results are placed by name from it."""

    def __init__(self, pte, dims: Dims, io: dict, threads: Optional[int] = None, methods: Optional[dict] = None):
        rt, th = _runtime(threads)
        self.th = th
        self.io = io
        self.n_layers, self.max_context = dims.n_layers, dims.max_context
        self.n_kv, self.hd, self.vocab_size = dims.n_kv_heads, dims.head_dim, dims.vocab_size
        try:
            self.program = rt.load_program(Path(pte))
        except Exception as e:  # noqa: BLE001
            raise FirstEdgeError(f"ExecuTorch cannot load {pte}: {first_line(e, 200)}") from None
        m = methods or {"prefill": "prefill", "embed": "embed", "head": "head",
                        "layers": [f"layer_{l}" for l in range(self.n_layers)]}
        if not (isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("prefill", "embed", "head"))
                and isinstance(m.get("layers"), list) and all(isinstance(x, str) for x in m["layers"])):
            raise FirstEdgeError("manifest graphs.methods must name the prefill, embed and head methods and list "
                                 "the layer methods")
        have = set(self.program.method_names)
        need = [m["prefill"], m["embed"], m["head"]] + list(m["layers"])
        missing = [n for n in need if n not in have]
        if missing:
            raise FirstEdgeError(f"model.pte lacks the method(s) {', '.join(missing[:5])} named in the manifest")
        if len(m["layers"]) != self.n_layers:
            raise FirstEdgeError(f"manifest lists {len(m['layers'])} layer methods for {self.n_layers} layers")
        for const, want in (("get_n_layers", self.n_layers), ("get_max_context_len", self.max_context),
                            ("get_vocab_size", self.vocab_size)):
            got = self._const(const)
            if got is not None and got != want:
                raise FirstEdgeError(f"model.pte says {const} = {got}, the manifest says {want} "
                                     f"(bundle dims do not match the graphs)")
        def load(name):
            try:
                return self.program.load_method(name)
            except Exception as e:  # noqa: BLE001  (a damaged program fails here)
                raise FirstEdgeError(f"ExecuTorch cannot load method {name} of {Path(pte).name}: {first_line(e)}") from None

        self.prefill_m = self._checked(load(m["prefill"]), "prefill", m["prefill"])
        self.embed_m = self._checked(load(m["embed"]), "embed", m["embed"])
        self.head_m = self._checked(load(m["head"]), "head", m["head"])
        self.layer_m = [self._checked(load(n), "layer", n) for n in m["layers"]]
        # extend (a chat session's next turn) is loaded on first use: XNNPACK packs its own copy of the weights
        self._extend_name = m.get("extend", "extend")
        if not isinstance(self._extend_name, str) or self._extend_name not in have:
            raise FirstEdgeError(f"model.pte lacks the extend method named in the manifest ({self._extend_name!r})")
        self._load = load
        self.extend_m = None
        # where each argument goes and each result comes from, by name
        self._pre_in = index(io["prefill"]["inputs"])
        self._pre_out = index(io["prefill"]["outputs"])
        emb_out, lay_in, lay_out = index(io["embed"]["outputs"]), index(io["layer"]["inputs"]), index(io["layer"]["outputs"])
        head_in = index(io["head"]["inputs"])
        self._emb = (emb_out["hidden_states"], emb_out["cos"], emb_out["sin"])
        self._lay = (lay_in["hidden_states"], lay_in["cos"], lay_in["sin"], lay_in["past_key_values.{l}.key"],
                     lay_in["past_key_values.{l}.value"])
        self._lay_out = (lay_out["hidden_states_out"], lay_out["present.{l}.key"], lay_out["present.{l}.value"])
        self._head = (head_in["hidden_states"], index(io["head"]["outputs"])["logits"])
        # argument lists reused by every decode step (filled in place)
        self._layer_args, self._head_args = [None] * len(lay_in), [None] * len(head_in)
        shape = (self.max_context, self.n_kv, self.hd)
        self.k = [np.zeros(shape, np.float32) for _ in range(self.n_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(self.n_layers)]
        self.kt = [th.from_numpy(b) for b in self.k]  # torch views of the same memory (no copy)
        self.vt = [th.from_numpy(b) for b in self.v]
        self.lengths = [0] * self.n_layers
        self.layer_calls = Counter()
        self.method_calls = Counter()
        self._tok = th.zeros((1, 1), dtype=th.int64)
        self._pos = th.zeros((1,), dtype=th.int64)
        self._embed_args = self._args(index(io["embed"]["inputs"]), input_ids=self._tok, position=self._pos)

    def _checked(self, method, graph: str, name: str):
        """``method``'s inputs and outputs have the count, dtypes and fixed sizes the I/O contract declares."""
        meta = method.metadata
        for side, n, tensor_meta in (("inputs", meta.num_inputs(), meta.input_tensor_meta),
                                     ("outputs", meta.num_outputs(), meta.output_tensor_meta)):
            specs = self.io[graph][side]
            if n != len(specs):
                raise FirstEdgeError(f"bundle dims do not match the graphs: method {name} has {n} {side}, the "
                                     f"manifest declares {len(specs)} (n_layers={self.n_layers})")
            for i, spec in enumerate(specs):
                tm = tensor_meta(i)
                sizes = [int(x) for x in tm.sizes()]
                if int(tm.dtype()) != SCALAR_TYPES[spec.dtype] or len(sizes) != len(spec.shape) or any(
                        isinstance(d, int) and d != s for d, s in zip(spec.shape, sizes)):
                    raise FirstEdgeError(f"bundle dims do not match the graphs: method {name} {side[:-1]} {spec.name} "
                                         f"is {sizes}, the manifest says {spec.dtype} {list(spec.shape)}")
        return method

    def _const(self, name):
        if name not in self.program.method_names:
            return None
        try:
            out = self.program.load_method(name).execute([])
            return int(out[0])
        except Exception:  # noqa: BLE001
            return None

    @staticmethod
    def _args(pos: dict, **values) -> list:
        args = [None] * len(pos)
        for name, v in values.items():
            args[pos[name]] = v
        return args

    def prefill(self, input_ids: np.ndarray, threshold: float):
        th = self.th
        ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64).reshape(1, -1))
        T = ids.shape[1]
        if not 1 <= T < self.max_context:
            raise FirstEdgeError(f"prompt of {T} tokens does not fit the context of {self.max_context}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise FirstEdgeError(f"token ids must be in 0..{self.vocab_size - 1}")
        try:
            out = self.prefill_m.execute(self._args(self._pre_in, input_ids=th.from_numpy(ids),
                                                    threshold=th.tensor([float(threshold)], dtype=th.float32)))
        except Exception as e:  # noqa: BLE001  (a damaged program can fail only when it runs)
            raise FirstEdgeError(f"the prefill method failed: {first_line(e)}") from None
        self.method_calls["prefill"] += 1
        o = self._pre_out
        for l in range(self.n_layers):
            # present [1, n_kv, T, hd] -> sequence-major buffer rows 0..T-1 (once per prompt)
            self.k[l][:T] = out[o[f"present.{l}.key"]].numpy()[0].transpose(1, 0, 2)
            self.v[l][:T] = out[o[f"present.{l}.value"]].numpy()[0].transpose(1, 0, 2)
            self.lengths[l] = T
        self.layer_calls.clear()
        logits = out[o["logits"]].numpy().reshape(-1).astype(np.float32, copy=True)
        return (logits, out[o["router_scores"]].numpy().astype(np.float32, copy=True),
                out[o["layer_mask"]].numpy().astype(bool, copy=True))

    def load_extend(self) -> None:
        """Load the extend method now (a chat session does, so its second turn does not pay for it)."""
        if self.extend_m is None:
            self.extend_m = self._checked(self._load(self._extend_name), "extend", self._extend_name)
            self._ext_in, self._ext_out = index(self.io["extend"]["inputs"]), index(self.io["extend"]["outputs"])

    def extend(self, input_ids: np.ndarray, past_length: int):
        """A chat session's next turn: the new tokens through every layer after ``past_length`` tokens that every
        layer's buffer holds; their K/V are written at rows past_length.. (entries a decode left there are
        overwritten). Returns the last position's logits [V] and the router probabilities [L, T]."""
        th = self.th
        ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64).reshape(1, -1))
        T, S = ids.shape[1], int(past_length)
        if T < 1 or not 0 < S <= min(self.lengths) or S + T > self.max_context:
            raise FirstEdgeError(f"cannot extend {S} cached tokens by {T} within the context of {self.max_context}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise FirstEdgeError(f"token ids must be in 0..{self.vocab_size - 1}")
        self.load_extend()
        args = [None] * len(self._ext_in)
        args[self._ext_in["input_ids"]] = th.from_numpy(ids)
        for l in range(self.n_layers):
            pk, pv, _, _ = kv_names(l)
            args[self._ext_in[pk]], args[self._ext_in[pv]] = self.kt[l][None, :S], self.vt[l][None, :S]
        try:
            out = self.extend_m.execute(args)
        except Exception as e:  # noqa: BLE001  (a damaged program can fail only when it runs)
            raise FirstEdgeError(f"the extend method failed: {first_line(e)}") from None
        self.method_calls["extend"] += 1
        o = self._ext_out
        for l in range(self.n_layers):
            _, _, rk, rv = kv_names(l)
            self.k[l][S:S + T] = out[o[rk]].numpy()[0]
            self.v[l][S:S + T] = out[o[rv]].numpy()[0]
            self.lengths[l] = S + T
        self.layer_calls.clear()
        return (out[o["logits"]].numpy().reshape(-1).astype(np.float32, copy=True),
                out[o["router_probs"]].numpy().astype(np.float32, copy=True))

    def decode(self, token: int, position: int, mask: np.ndarray) -> np.ndarray:
        try:
            return self._decode(token, position, mask)
        except FirstEdgeError:
            raise
        except Exception as e:  # noqa: BLE001  (a damaged program can fail only when it runs)
            raise FirstEdgeError(f"a decode method failed: {first_line(e)}") from None

    def _decode(self, token: int, position: int, mask: np.ndarray) -> np.ndarray:
        if not 0 <= position < self.max_context:
            raise FirstEdgeError(f"position {position} is outside the context of {self.max_context}")
        if not 0 <= token < self.vocab_size:
            raise FirstEdgeError(f"token id {token} is outside the vocabulary (0..{self.vocab_size - 1})")
        self._tok[0, 0] = int(token)
        self._pos[0] = int(position)
        e = self.embed_m.execute(self._embed_args)
        h = e[self._emb[0]]
        args = self._layer_args
        ph, pcos, psin, pk, pv = self._lay
        oh, ok, ov = self._lay_out
        args[pcos], args[psin] = e[self._emb[1]], e[self._emb[2]]
        for l in np.flatnonzero(mask):
            n = self.lengths[l]
            args[ph], args[pk], args[pv] = h, self.kt[l][None, :n], self.vt[l][None, :n]
            r = self.layer_m[l].execute(args)
            h = r[oh]
            self.k[l][n] = r[ok].numpy().reshape(self.n_kv, self.hd)  # in place, one entry
            self.v[l][n] = r[ov].numpy().reshape(self.n_kv, self.hd)
            self.lengths[l] = n + 1
            self.layer_calls[int(l)] += 1
        self._head_args[self._head[0]] = h
        logits = self.head_m.execute(self._head_args)[self._head[1]]
        return logits.numpy().reshape(-1)


class EtBackend:
    """Backend protocol of runtime.loop for an ExecuTorch bundle."""

    def __init__(self, bundle: Bundle, threads: int = 2, **opts):
        if opts:
            raise FirstEdgeError(f"unknown ExecuTorch backend option(s): {', '.join(sorted(opts))}")
        g = bundle.graphs
        if g.get("decode_shape", "split") != "split":
            raise FirstEdgeError(f"ExecuTorch bundles need decode_shape 'split', the manifest says {g.get('decode_shape')!r}")
        files = g.get("files") or []
        if not files:
            raise FirstEdgeError("manifest lists no graph file for the ExecuTorch bundle")
        dims = Dims.from_model(bundle.model)
        io = check_io(g.get("io"), "executorch", dims, ["split"])
        self.n_layers = bundle.n_layers
        self.max_context = bundle.max_context
        self.prog = EtProgram(bundle.file(files[0]), dims, io, threads=threads, methods=g.get("methods"))

    @property
    def layer_calls(self):
        return self.prog.layer_calls

    def prefill(self, input_ids: np.ndarray, threshold: float):
        return self.prog.prefill(input_ids, threshold)

    def load_extend(self) -> None:
        self.prog.load_extend()

    def extend(self, input_ids: np.ndarray, past_length: int):
        return self.prog.extend(input_ids, past_length)

    def decode(self, token: int, position: int, mask: np.ndarray) -> np.ndarray:
        mask = check_mask(mask, self.n_layers)
        return self.prog.decode(token, position, mask)
