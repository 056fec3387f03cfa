"""The graph I/O contract (DESIGN.md section 2), declared once: the name, dtype and shape of every input
and output of every graph a bundle holds, for a model's dims, a target and its decode shape(s).

Who reads it:

* the exporters (``export/onnx_export.py``, ``export/et_export.py``) build their graphs' signatures from
  :func:`graph_io` (ONNX value infos; ExecuTorch example inputs and dynamic dims);
* ``export/build.py`` writes it into the manifest as ``graphs.io`` (one schema for both targets):
  ``{graph: {"inputs": [{"name", "dtype", "shape"}, ...], "outputs": [...]}}``;
* every runtime (ONNX Runtime, ExecuTorch Python, the C++ runner) reads ``graphs.io`` from the
  manifest, checks it against this contract (:func:`check_io`) and binds by name: an input's or
  output's position is its index in the manifest's list, never a hard-coded number.

Graphs: ``prefill`` (both targets), ``extend`` (both targets: prefill with a past, the chat session's turns,
DESIGN.md section 2), ``decode`` (ONNX fused shape), ``embed``, ``layer``, ``head`` (split shape; ExecuTorch
always). ``layer`` describes every ``layer_{l}`` graph/method: in its names ``{l}``
stands for the layer index (:func:`layer_names`). Shapes hold ints or a symbol: ``T`` the prompt's
tokens (1..max_context-1), ``S`` the tokens already in a layer's cache (ExecuTorch ``layer_{l}`` and ``extend``).

No torch, no onnx: numpy-free plain Python, shared by host and device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple, Union

from .errors import FirstEdgeError

DTYPES = ("int64", "int32", "float32", "bool")
SYMBOLS = ("T", "S")
TARGET_RUNTIMES = {"onnxruntime": "onnx", "executorch": "executorch"}
Dim = Union[int, str]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: Tuple[Dim, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def static_shape(self, **symbols: int) -> Tuple[int, ...]:
        """The shape with its symbols replaced (e.g. ``T=5``)."""
        return tuple(symbols[d] if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class Dims:
    n_layers: int
    hidden_size: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int

    @classmethod
    def from_model(cls, model: Mapping) -> "Dims":
        """From a manifest's ``model`` section (or any mapping with these keys)."""
        return cls(*(int(model[k]) for k in ("n_layers", "hidden_size", "n_kv_heads", "head_dim", "vocab_size",
                                             "max_context")))


def model_dims(fm, max_context: int) -> Dims:
    """Dims of a model object with ``n_layers``, ``hidden_size``, ``n_kv_heads``, ``head_dim``, ``vocab_size``
    attributes (export's FirstModel), for a bundle of ``max_context`` tokens."""
    return Dims(int(fm.n_layers), int(fm.hidden_size), int(fm.n_kv_heads), int(fm.head_dim), int(fm.vocab_size),
                int(max_context))


def _t(name: str, dtype: str, *shape: Dim) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def kv_names(l: int) -> Tuple[str, str, str, str]:
    """past key, past value, present key, present value of layer ``l`` (Optimum's decoder names)."""
    return (f"past_key_values.{l}.key", f"past_key_values.{l}.value", f"present.{l}.key", f"present.{l}.value")


def layer_names(spec: Sequence[TensorSpec], l: int) -> List[str]:
    """The names of a ``layer`` entry for layer ``l``."""
    return [s.name.replace("{l}", str(l)) for s in spec]


