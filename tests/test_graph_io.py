"""The graph I/O contract (runtime/graph_io.py): one declaration, checked from the manifest (no torch here)."""
import copy
import dataclasses

import pytest

from runtime.errors import FirstEdgeError
from runtime.graph_io import Dims, check_io, graph_io, index, layer_names, to_json

DIMS = Dims(n_layers=6, hidden_size=64, n_kv_heads=2, head_dim=16, vocab_size=96, max_context=64)
CASES = [("onnxruntime", ["fused"]), ("onnxruntime", ["split"]), ("onnxruntime", ["fused", "split"]),
         ("executorch", ["split"])]


@pytest.mark.parametrize("runtime,shapes", CASES)
def test_contract_round_trips_through_the_manifest(runtime, shapes):
    io = graph_io(runtime, DIMS, shapes)
    assert check_io(to_json(io), runtime, DIMS, shapes) == io
    for graph, sides in io.items():
        for side, specs in sides.items():
            names = [s.name for s in specs]
            assert len(set(names)) == len(names), (graph, side)
    pre = io["prefill"]["outputs"]
    L = DIMS.n_layers
    assert [s.name for s in pre[:3]] == ["logits", "router_scores", "layer_mask"] and len(pre) == 3 + 2 * L
    assert index(pre)["present.5.value"] == 3 + 2 * 5 + 1
    assert io["prefill"]["inputs"][0].shape == (1, "T")
    assert ("decode" in io) == ("fused" in shapes and runtime == "onnxruntime")
    assert ("layer" in io) == ("split" in shapes)
    if "layer" in io:
        assert layer_names(io["layer"]["inputs"], 3)[-2:] == ["past_key_values.3.key", "past_key_values.3.value"]


def test_order_is_free_and_read_from_the_manifest():
    io = to_json(graph_io("executorch", DIMS))
    rev = copy.deepcopy(io)
    rev["prefill"]["outputs"].reverse()
    got = check_io(rev, "executorch", DIMS, ["split"])
    assert index(got["prefill"]["outputs"])["logits"] == 3 + 2 * DIMS.n_layers - 1


def _broken(fn, runtime="onnxruntime", shapes=("fused", "split")):
    io = to_json(graph_io(runtime, DIMS, shapes))
    fn(io)
    with pytest.raises(FirstEdgeError) as e:
        check_io(io, runtime, DIMS, shapes)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_or_malformed_io_is_refused_in_one_line():
    with pytest.raises(FirstEdgeError, match="no graphs.io section.*rebuild"):
        check_io(None, "executorch", DIMS, ["split"])
    assert "lacks the graph 'head'" in _broken(lambda io: io.pop("head"))
    assert "lacks its outputs list" in _broken(lambda io: io["decode"].pop("outputs"))
    assert "lacks present.2.key" in _broken(lambda io: io["prefill"]["outputs"].pop(3 + 2 * 2))
    assert "names a tensor twice" in _broken(lambda io: io["embed"]["inputs"].append(io["embed"]["inputs"][0]))
    assert "does not explain: extra" in _broken(
        lambda io: io["head"]["outputs"].append({"name": "extra", "dtype": "float32", "shape": [1]}))
    assert "unknown dtype 'float16'" in _broken(lambda io: io["head"]["outputs"][0].update(dtype="float16"))
    assert "shape must be a list" in _broken(lambda io: io["head"]["outputs"][0].update(shape=[1, "V"]))
    assert "name, dtype and shape" in _broken(lambda io: io["head"]["outputs"][0].pop("dtype"))
    assert "graphs this bundle does not have: decode" in _broken(
        lambda io: io.update(decode={}), runtime="executorch", shapes=("split",))


@pytest.mark.parametrize("field,value", [("head_dim", 8), ("vocab_size", 97), ("n_layers", 5),
                                         ("max_context", 128), ("n_kv_heads", 4), ("hidden_size", 65)])
def test_model_dims_that_disagree_with_the_declared_io_are_named(field, value):
    io = to_json(graph_io("onnxruntime", DIMS, ["fused", "split"]))
    with pytest.raises(FirstEdgeError, match=f"bundle dims do not match the graphs.*from model.*{field}"):
        check_io(io, "onnxruntime", dataclasses.replace(DIMS, **{field: value}), ["fused", "split"])


def test_unknown_runtime():
    with pytest.raises(FirstEdgeError, match="unknown runtime 'tflite'"):
        graph_io("tflite", DIMS)
