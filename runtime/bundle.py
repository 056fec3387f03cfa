"""Bundle manifest (DESIGN.md section 3): writing on the host, validation on the device.

A runtime validates the manifest (known version, files present, sha256s, dims consistent) before
it loads anything, and refuses a bad bundle with one line that names the problem. Graph-level
checks (input shapes against the manifest dims) are done by each backend right after loading.

Signed bundles: ``manifest.sig`` holds the hex HMAC-SHA256 (RFC 2104) of manifest.json's exact bytes under a
key shared by the builder and the device (``python -m export.build --sign-key FILE``). With a trusted key
configured (``Bundle(path, trusted_key=...)`` or the ``FIRST_EDGE_TRUSTED_KEY`` key file), a bundle without a
signature that verifies is refused before the manifest is even parsed; without one, manifest.sig is ignored.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Set

from .errors import FirstEdgeError
from .masks import pinned_array

FORMAT_VERSION = 3  # 2: graphs.io (runtime/graph_io.py); files as {name: {"sha256", "bytes"}}; 3: the extend
#                     graph (chat sessions) and chat.turn_prefix / chat.ids
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # hex HMAC-SHA256 of manifest.json's bytes (signed bundles)
TRUSTED_KEY_ENV = "FIRST_EDGE_TRUSTED_KEY"  # path of the trusted key file (the device side)
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
    """Fill in format version, tool and the size and sha256 of every file in the folder; write manifest.json
    (write-then-rename: a reader never sees half a manifest)."""
    d = Path(bundle_dir)
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest.setdefault("tool", TOOL_VERSION)
    files = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if (p.is_file() and not p.is_symlink() and rel != SIGNATURE and p.name != MANIFEST
                and not p.name.startswith(MANIFEST + ".")):
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest["files"] = files
    out = d / MANIFEST
    tmp = d / (MANIFEST + ".tmp")
    (d / SIGNATURE).unlink(missing_ok=True)  # a signature of the previous manifest cannot verify: sign again
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(tmp, out)
    return out


# -- signatures (HMAC-SHA256 of manifest.json's bytes under a shared key)
def read_key(path, what: str = "trusted key") -> bytes:
    """The raw bytes of a key file (every byte is key, a trailing newline too); a one-line FirstEdgeError if
    it cannot be read or is empty."""
    try:
        if not Path(path).is_file():  # not a folder, nor a device that never ends
            raise FirstEdgeError(f"cannot read the {what} file {path}: not a regular file")
        key = Path(path).read_bytes()
    except OSError as e:
        raise FirstEdgeError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
    if not key:
        raise FirstEdgeError(f"the {what} file {path} is empty")
    return key


def manifest_signature(manifest_bytes: bytes, key: bytes) -> str:
    """Hex HMAC-SHA256 (RFC 2104) of the manifest's exact bytes."""
    return hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def sign_bundle(bundle_dir, key: bytes) -> Path:
    """Write manifest.sig for the folder's manifest.json (write-then-rename)."""
    d = Path(bundle_dir)
    sig = manifest_signature((d / MANIFEST).read_bytes(), key)
    tmp = d / (SIGNATURE + ".tmp")
    tmp.write_text(sig + "\n")
    os.replace(tmp, d / SIGNATURE)
    return d / SIGNATURE


def _resolve_key(trusted_key) -> Optional[bytes]:
    """None/unset: the key file named by FIRST_EDGE_TRUSTED_KEY if set (and not empty), else no key;
    False: no key whatever the environment; bytes: the key; str/PathLike: a key file."""
    if trusted_key is False:
        return None
    if trusted_key is None:
        trusted_key = os.environ.get(TRUSTED_KEY_ENV) or None
        if trusted_key is None:
            return None
    if isinstance(trusted_key, (bytes, bytearray)):
        if not trusted_key:
            raise FirstEdgeError("the trusted key is empty")
        return bytes(trusted_key)
    return read_key(trusted_key)


def verify_signature(bundle_dir: Path, manifest_bytes: bytes, key: bytes) -> None:
    """manifest.sig must hold the HMAC-SHA256 of these manifest bytes under the key (constant-time compare)."""
    sp = Path(bundle_dir) / SIGNATURE
    if not sp.is_file():
        raise FirstEdgeError(f"bundle {bundle_dir} is not signed (no {SIGNATURE}) and a trusted key is configured: refused")
    try:
        got = sp.read_bytes().strip().lower()
    except OSError as e:
        raise FirstEdgeError(f"cannot read {sp}: {e.strerror or e}") from None
    if not re.fullmatch(rb"[0-9a-f]{64}", got):
        raise FirstEdgeError(f"{sp} is not an HMAC-SHA256 signature (64 hex digits): refused")
    if not hmac.compare_digest(got, manifest_signature(manifest_bytes, key).encode()):
        raise FirstEdgeError(f"{SIGNATURE} of bundle {bundle_dir} does not verify with the trusted key (signed with "
                             f"another key, or {MANIFEST} was changed after signing): refused")