def graph_io(runtime: str, d: Dims, decode_shapes: Iterable[str] = ("split",)) -> Dict[str, Dict[str, List[TensorSpec]]]:
    """Every graph's inputs and outputs for ``runtime`` (``onnxruntime`` | ``executorch``)."""
    if runtime not in TARGET_RUNTIMES:
        raise FirstEdgeError(f"unknown runtime {runtime!r} (known: {', '.join(TARGET_RUNTIMES)})")
    L, D, KV, hd, V, C = d.n_layers, d.hidden_size, d.n_kv_heads, d.head_dim, d.vocab_size, d.max_context
    shapes = set(decode_shapes)
    present_prefill = [s for l in range(L) for s in (_t(f"present.{l}.key", "float32", 1, KV, "T", hd),
                                                      _t(f"present.{l}.value", "float32", 1, KV, "T", hd))]
    io = {"prefill": {"inputs": [_t("input_ids", "int64", 1, "T"), _t("threshold", "float32", 1)],
                      "outputs": [_t("logits", "float32", 1, V), _t("router_scores", "float32", L),
                                  _t("layer_mask", "bool", L)] + present_prefill}}
    head = {"inputs": [_t("hidden_states", "float32", 1, 1, D)], "outputs": [_t("logits", "float32", 1, V)]}
    # extend: T new tokens after a past of S tokens in every layer; every layer runs; router_probs are the
    # per-token scores p[l, t] of the new tokens (the runtime pools them: the turn's pooled span is its own)
    extend_out = [_t("logits", "float32", 1, V), _t("router_probs", "float32", L, "T")]
    if runtime == "executorch":
        io["extend"] = {
            "inputs": [_t("input_ids", "int64", 1, "T")] + [
                _t(n, "float32", 1, "S", KV, hd) for l in range(L) for n in kv_names(l)[:2]],
            "outputs": extend_out + [_t(n, "float32", 1, "T", KV, hd) for l in range(L) for n in kv_names(l)[2:]]}
        # KV buffers are sequence-major [max_context, n_kv, hd]; a layer reads its first S rows as a view
        # and returns the new token's entry, which the runtime writes in place
        io["embed"] = {"inputs": [_t("input_ids", "int64", 1, 1), _t("position", "int64", 1)],
                       "outputs": [_t("hidden_states", "float32", 1, 1, D), _t("cos", "float32", 1, 1, hd),
                                   _t("sin", "float32", 1, 1, hd)]}
        io["layer"] = {"inputs": [_t("hidden_states", "float32", 1, 1, D), _t("cos", "float32", 1, 1, hd),
                                  _t("sin", "float32", 1, 1, hd),
                                  _t("past_key_values.{l}.key", "float32", 1, "S", KV, hd),
                                  _t("past_key_values.{l}.value", "float32", 1, "S", KV, hd)],
                       "outputs": [_t("hidden_states_out", "float32", 1, 1, D),
                                   _t("present.{l}.key", "float32", 1, 1, KV, hd),
                                   _t("present.{l}.value", "float32", 1, 1, KV, hd)]}
        io["head"] = head
        return io
    # ONNX Runtime: BNSH buffers [1, n_kv, max_context, hd], bound both as past and present (in place)
    kv = lambda n: _t(n, "float32", 1, KV, C, hd)  # noqa: E731
    io["extend"] = {  # the buffers bound in place as past and present, as in decode; S = past_length
        "inputs": [_t("input_ids", "int64", 1, "T"), _t("past_length", "int32", 1)] + [
            kv(n) for l in range(L) for n in kv_names(l)[:2]],
        "outputs": extend_out + [kv(n) for l in range(L) for n in kv_names(l)[2:]]}
    if "fused" in shapes:
        io["decode"] = {
            "inputs": [_t("input_ids", "int64", 1, 1), _t("position", "int64", 1), _t("layer_mask", "bool", L),
                       _t("past_lengths", "int32", L)] + [kv(n) for l in range(L) for n in kv_names(l)[:2]],
            "outputs": [_t("logits", "float32", 1, V)] + [kv(n) for l in range(L) for n in kv_names(l)[2:]]}
    if "split" in shapes:
        io["embed"] = {"inputs": [_t("input_ids", "int64", 1, 1)], "outputs": [_t("hidden_states", "float32", 1, 1, D)]}
        io["layer"] = {"inputs": [_t("hidden_states", "float32", 1, 1, D), _t("position", "int64", 1),
                                  _t("past_length", "int32", 1), kv("past_key_values.{l}.key"),
                                  kv("past_key_values.{l}.value")],
                       "outputs": [_t("hidden_states_out", "float32", 1, 1, D), kv("present.{l}.key"),
                                   kv("present.{l}.value")]}
        io["head"] = head
    return io


