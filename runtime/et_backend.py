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
from .errors import FirstEdgeError
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


class EtProgram:
    """The .pte's methods plus runtime-owned per-layer KV buffers; counts decode layer calls."""

    def __init__(self, pte, n_layers: int, max_context: int, threads: Optional[int] = None,
                 n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None, methods: Optional[dict] = None,
                 vocab_size: Optional[int] = None):
        rt, th = _runtime(threads)
        self.th = th
        self.n_layers, self.max_context = int(n_layers), int(max_context)
        try:
            self.program = rt.load_program(Path(pte))
        except Exception as e:  # noqa: BLE001
            raise FirstEdgeError(f"ExecuTorch cannot load {pte}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
        m = methods or {"prefill": "prefill", "embed": "embed", "head": "head",
                        "layers": [f"layer_{l}" for l in range(self.n_layers)]}
        have = set(self.program.method_names)
        need = [m["prefill"], m["embed"], m["head"]] + list(m["layers"])
        missing = [n for n in need if n not in have]
        if missing:
            raise FirstEdgeError(f"model.pte lacks the method(s) {', '.join(missing[:5])} named in the manifest")
        if len(m["layers"]) != self.n_layers:
            raise FirstEdgeError(f"manifest lists {len(m['layers'])} layer methods for {self.n_layers} layers")
        consts = self._const("get_n_layers"), self._const("get_max_context_len")
        if consts[0] is not None and consts[0] != self.n_layers:
            raise FirstEdgeError(f"model.pte has {consts[0]} layers, the manifest says {self.n_layers}")
        if consts[1] is not None and consts[1] != self.max_context:
            raise FirstEdgeError(f"model.pte was built for max_context {consts[1]}, the manifest says {self.max_context}")
        load = self.program.load_method
        self.prefill_m = load(m["prefill"])
        self.embed_m = load(m["embed"])
        self.head_m = load(m["head"])
        self.layer_m = [load(n) for n in m["layers"]]
        # dims from the graph itself (layer input 3 = past key [1, S, n_kv, hd])
        meta = self.layer_m[0].metadata.input_tensor_meta(3)
        nkv, hd = int(meta.sizes()[2]), int(meta.sizes()[3])
        if (n_kv_heads and nkv != n_kv_heads) or (head_dim and hd != head_dim):
            raise FirstEdgeError(f"model.pte K/V are [{nkv} heads, {hd}] but the manifest says "
                                 f"[{n_kv_heads}, {head_dim}]")
        self.n_kv, self.hd = nkv, hd
        vmeta = self.head_m.metadata.output_tensor_meta(0)
        self.vocab_size = int(vmeta.sizes()[-1])
        if vocab_size and vocab_size != self.vocab_size:
            raise FirstEdgeError(f"model.pte has a vocabulary of {self.vocab_size}, the manifest says {vocab_size}")
        shape = (self.max_context, nkv, hd)
        self.k = [np.zeros(shape, np.float32) for _ in range(self.n_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(self.n_layers)]
        self.kt = [th.from_numpy(b) for b in self.k]  # torch views of the same memory (no copy)
        self.vt = [th.from_numpy(b) for b in self.v]
        self.lengths = [0] * self.n_layers
        self.layer_calls = Counter()
        self.method_calls = Counter()
        self._tok = th.zeros((1, 1), dtype=th.int64)
        self._pos = th.zeros((1,), dtype=th.int64)

    def _const(self, name):
        if name not in self.program.method_names:
            return None
        try:
            out = self.program.load_method(name).execute([])
            return int(out[0])
        except Exception:  # noqa: BLE001
            return None

    def prefill(self, input_ids: np.ndarray, threshold: float):
        th = self.th
        ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64).reshape(1, -1))
        T = ids.shape[1]
        if not 1 <= T < self.max_context:
            raise FirstEdgeError(f"prompt of {T} tokens does not fit the context of {self.max_context}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise FirstEdgeError(f"token ids must be in 0..{self.vocab_size - 1}")
        out = self.prefill_m.execute([th.from_numpy(ids), th.tensor([float(threshold)], dtype=th.float32)])
        self.method_calls["prefill"] += 1
        L = self.n_layers
        for l in range(L):
            # present [1, n_kv, T, hd] -> sequence-major buffer rows 0..T-1 (once per prompt)
            self.k[l][:T] = out[3 + 2 * l].numpy()[0].transpose(1, 0, 2)
            self.v[l][:T] = out[4 + 2 * l].numpy()[0].transpose(1, 0, 2)
            self.lengths[l] = T
        self.layer_calls.clear()
        logits = out[0].numpy().reshape(-1).astype(np.float32, copy=True)
        return logits, out[1].numpy().astype(np.float32, copy=True), out[2].numpy().astype(bool, copy=True)

    def decode(self, token: int, position: int, mask: np.ndarray) -> np.ndarray:
        if not 0 <= position < self.max_context:
            raise FirstEdgeError(f"position {position} is outside the context of {self.max_context}")
        if not 0 <= token < self.vocab_size:
            raise FirstEdgeError(f"token id {token} is outside the vocabulary (0..{self.vocab_size - 1})")
        self._tok[0, 0] = int(token)
        self._pos[0] = int(position)
        h, cos, sin = self.embed_m.execute([self._tok, self._pos])
        for l in np.flatnonzero(mask):
            n = self.lengths[l]
            h, k, v = self.layer_m[l].execute([h, cos, sin, self.kt[l][None, :n], self.vt[l][None, :n]])
            self.k[l][n] = k.numpy().reshape(self.n_kv, self.hd)  # in place, one entry
            self.v[l][n] = v.numpy().reshape(self.n_kv, self.hd)
            self.lengths[l] = n + 1
            self.layer_calls[int(l)] += 1
        logits = self.head_m.execute([h])[0]
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
        model = bundle.model
        self.n_layers = bundle.n_layers
        self.max_context = bundle.max_context
        self.prog = EtProgram(bundle.file(files[0]), n_layers=self.n_layers, max_context=self.max_context,
                              threads=threads, n_kv_heads=model.get("n_kv_heads"), head_dim=model.get("head_dim"),
                              methods=g.get("methods"), vocab_size=model.get("vocab_size"))

    @property
    def layer_calls(self):
        return self.prog.layer_calls

    def prefill(self, input_ids: np.ndarray, threshold: float):
        return self.prog.prefill(input_ids, threshold)

    def decode(self, token: int, position: int, mask: np.ndarray) -> np.ndarray:
        mask = check_mask(mask, self.n_layers)
        return self.prog.decode(token, position, mask)