_ONNX_LOCATION = re.compile(rb"\x0a\x08location\x12")


def onnx_external_locations(path: Path) -> Set[str]:
    """The external-data files an ONNX graph names (TensorProto.external_data entries ``location``), read
    from the protobuf bytes without the onnx package: each is a StringStringEntryProto, field 1 = b"location",
    field 2 = the file name."""
    data = Path(path).read_bytes()
    out = set()
    for m in _ONNX_LOCATION.finditer(data):
        i, n, shift = m.end(), 0, 0
        while i < len(data):  # varint length
            b = data[i]
            n |= (b & 0x7F) << shift
            i += 1
            shift += 7
            if not b & 0x80 or shift > 35:
                break
        out.add(data[i:i + n].decode("utf-8", "replace"))
    return out


def confined(root: Path, name) -> Path:
    """``root / name`` for a manifest file name that stays inside the bundle folder: a relative POSIX path
    without ``..`` whose real path (symlinks resolved) is under the folder's real path; else a one-line
    FirstEdgeError. Nothing is read."""
    pp = PurePosixPath(name) if isinstance(name, str) else None
    if pp is None or not name or "\\" in name or "\x00" in name or pp.is_absolute() or ".." in pp.parts:
        raise FirstEdgeError(f"manifest names a file outside the bundle: {name!r}")
    p = root / pp
    real_root = root.resolve()
    if not p.resolve().is_relative_to(real_root):
        raise FirstEdgeError(f"bundle file {name} leaves the bundle folder (a link to {p.resolve()})")
    return p


def _links_leaving(root: Path) -> List[str]:
    """Links anywhere in the folder that resolve outside it (a graph could name such a file)."""
    real_root = root.resolve()
    bad = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink() and not p.resolve().is_relative_to(real_root):
                bad.append(p.relative_to(root).as_posix())
    return bad