def to_json(io: Mapping[str, Mapping[str, Sequence[TensorSpec]]]) -> dict:
    """The manifest's ``graphs.io`` section."""
    return {g: {side: [s.to_json() for s in specs] for side, specs in sides.items()} for g, sides in io.items()}


def _spec_from_json(obj, where: str) -> TensorSpec:
    if not isinstance(obj, dict) or set(obj) != {"name", "dtype", "shape"}:
        raise FirstEdgeError(f"manifest graphs.io.{where}: each entry must be an object with name, dtype and shape")
    name, dtype, shape = obj["name"], obj["dtype"], obj["shape"]
    if not isinstance(name, str) or not name:
        raise FirstEdgeError(f"manifest graphs.io.{where}: a name must be a non-empty string")
    if dtype not in DTYPES:
        raise FirstEdgeError(f"manifest graphs.io.{where}.{name}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(
            (isinstance(x, int) and not isinstance(x, bool) and x >= 0) or x in SYMBOLS for x in shape):
        raise FirstEdgeError(f"manifest graphs.io.{where}.{name}: a shape must be a list of sizes or symbols "
                             f"({', '.join(SYMBOLS)})")
    return TensorSpec(name, dtype, tuple(shape))


def check_io(manifest_io, runtime: str, d: Dims, decode_shapes: Iterable[str]) -> Dict[str, Dict[str, List[TensorSpec]]]:
    """Parse a manifest's ``graphs.io`` and check it declares exactly this contract's tensors (in any order:
    the runtimes bind in the manifest's order). Returns the parsed specs; raises a one-line FirstEdgeError."""
    if not isinstance(manifest_io, dict):
        raise FirstEdgeError("manifest has no graphs.io section (the graphs' inputs and outputs); rebuild the bundle")
    want = graph_io(runtime, d, decode_shapes)
    unknown = sorted(set(manifest_io) - set(want))
    if unknown:
        raise FirstEdgeError(f"manifest graphs.io declares graphs this bundle does not have: {', '.join(unknown[:3])}")
    out: Dict[str, Dict[str, List[TensorSpec]]] = {}
    for g, sides in want.items():
        have = manifest_io.get(g)
        if not isinstance(have, dict):
            raise FirstEdgeError(f"manifest graphs.io lacks the graph {g!r}")
        out[g] = {}
        for side, specs in sides.items():
            lst = have.get(side)
            if not isinstance(lst, list):
                raise FirstEdgeError(f"manifest graphs.io.{g} lacks its {side} list")
            got = [_spec_from_json(x, f"{g}.{side}") for x in lst]
            names = [s.name for s in got]
            if len(set(names)) != len(names):
                raise FirstEdgeError(f"manifest graphs.io.{g}.{side} names a tensor twice")
            by_name = {s.name: s for s in got}
            for s in specs:
                h = by_name.get(s.name)
                if h is None:
                    raise FirstEdgeError(f"manifest graphs.io.{g}.{side} lacks {s.name}")
                if h != s:
                    raise FirstEdgeError(f"bundle dims do not match the graphs: graphs.io.{g}.{side} {s.name} is {h.dtype} "
                                         f"{list(h.shape)}, the manifest's model section gives {s.dtype} {list(s.shape)}"
                                         f"{_culprits(d, h, s)}")
            if len(got) != len(specs):
                extra = sorted(set(names) - {s.name for s in specs})
                raise FirstEdgeError(f"bundle dims do not match the graphs: graphs.io.{g}.{side} has tensors the model "
                                     f"section does not explain: {', '.join(extra[:3])} (n_layers={d.n_layers})")
            out[g][side] = got
    return out


def _culprits(d: Dims, have: TensorSpec, want: TensorSpec) -> str:
    """' (from model.head_dim)': the model-section fields behind the sizes that differ."""
    if len(have.shape) != len(want.shape):
        return ""
    fields = sorted({f for h, w in zip(have.shape, want.shape) if h != w and isinstance(w, int)
                     for f, v in vars(d).items() if v == w})
    return f" (from model.{', model.'.join(fields)})" if fields else ""


def index(specs: Sequence[TensorSpec]) -> Dict[str, int]:
    """name -> position in a graph's input or output list."""
    return {s.name: i for i, s in enumerate(specs)}
