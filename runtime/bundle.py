"""Bundle manifest (DESIGN.md section 3): writing on the host, validation on the device.

A runtime validates the manifest (known version, files present, sha256s, dims consistent) before
it loads anything, and refuses a bad bundle with one line that names the problem. Graph-level
checks (input shapes against the manifest dims) are done by each backend right after loading.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List

from .errors import FirstEdgeError
from .masks import pinned_array

FORMAT_VERSION = 2  # 2: graphs.io, the one I/O schema of every graph (runtime/graph_io.py)
MANIFEST = "manifest.json"
TOOL_VERSION = "first-edge 0.1.0"
RUNTIMES = ("onnxruntime", "executorch")
MODEL_KEYS = ("name", "architecture", "n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim",
              "vocab_size", "max_context")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_manifest(bundle_dir, manifest: Dict[str, Any]) -> Path:
    """Fill in format version, tool and the sha256 of every file in the folder; write manifest.json."""
    d = Path(bundle_dir)
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest.setdefault("tool", TOOL_VERSION)
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(d).as_posix()] = sha256_file(p)
    manifest["files"] = files
    out = d / MANIFEST
    out.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return out


class Bundle:
    """A validated bundle folder. ``Bundle(path)`` raises FirstEdgeError on any problem."""

    def __init__(self, path, verify_hashes: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise FirstEdgeError(f"bundle folder not found: {self.path}")
        if not self.path.is_dir():
            raise FirstEdgeError(f"--bundle must be a folder: {self.path}")
        mf = self.path / MANIFEST
        if not mf.exists():
            raise FirstEdgeError(f"not a FiRST-Edge bundle (no {MANIFEST}) in {self.path}")
        try:
            m = json.loads(mf.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise FirstEdgeError(f"{mf} is not valid JSON: {e}") from None
        if not isinstance(m, dict):
            raise FirstEdgeError(f"{mf} must hold a JSON object")
        ver = m.get("format_version")
        if ver != FORMAT_VERSION:
            raise FirstEdgeError(f"unknown bundle format version {ver!r} in {mf} (this runtime reads version "
                                 f"{FORMAT_VERSION}); rebuild the bundle with the matching toolchain")
        self.manifest = m
        rt = m.get("runtime")
        if rt not in RUNTIMES:
            raise FirstEdgeError(f"manifest names an unknown runtime {rt!r} (known: {', '.join(RUNTIMES)})")
        model = m.get("model")
        if not isinstance(model, dict):
            raise FirstEdgeError("manifest has no 'model' section")
        for k in MODEL_KEYS:
            if k not in model:
                raise FirstEdgeError(f"manifest 'model' section lacks '{k}'")
        for k in MODEL_KEYS[2:]:
            if not isinstance(model[k], int) or model[k] <= 0:
                raise FirstEdgeError(f"manifest model.{k} must be a positive integer, got {model[k]!r}")
        if model["n_heads"] % model["n_kv_heads"]:
            raise FirstEdgeError(f"manifest dims inconsistent: n_heads {model['n_heads']} is not a multiple of "
                                 f"n_kv_heads {model['n_kv_heads']}")
        routing = m.get("routing", {})
        if "pool_start" in routing:
            ps = routing["pool_start"]
            if isinstance(ps, bool) or not isinstance(ps, int) or ps < 0:
                raise FirstEdgeError(f"manifest routing.pool_start must be a non-negative integer, got {ps!r}")
        pinned = routing.get("pinned", [])
        if not isinstance(pinned, list) or any(isinstance(p, bool) or not isinstance(p, int) for p in pinned):
            raise FirstEdgeError(f"manifest routing.pinned must be a list of layer indices, got {pinned!r}")
        try:
            pinned_array(model["n_layers"], pinned)  # the one pinned-layer rule (runtime/masks.py)
        except FirstEdgeError as e:
            raise FirstEdgeError(f"manifest routing.pinned: {e}") from None
        files = m.get("files")
        if not isinstance(files, dict) or not files:
            raise FirstEdgeError("manifest lists no files")
        for name in self.required_files():
            if name not in files:
                raise FirstEdgeError(f"manifest does not list the required file {name}")
        for name, digest in files.items():
            p = self.path / name
            if not p.is_file():
                raise FirstEdgeError(f"bundle file missing: {name} (listed in the manifest)")
            if verify_hashes and sha256_file(p) != digest:
                raise FirstEdgeError(f"bundle file {name} does not match its sha256 in the manifest "
                                     f"(corrupt or modified)")

    # -- convenience accessors
    def required_files(self) -> List[str]:
        g = self.manifest.get("graphs", {})
        req = ["tokenizer.json"] + list(g.get("files", []))
        return req

    @property
    def model(self) -> Dict[str, Any]:
        return self.manifest["model"]

    @property
    def n_layers(self) -> int:
        return int(self.model["n_layers"])

    @property
    def max_context(self) -> int:
        return int(self.model["max_context"])

    @property
    def graphs(self) -> Dict[str, Any]:
        return self.manifest.get("graphs", {})

    @property
    def routing(self) -> Dict[str, Any]:
        return self.manifest.get("routing", {})

    @property
    def default_threshold(self) -> float:
        return float(self.routing.get("default_threshold", 0.5))

    @property
    def pool_start(self) -> int:
        """First prompt position the router scores pool (the prefill graph applies it; 0: every position)."""
        return int(self.routing.get("pool_start", 0))

    @property
    def pinned(self) -> List[int]:
        return [int(p) for p in self.routing.get("pinned", [])]

    @property
    def eos_ids(self) -> List[int]:
        return [int(i) for i in self.manifest.get("tokens", {}).get("eos_ids", [])]

    def file(self, name: str) -> Path:
        return self.path / name