class Bundle:
    """A validated bundle folder. ``Bundle(path)`` raises FirstEdgeError on any problem.

    ``trusted_key``: a key file path or the key's bytes; None (default) reads the key file named by
    FIRST_EDGE_TRUSTED_KEY when that is set; False checks no signature. With a key, manifest.sig must verify
    (before anything else in the bundle is read) and the file hashes are always checked (the signature covers
    the files through them), whatever ``verify_hashes`` says."""

    def __init__(self, path, verify_hashes: bool = True, trusted_key=None):
        key = _resolve_key(trusted_key)
        self.signed = key is not None
        if key is not None:
            verify_hashes = True
        self.path = Path(path)
        if not self.path.exists():
            raise FirstEdgeError(f"bundle folder not found: {self.path}")
        if not self.path.is_dir():
            raise FirstEdgeError(f"--bundle must be a folder: {self.path}")
        mf = self.path / MANIFEST
        if not mf.exists():
            raise FirstEdgeError(f"not a FiRST-Edge bundle (no {MANIFEST}) in {self.path}")
        try:
            raw = mf.read_bytes()
        except OSError as e:
            raise FirstEdgeError(f"cannot read {mf}: {e.strerror or e}") from None
        if key is not None:  # before the manifest is parsed or any other file is read
            verify_signature(self.path, raw, key)
        try:
            m = json.loads(raw.decode("utf-8"))
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
        if not isinstance(routing, dict):
            raise FirstEdgeError("manifest 'routing' section must be an object")
        if "pool_start" in routing:
            ps = routing["pool_start"]
            if isinstance(ps, bool) or not isinstance(ps, int) or ps < 0:
                raise FirstEdgeError(f"manifest routing.pool_start must be a non-negative integer, got {ps!r}")
        thr = routing.get("default_threshold", 0.5)
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0:
            raise FirstEdgeError(f"manifest routing.default_threshold must be a number in [0, 1], got {thr!r}")
        tokens = m.get("tokens", {})
        eos = tokens.get("eos_ids", []) if isinstance(tokens, dict) else None
        if not isinstance(eos, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in eos):
            raise FirstEdgeError("manifest tokens.eos_ids must be a list of token ids")
        chat = m.get("chat", {})
        if not isinstance(chat, dict) or not all(isinstance(chat.get(k, ""), str) for k in ("prefix", "suffix")):
            raise FirstEdgeError("manifest chat.prefix and chat.suffix must be strings")
        if not isinstance(chat.get("turn_prefix", ""), (str, type(None))):
            raise FirstEdgeError("manifest chat.turn_prefix must be a string or null")
        ids = chat.get("ids", {})
        if not isinstance(ids, dict) or not all(
                (k == "turn_prefix" and v is None) or (isinstance(v, list) and all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < model["vocab_size"] for i in v))
                for k, v in ids.items()):
            raise FirstEdgeError("manifest chat.ids must map template pieces to lists of token ids within the vocabulary")
        pinned = routing.get("pinned", [])
        if not isinstance(pinned, list) or any(isinstance(p, bool) or not isinstance(p, int) for p in pinned):
            raise FirstEdgeError(f"manifest routing.pinned must be a list of layer indices, got {pinned!r}")
        try:
            pinned_array(model["n_layers"], pinned)  # the one pinned-layer rule (runtime/masks.py)
        except FirstEdgeError as e:
            raise FirstEdgeError(f"manifest routing.pinned: {e}") from None
        self._check_files(m.get("files"), verify_hashes)

    def _check_files(self, files, verify_hashes: bool):
        """Every file the runtimes will open is listed, inside the folder, of its listed size and hash; in that
        order, so nothing outside the folder is read and nothing is hashed that has the wrong size."""
        if not isinstance(files, dict) or not files:
            raise FirstEdgeError("manifest lists no files")
        for name, entry in files.items():
            confined(self.path, name)
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) and isinstance(entry.get("bytes"), int)
                    and not isinstance(entry["bytes"], bool) and entry["bytes"] >= 0):
                raise FirstEdgeError(f"manifest entry of {name} must be {{\"sha256\": 64 hex digits, \"bytes\": a size}}")
        leaving = _links_leaving(self.path)
        if leaving:
            raise FirstEdgeError(f"bundle folder holds a link that leaves it: {leaving[0]}")
        for name in self.required_files():
            if name not in files:
                raise FirstEdgeError(f"manifest does not list the required file {name}")
        for name, entry in files.items():
            p = self.path / name
            if not p.is_file():
                raise FirstEdgeError(f"bundle file missing: {name} (listed in the manifest)")
            size = p.stat().st_size
            if verify_hashes and size != entry["bytes"]:  # integrity: the size first (cheap), then the hash
                raise FirstEdgeError(f"bundle file {name} has {size} bytes, the manifest says {entry['bytes']} "
                                     f"(truncated or modified)")
            if verify_hashes and sha256_file(p) != entry["sha256"]:
                raise FirstEdgeError(f"bundle file {name} does not match its sha256 in the manifest "
                                     f"(corrupt or modified)")
        for name in files:
            if name.endswith(".onnx"):  # ONNX external data: only files the manifest lists (so checked above)
                for loc in sorted(onnx_external_locations(self.path / name)):
                    if loc not in files:
                        raise FirstEdgeError(f"graph {name} reads external data {loc!r} that the manifest does not list")

    # -- convenience accessors
    def required_files(self) -> List[str]:
        """tokenizer.json and every graph file the manifest's graphs section names (the runtimes open no other)."""
        g = self.manifest.get("graphs", {})
        if not isinstance(g, dict):
            raise FirstEdgeError("manifest 'graphs' section must be an object")
        named = g.get("files") or []
        if not isinstance(named, list):
            raise FirstEdgeError("manifest graphs.files must be a list of file names")
        named = list(named)
        for key in ("prefill", "extend", "decode", "weights_index"):  # weights_index: the shared weights' index
            if isinstance(g.get(key), str):
                named.append(g[key])
        split = g.get("split")
        if isinstance(split, dict):
            named += [v for v in (split.get("embed"), split.get("head")) if isinstance(v, str)]
            layers = split.get("layers") or []
            named += [v for v in (layers if isinstance(layers, list) else []) if isinstance(v, str)]
        if not all(isinstance(n, str) for n in named):
            raise FirstEdgeError("manifest graphs section names a file that is not a string")
        return ["tokenizer.json"] + list(dict.fromkeys(named))

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

    def chat_ids(self, piece: str) -> Optional[List[int]]:
        """Token ids of a chat-template piece (``prefix``, ``suffix``, ``turn_prefix``); None if the bundle has none."""
        v = self.manifest.get("chat", {}).get("ids", {}).get(piece)
        return None if v is None else [int(i) for i in v]

    def file(self, name: str) -> Path:
        return self.path / name
