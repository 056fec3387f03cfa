"""ONNX Runtime backend of the generation loop (Raspberry Pi path). numpy + onnxruntime only.

KV cache: one buffer per layer and per K/V, ``[1, n_kv_heads, max_context, head_dim]`` float32,
allocated once when the bundle is loaded. Each buffer is bound (IO binding, raw pointer: zero copy)
both as the graph input ``past_key_values.{l}.*`` and as the output ``present.{l}.*``, so the
GroupQueryAttention operator appends the new token's K/V in place; a skipped layer's buffer is not
touched. Every layer keeps its own length (``past_lengths``): a layer skipped for a token never gets
an entry for it. No step copies a cache; the attention reads only the ``length`` valid entries, so
the per-token cost grows with the tokens so far, not with max_context.

Weights: one file for all graphs (``weights.data``), memory-mapped once; every session gets the same tensors
(:class:`SharedWeights`, ``SessionOptions.add_initializer``); ``prepack=all|decode|none|disk`` picks the sessions
that let ONNX Runtime pre-pack their MatMul weights, and ``disk`` maps the pre-packed weights from a per-device cache
instead of packing them on the heap (:class:`PrepackCache`; docs/onnx.md, "One copy of the weights").

Decode shapes (manifest ``graphs.decode_shape``):
Chat sessions (runtime/session.py) add ``extend.onnx``: a turn's new tokens through every layer after the
tokens already cached, written in place into the same buffers (loaded when a Session starts, or on the first
``extend``).

  fused  one ``decode.onnx`` with an ``If`` per layer; one session call per token.
  split  ``embed.onnx``, ``layer_{l}.onnx``, ``head.onnx``; only the kept layers' sessions are called.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np

from .errors import FirstEdgeError, first_line
from .graph_io import Dims, check_io, graph_io, layer_names
from .masks import check_mask

F32 = np.float32
_GLOBAL_POOL = {"threads": None}  # ONNX Runtime's process-wide thread pool (created once per process)


def _use_global_pool(ort, threads: int) -> bool:
    """All sessions of a backend (prefill, decode, or the 32 split graphs) share one process-wide pool of
    ``threads`` threads; per-session pools would park/wake (and spin) separate threads for every graph.
    Once created, ONNX Runtime requires every later session in the process to use it (see session_options)."""
    if _GLOBAL_POOL["threads"] is None:
        try:
            from onnxruntime.capi import onnxruntime_pybind11_state as C

            C.set_global_thread_pool_sizes(threads, 1)
            _GLOBAL_POOL["threads"] = threads
        except Exception:  # noqa: BLE001  (environment already created with per-session threads)
            _GLOBAL_POOL["threads"] = -1
    return _GLOBAL_POOL["threads"] > 0


ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "int32": "tensor(int32)", "bool": "tensor(bool)"}


def _shapes(graphs: dict) -> List[str]:
    """The decode shapes a bundle's graphs section holds (fused and/or split)."""
    shapes = graphs.get("decode_shapes") or [graphs.get("decode_shape", "fused")]
    if not isinstance(shapes, list) or not shapes or not all(x in ("fused", "split") for x in shapes):
        raise FirstEdgeError(f"manifest graphs.decode_shapes must list fused and/or split, got {shapes!r}")
    return list(shapes)


def session_options(threads: int = 2):
    """SessionOptions for any ONNX Runtime session in a process that runs the FiRST-Edge backend."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if _use_global_pool(ort, threads):
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


# which sessions let ONNX Runtime pre-pack (copy into MLAS's layout) MatMul / Gemm / MatMulNBits weights: every
# session, the decode session(s) only (prefill and extend read the shared tensors as they are), or none; "disk": the
# sessions the default packs (quantized: all, fp32: decode) map their packed weights from PrepackCache's files
PREPACK = ("all", "decode", "none", "disk")
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "int32": np.int32, "int64": np.int64,
             "bool": np.bool_}


class SharedWeights:
    """The bundle's one weights file (``weights.data``, indexed by ``weights.json``; export/onnx_export.py
    ``save_shared``), memory-mapped once per backend: every tensor becomes one OrtValue over the mapping, handed
    to each session with ``SessionOptions.add_initializer``, so prefill, extend and decode sessions read the same
    pages instead of each loading its own copy. Nothing is copied; the pages are read from the file on demand."""

    def __init__(self, root: Path, index_name: str, listed: Optional[set] = None):
        import json

        from .bundle import confined

        ip = confined(root, index_name)
        if listed is not None and index_name not in listed:
            raise FirstEdgeError(f"the shared weights index {index_name} is not a file the manifest lists")
        try:
            idx = json.loads(ip.read_text())
            data_name = idx["data"]
            tensors, graphs = idx["tensors"], idx["graphs"]
            if not isinstance(tensors, dict) or not isinstance(graphs, dict):
                raise TypeError("tensors and graphs must be objects")
        except FileNotFoundError:
            raise FirstEdgeError(f"bundle file missing: {index_name}") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise FirstEdgeError(f"shared weights index {index_name} is malformed: {first_line(e)}") from None
        dp = confined(root, data_name)
        if listed is not None and data_name not in listed:
            raise FirstEdgeError(f"the shared weights file {data_name!r} is not a file the manifest lists")
        if not dp.is_file():
            raise FirstEdgeError(f"bundle file missing: {data_name}")
        size = dp.stat().st_size
        for name, t in tensors.items():
            ok = (isinstance(t, dict) and t.get("dtype") in NP_DTYPES and isinstance(t.get("shape"), list)
                  and all(isinstance(d, int) and d >= 0 for d in t["shape"])
                  and isinstance(t.get("offset"), int) and isinstance(t.get("length"), int) and t["offset"] >= 0
                  and t["length"] == int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(NP_DTYPES[t["dtype"]]).itemsize
                  and t["offset"] % np.dtype(NP_DTYPES[t["dtype"]]).itemsize == 0)
            if not ok:
                raise FirstEdgeError(f"shared weights index {index_name}: bad entry for tensor {name}")
            if t["offset"] + t["length"] > size:
                raise FirstEdgeError(f"shared weights file {data_name} is {size} bytes, too short for tensor {name} "
                                     f"(truncated?)")
        self.index_name, self.data_name = index_name, data_name
        self.tensors, self.graphs = tensors, graphs
        self.quantized = any(t["dtype"] == "uint8" for t in tensors.values())
        self.map = np.memmap(dp, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self.values = {}

    @classmethod
    def open(cls, root: Path, index_name, listed: Optional[set] = None) -> Optional["SharedWeights"]:
        """None for a bundle whose graphs carry their own external data (no ``graphs.weights_index``);
        ``listed``: the manifest's files (None when opening graphs without a manifest, at export)."""
        if index_name is None:
            return None
        if not isinstance(index_name, str) or not index_name:
            raise FirstEdgeError(f"manifest graphs.weights_index must name a file, got {index_name!r}")
        return cls(Path(root), index_name, listed)

    def value(self, name: str):
        """The one OrtValue of a tensor (a view of the mapping; created on first use)."""
        v = self.values.get(name)
        if v is None:
            import onnxruntime as ort

            t = self.tensors[name]
            dt = NP_DTYPES[t["dtype"]]
            arr = self.map[t["offset"]:t["offset"] + t["length"]].view(dt).reshape(t["shape"])
            v = self.values[name] = ort.OrtValue.ortvalue_from_numpy(arr)
        return v

    def release(self):
        """Drop the mapping's resident pages (``madvise(MADV_DONTNEED)``; the file and its page cache stay): a
        session that pre-packs has read its MatMul weights once to pack them and never reads them again, so
        their pages need not stay in the process. Whatever a session does read later (norms, embedding rows,
        weights of a session that does not pre-pack) is faulted back in from the file on demand."""
        import mmap

        mm = getattr(self.map, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except OSError:  # an optimisation only
                pass

    def add_to(self, so, graph_file: str):
        """Hand a session (its SessionOptions) the shared tensors of one graph file."""
        g = self.graphs.get(graph_file)
        if not isinstance(g, list):
            raise FirstEdgeError(f"shared weights index {self.index_name} does not list the tensors of {graph_file}")
        for name in g:
            if not isinstance(name, str) or name not in self.tensors:
                raise FirstEdgeError(f"shared weights index {self.index_name}: {graph_file} uses {name!r}, "
                                     f"which it does not locate")
            so.add_initializer(name, self.value(name))


# ---------------------------------------------------------------------------------------------- pre-packed cache
def _cpu_signature() -> str:
    """What MLAS's packed layout depends on: the machine and its instruction-set flags."""
    import platform

    keep = ("flags", "features", "vendor_id", "cpu family", "model", "model name", "cpu implementer",
            "cpu architecture", "cpu variant", "cpu part", "isa")
    lines = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k = line.split(":", 1)[0].strip().lower()
                if k in keep:
                    lines.add(" ".join(line.split()))
    except OSError:
        pass
    return platform.machine() + "\n" + "\n".join(sorted(lines))


def default_cache_root() -> Path:
    """``$FIRST_EDGE_PREPACK_CACHE``, else ``$XDG_CACHE_HOME/first-edge/prepacked`` (``~/.cache/...``)."""
    env = os.environ.get("FIRST_EDGE_PREPACK_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "first-edge" / "prepacked"


def _warn(message: str) -> None:
    """A one-line warning (no source line under it): ``runtime/ort_backend.py:0: UserWarning: message``."""
    warnings.warn_explicit(message, UserWarning, "runtime/ort_backend.py", 0, module="runtime.ort_backend")


def _glibc_heap(tune: bool = False) -> None:
    """Return the C heap's free memory to the system (``malloc_trim``); with ``tune``, first make glibc serve every
    allocation of 128 KiB or more with its own mapping, returned when freed (``mallopt(M_MMAP_THRESHOLD)``, which also
    stops glibc raising that threshold): ONNX Runtime's transient buffers while it loads a session otherwise stay in
    the process (measured: ~60 MB per int4 session). Process-wide; glibc only (elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if tune and not _GLOBAL_POOL.get("malloc_tuned"):
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
            _GLOBAL_POOL["malloc_tuned"] = True
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _FilePages:
    """The read-only file pages ONNX Runtime mapped for one session's cached data file, and a way to drop them from
    the process (``madvise(MADV_DONTNEED)``: clean file pages only, so the next read faults them back in from the
    page cache with the same contents). Linux only; elsewhere (or if anything looks unexpected) a no-op."""

    def __init__(self, data_file: Path):
        self.ranges = []
        self._madvise = None
        try:
            import ctypes
            import mmap

            target = os.path.realpath(data_file)
            cur, maps = None, []
            with open("/proc/self/smaps") as f:
                for line in f:
                    head = line.split(None, 5)
                    if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                        cur = None
                        if len(head) == 6 and head[5].rstrip("\n") == target:
                            a, b = (int(x, 16) for x in head[0].split("-"))
                            cur = [a, b - a, head[1], None]
                            maps.append(cur)
                    elif cur is not None and head[0] == "Anonymous:" and head[1] != "0":
                        cur[3] = "written"  # a copy-on-write page: dropping it would lose the write
            # read-only or never-written private mappings of the cache file only
            self.ranges = [(a, n) for a, n, perms, written in maps if written is None and "r" in perms]
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = (libc.madvise, mmap.MADV_DONTNEED)
        except (OSError, AttributeError, ValueError, ImportError):
            self.ranges = []

    def drop(self):
        if self._madvise is None:
            return
        fn, advice = self._madvise
        for a, n in self.ranges:
            fn(a, n, advice)


class PrepackCache:
    """Pre-packed weights on disk (``--backend-opt prepack=disk``): ONNX Runtime (>= 1.21) can save an optimized
    graph whose MLAS pre-packed weights are written to its external data file
    (``session.save_external_prepacked_constant_initializers``), and a session loaded from that graph maps them from
    the file instead of packing them on the heap. The packed layout depends on the CPU and the ONNX Runtime build, so
    the files are made on the device, on the first load of each graph, in
    ``ROOT/<bundle>.<graph>.<key>/`` (key: the bundle's manifest file list with its sha256s, the graph and weights
    files' size and mtime, the onnxruntime version and the CPU's flags). ``meta.json`` there records each file's size
    and sha256, checked on every load: a missing, truncated or altered cache is rebuilt (one-line warning); an
    unwritable ROOT falls back to packing on the heap (one-line warning)."""

    FORMAT = 1

    def __init__(self, root, bundle_path: Path, signature: str):
        import onnxruntime as ort

        self.root = Path(root)
        self.bundle_path = Path(bundle_path)
        self.signature = signature
        self.ort_version = ort.__version__
        self.cpu = _cpu_signature()

    def key(self, graph: str, extra_files) -> str:
        import hashlib

        stats = []
        for name in [graph] + sorted(extra_files):
            try:
                st = (self.bundle_path / name).stat()
                stats.append([name, st.st_size, st.st_mtime_ns])
            except OSError:
                stats.append([name, None, None])
        blob = json.dumps({"format": self.FORMAT, "graph": graph, "bundle": self.signature, "stats": stats,
                           "onnxruntime": self.ort_version, "cpu": self.cpu}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def folder(self, graph: str, key: str) -> Path:
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.bundle_path.resolve().name}.{Path(graph).stem}")
        return self.root / f"{tag}.{key[:20]}"

    @staticmethod
    def files(graph: str):
        g = Path(graph).name
        return g, g + ".data"

    def check(self, folder: Path, graph: str, key: str) -> Optional[str]:
        """None when the cache in ``folder`` is complete and intact, else why not."""
        from .bundle import sha256_file

        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("format") != self.FORMAT or meta.get("key") != key:
                return "it was made for another bundle, device or onnxruntime"
            files = meta["files"]
            for name in self.files(graph):
                entry, p = files[name], folder / name
                if p.stat().st_size != entry["bytes"]:
                    return f"{name} has {p.stat().st_size} bytes, not {entry['bytes']} (truncated?)"
                if sha256_file(p) != entry["sha256"]:
                    return f"{name} does not match its sha256 (corrupt?)"
        except FileNotFoundError as e:
            return f"{Path(e.filename or '?').name} is missing"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"its meta.json is unreadable ({first_line(e)})"
        return None

    def save_options(self, so, tmp: Path, graph: str):
        g, data = self.files(graph)
        so.optimized_model_filepath = str(tmp / g)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data)
        # small tensors stay in the graph (shape-inference inputs must be inline)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")

    def commit(self, tmp: Path, folder: Path, graph: str, key: str) -> None:
        from .bundle import sha256_file

        files = {}
        for name in self.files(graph):
            p = tmp / name
            if not p.is_file():
                raise OSError(f"onnxruntime wrote no {name}")
            files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        (tmp / "meta.json").write_text(json.dumps({"format": self.FORMAT, "key": key, "graph": graph,
                                                   "onnxruntime": self.ort_version, "files": files}, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)


class OrtBackend:
    """Backend protocol of runtime.loop: ``prefill(ids, threshold)`` and ``decode(token, position, mask)``."""

    def __init__(self, bundle, threads: int = 2, decode_shape: Optional[str] = None, profile: Optional[str] = None,
                 prepack: Optional[str] = None, prepack_cache: Optional[str] = None, **opts):
        if opts:
            raise FirstEdgeError(f"unknown ONNX Runtime backend option(s): {', '.join(sorted(opts))} "
                                 f"(known: decode_shape=fused|split, profile=DIR, prepack={'|'.join(PREPACK)}, "
                                 f"prepack_cache=DIR)")
        dims = Dims.from_model(bundle.model)
        graphs = bundle.graphs
        self._listed = set(bundle.manifest.get("files") or {})  # the shared weights file must be one of them
        io = check_io(graphs.get("io"), "onnxruntime", dims, _shapes(graphs))
        self._signature = json.dumps(bundle.manifest.get("files"), sort_keys=True)  # names, sizes and sha256s
        self._init(bundle.path, graphs, dims, io, threads=int(threads), decode_shape=decode_shape, profile=profile,
                   prepack=prepack, prepack_cache=prepack_cache)

    @classmethod
    def from_dir(cls, path, graphs: dict, dims: Dims, threads: int = 2,
                 decode_shape: Optional[str] = None, profile: Optional[str] = None,
                 prepack: Optional[str] = None, prepack_cache: Optional[str] = None) -> "OrtBackend":
        """Open graphs without a manifest (export validation): the I/O is the contract's."""
        self = cls.__new__(cls)
        io = graph_io("onnxruntime", dims, _shapes(graphs))
        self._signature = json.dumps(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                            for p in Path(path).iterdir() if p.is_file()))
        self._init(Path(path), graphs, dims, io, threads=threads, decode_shape=decode_shape, profile=profile,
                   prepack=prepack, prepack_cache=prepack_cache)
        return self

    # ------------------------------------------------------------------ loading
    def _init(self, path: Path, graphs: dict, dims: Dims, io: dict, threads: int, decode_shape: Optional[str],
              profile: Optional[str], prepack: Optional[str] = None, prepack_cache: Optional[str] = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise FirstEdgeError(f"onnxruntime is not installed: {e} (pip install onnxruntime)") from None
        self.ort = ort
        self.path = Path(path)
        self.io = io
        L, KV, hd, V, C = dims.n_layers, dims.n_kv_heads, dims.head_dim, dims.vocab_size, dims.max_context
        self.n_layers, self.n_kv, self.head_dim, self.vocab, self.max_context = L, KV, hd, V, C
        self.threads = threads
        shapes = _shapes(graphs)
        shape = decode_shape or graphs.get("decode_shape", "fused")
        if shape not in ("fused", "split"):
            raise FirstEdgeError(f"decode_shape must be fused or split, got {shape!r}")
        if shape not in shapes:
            raise FirstEdgeError(f"this bundle has no {shape} decode graphs (it has: {', '.join(shapes)}); "
                                 f"rebuild with --opt decode_shape={shape} or both")
        self.decode_shape = shape
        self.profile = profile
        self._sessions = []
        self.shared = SharedWeights.open(self.path, graphs.get("weights_index"), getattr(self, "_listed", None))
        self.prepack = prepack or self._default_prepack()
        if self.prepack not in PREPACK:
            raise FirstEdgeError(f"prepack must be one of {', '.join(PREPACK)}, got {self.prepack!r}")
        self._pages: List[_FilePages] = []  # prepack=disk: each cached session's mapped file pages
        self.cache, self._cache_off = None, False
        if self.prepack == "disk":
            self.cache = PrepackCache(prepack_cache or default_cache_root(), self.path, self._signature)
            _glibc_heap(tune=True)
        elif prepack_cache is not None:
            raise FirstEdgeError("prepack_cache=DIR needs prepack=disk")
        self._extend_file = graphs.get("extend", "extend.onnx")
        self.extend_sess = None  # loaded when a chat session starts (its weights are the shared ones)
        # KV buffers: allocated once, written in place by the decode graphs
        self.k = [np.zeros((1, KV, C, hd), F32) for _ in range(L)]
        self.v = [np.zeros((1, KV, C, hd), F32) for _ in range(L)]
        self.lengths = np.zeros(L, np.int32)
        self._ids = np.zeros((1, 1), np.int64)
        self._pos = np.zeros(1, np.int64)
        self._mask = np.ones(L, bool)
        self._logits = np.zeros((1, V), F32)
        self._kept: List[int] = list(range(L))
        self._mask_key = None
        if self.cache is not None:  # prepack=disk: the decode graphs first (the larger load-time peak; measured)
            self._load_decode(graphs, shape, profile)
        self.prefill_sess = self._session(graphs.get("prefill", "prefill.onnx"), profile=False, decode=False)
        self._check(self.prefill_sess, "prefill", graphs.get("prefill", "prefill.onnx"))
        self._prefill_out = [o.name for o in self.prefill_sess.get_outputs()]
        if self.cache is None:
            self._load_decode(graphs, shape, profile)

    def _load_decode(self, graphs: dict, shape: str, profile: Optional[str]):
        L = self.n_layers
        if shape == "fused":
            self.decode_sess = self._session(graphs.get("decode", "decode.onnx"), profile=bool(profile))
            self._check(self.decode_sess, "decode", graphs.get("decode", "decode.onnx"))
            self._bind_fused()
        else:
            sp = graphs.get("split") or {}
            if not isinstance(sp, dict):
                raise FirstEdgeError("manifest graphs.split must be an object naming the split graph files")
            self.embed_sess = self._session(sp.get("embed", "embed.onnx"), profile=bool(profile))
            self._check(self.embed_sess, "embed", sp.get("embed", "embed.onnx"))
            layer_files = sp.get("layers") or [f"layer_{l}.onnx" for l in range(L)]
            if not isinstance(layer_files, list):
                raise FirstEdgeError("manifest graphs.split.layers must be a list of file names")
            if len(layer_files) != L:
                raise FirstEdgeError(f"bundle dims do not match the graphs: {len(layer_files)} layer graphs for "
                                     f"n_layers={L}")
            self.layer_sess = [self._session(f, profile=bool(profile)) for f in layer_files]
            for l, s in enumerate(self.layer_sess):
                self._check(s, "layer", layer_files[l], l)
            self.head_sess = self._session(sp.get("head", "head.onnx"), profile=bool(profile))
            self._check(self.head_sess, "head", sp.get("head", "head.onnx"))
            self._bind_split()

    def _default_prepack(self) -> str:
        """fp32 weights: "decode" (measured, docs/onnx.md); graphs with MatMulNBits need their packed layout in
        every session (unpacked they are dequantized on every call): "all"; so do bundles without one shared
        weights file (each session loads its own copy anyway)."""
        return "all" if self.shared is None or self.shared.quantized else "decode"

    def _session(self, name: str, profile: bool, decode: bool = True):
        if not isinstance(name, str) or not name:
            raise FirstEdgeError(f"manifest names a graph file {name!r}, not a file name")
        f = self.path / name
        if not f.is_file():
            raise FirstEdgeError(f"bundle file missing: {name}")
        policy = self._default_prepack() if self.prepack == "disk" else self.prepack
        packs = policy == "all" or (policy == "decode" and decode)
        cached = packs and self.cache is not None and not self._cache_off
        s = self._cached_session(name, profile) if cached else None
        if s is None:
            s = self._create(name, f, self._options(name, profile, packs))
            if packs and self.shared is not None:
                self.shared.release()
        self._sessions.append(s)
        return s

    def _options(self, name: str, profile: bool, packs: bool, shared: bool = True):
        so = session_options(self.threads)
        if _GLOBAL_POOL["threads"] not in (-1, self.threads):
            warnings.warn(f"ONNX Runtime's thread pool of this process has {_GLOBAL_POOL['threads']} threads; "
                          f"threads={self.threads} is ignored")
        if not packs:
            so.add_session_config_entry("session.disable_prepacking", "1")
        if shared and self.shared is not None:
            # every session reads the same memory-mapped tensors (also those it pre-packs: measured, leaving them
            # to ONNX Runtime's own per-session mapping keeps more resident; docs/onnx.md)
            self.shared.add_to(so, name)
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(self.profile) / Path(name).stem)
        return so

    def _create(self, name: str, f: Path, so):
        try:
            return self.ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (ORT raises several exception types for a bad file)
            raise FirstEdgeError(f"cannot load graph {name} (corrupt or truncated?): {first_line(e)}") from None

    def _cached_session(self, name: str, profile: bool):
        """prepack=disk: the session from the graph's pre-packed cache (made now if missing or damaged: this first
        session packs on the heap as usual and writes the cache; later loads map it). None when the cache cannot be
        written (the caller packs on the heap)."""
        c = self.cache
        extra = [self.shared.data_name] if self.shared is not None else []
        key = c.key(name, extra)
        folder = c.folder(name, key)
        g, data = c.files(name)
        if folder.exists():
            why = c.check(folder, name, key)
            if why is None:
                try:  # everything the graph needs is in the cache: no shared initializers (they would be re-packed)
                    s = self.ort.InferenceSession(str(folder / g), self._options(name, profile, True, shared=False),
                                                  providers=["CPUExecutionProvider"])
                except Exception as e:  # noqa: BLE001
                    why = f"onnxruntime cannot load it: {first_line(e)}"
                else:
                    pages = _FilePages(folder / data)
                    pages.drop()  # loading read every page; a call faults in only what it uses
                    self._pages.append(pages)
                    _glibc_heap()  # and left freed buffers in the C heap
                    return s
            _warn(f"prepack=disk: rebuilding the pre-packed cache {folder} of {name}: {why}")
            shutil.rmtree(folder, ignore_errors=True)
        try:
            c.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=c.root))
        except OSError as e:
            _warn(f"prepack=disk: cannot write the pre-packed cache in {c.root} ({first_line(e)}); packing in memory")
            self._cache_off = True  # one warning: the remaining sessions pack in memory too
            return None
        so = self._options(name, profile, True)
        c.save_options(so, tmp, name)
        try:
            s = self._create(name, self.path / name, so)
        except FirstEdgeError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.shared is not None:
            self.shared.release()
        try:
            c.commit(tmp, folder, name, key)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            _warn(f"prepack=disk: cannot write the pre-packed cache of {name} in {c.root} ({first_line(e)})")
        return s

    def _trim(self):
        """prepack=disk, around a prefill / extend call: drop the resident pages of every cached session's file and of
        the shared weights (all clean file pages; a later call faults in what it reads), so one phase's packed weights
        are not resident while another phase runs."""
        if self.cache is not None:
            for p in self._pages:
                p.drop()
            if self.shared is not None:
                self.shared.release()

    def _check(self, sess, graph: str, file: str, l: Optional[int] = None):
        """The session's inputs and outputs are exactly the I/O the manifest declares for ``graph``: the same
        names, element types and fixed sizes (symbolic sizes such as T are free)."""
        for side, have in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
            specs = self.io[graph][side]
            names = layer_names(specs, l) if l is not None else [s.name for s in specs]
            got = {a.name: a for a in have}
            for name, spec in zip(names, specs):
                a = got.pop(name, None)
                if a is None:
                    raise FirstEdgeError(f"bundle dims do not match the graphs: {file} has no {side[:-1]} {name} "
                                         f"(n_layers={self.n_layers})")
                if a.type != ORT_TYPES[spec.dtype]:
                    raise FirstEdgeError(f"bundle dims do not match the graphs: {file} {name} is {a.type}, the "
                                         f"manifest says {spec.dtype}")
                want = [d if isinstance(d, int) else None for d in spec.shape]
                shape = [d if isinstance(d, int) else None for d in a.shape]
                if len(shape) != len(want) or any(w is not None and w != h for w, h in zip(want, shape)):
                    raise FirstEdgeError(f"bundle dims do not match the graphs: {file} {name} has shape {a.shape}, "
                                         f"the manifest says {list(spec.shape)}")
            if got:
                raise FirstEdgeError(f"bundle dims do not match the graphs: {file} has {side} the manifest does not "
                                     f"declare: {', '.join(sorted(got)[:3])} (n_layers={self.n_layers})")

    # ------------------------------------------------------------------ IO binding (raw pointers: zero copy)
    @staticmethod
    def _bin(binding, name, arr: np.ndarray, output=False):
        fn = binding.bind_output if output else binding.bind_input
        fn(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def _bind_fused(self):
        b = self.decode_sess.io_binding()
        self._bin(b, "input_ids", self._ids)
        self._bin(b, "position", self._pos)
        self._bin(b, "layer_mask", self._mask)
        self._bin(b, "past_lengths", self.lengths)
        for l in range(self.n_layers):
            self._bin(b, f"past_key_values.{l}.key", self.k[l])
            self._bin(b, f"past_key_values.{l}.value", self.v[l])
            self._bin(b, f"present.{l}.key", self.k[l], output=True)
            self._bin(b, f"present.{l}.value", self.v[l], output=True)
        self._bin(b, "logits", self._logits, output=True)
        self._binding = b

    def _bind_split(self):
        D = next(s for s in self.io["embed"]["outputs"] if s.name == "hidden_states").shape[-1]
        self._h = [np.zeros((1, 1, D), F32), np.zeros((1, 1, D), F32)]
        self._len_views = [self.lengths[l:l + 1] for l in range(self.n_layers)]
        eb = self.embed_sess.io_binding()
        self._bin(eb, "input_ids", self._ids)
        self._bin(eb, "hidden_states", self._h[0], output=True)
        self._embed_b = eb
        self._layer_b = []
        for l, s in enumerate(self.layer_sess):
            b = s.io_binding()
            self._bin(b, "position", self._pos)
            self._bin(b, "past_length", self._len_views[l])
            self._bin(b, f"past_key_values.{l}.key", self.k[l])
            self._bin(b, f"past_key_values.{l}.value", self.v[l])
            self._bin(b, f"present.{l}.key", self.k[l], output=True)
            self._bin(b, f"present.{l}.value", self.v[l], output=True)
            self._layer_b.append(b)
        self._head_b = self.head_sess.io_binding()
        self._bin(self._head_b, "logits", self._logits, output=True)
        self._chain(list(range(self.n_layers)))

    def _chain(self, kept: List[int]):
        """Split shape: kept layers read/write the two hidden buffers alternately (once per mask)."""
        for i, l in enumerate(kept):
            b = self._layer_b[l]
            self._bin(b, "hidden_states", self._h[i % 2])
            self._bin(b, "hidden_states_out", self._h[(i + 1) % 2], output=True)
        self._bin(self._head_b, "hidden_states", self._h[len(kept) % 2])

    # ------------------------------------------------------------------ Backend protocol
    def prefill(self, input_ids: np.ndarray, threshold: float):
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        T = ids.shape[1]
        if T < 1 or T >= self.max_context:
            raise FirstEdgeError(f"prompt has {T} tokens; this bundle's context is {self.max_context} tokens")
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise FirstEdgeError(f"token id out of range for a vocabulary of {self.vocab}")
        self._trim()
        try:
            outs = self.prefill_sess.run(None, {"input_ids": ids, "threshold": np.array([threshold], F32)})
        except Exception as e:  # noqa: BLE001  (a damaged graph can fail only when it runs)
            raise FirstEdgeError(f"the prefill graph failed: {first_line(e)}") from None
        finally:
            self._trim()
        res = dict(zip(self._prefill_out, outs))
        for l in range(self.n_layers):
            self.k[l][:, :, :T] = res[f"present.{l}.key"]
            self.v[l][:, :, :T] = res[f"present.{l}.value"]
        self.lengths[:] = T
        return res["logits"][0], res["router_scores"].astype(F32), res["layer_mask"].astype(bool)

    def load_extend(self) -> None:
        """Load the extend graph now (a chat session does, so its second turn does not pay for it)."""
        if self.extend_sess is None:
            self.extend_sess = self._session(self._extend_file, profile=False, decode=False)
            self._check(self.extend_sess, "extend", self._extend_file)

    def extend(self, input_ids: np.ndarray, past_length: int):
        """A chat session's next turn: the new tokens through every layer after ``past_length`` tokens that
        every layer's buffer holds; their K/V are written in place at past_length.. of every buffer (entries a
        decode left there are overwritten). Returns the last position's logits [V] and the new tokens' router
        probabilities [L, T]."""
        ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64).reshape(1, -1))
        T, S = ids.shape[1], int(past_length)
        if T < 1 or not 0 < S <= int(self.lengths.min()) or S + T > self.max_context:
            raise FirstEdgeError(f"cannot extend {S} cached tokens by {T} within the context of {self.max_context}")
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise FirstEdgeError(f"token id out of range for a vocabulary of {self.vocab}")
        self.load_extend()
        b = self.extend_sess.io_binding()
        past = np.array([S], np.int32)
        probs = np.zeros((self.n_layers, T), F32)
        logits = np.zeros((1, self.vocab), F32)
        self._bin(b, "input_ids", ids)
        self._bin(b, "past_length", past)
        for l in range(self.n_layers):
            self._bin(b, f"past_key_values.{l}.key", self.k[l])
            self._bin(b, f"past_key_values.{l}.value", self.v[l])
            self._bin(b, f"present.{l}.key", self.k[l], output=True)
            self._bin(b, f"present.{l}.value", self.v[l], output=True)
        self._bin(b, "logits", logits, output=True)
        self._bin(b, "router_probs", probs, output=True)
        self._trim()
        try:
            self.extend_sess.run_with_iobinding(b)
        except Exception as e:  # noqa: BLE001  (a damaged graph can fail only when it runs)
            raise FirstEdgeError(f"the extend graph failed: {first_line(e)}") from None
        finally:
            self._trim()
        self.lengths[:] = S + T
        return logits[0], probs

    def _set_mask(self, mask) -> None:
        mask = check_mask(mask, self.n_layers)
        key = mask.tobytes()
        if key == self._mask_key:
            return
        self._mask_key = key
        self._mask[:] = mask
        self._kept = [int(i) for i in np.flatnonzero(mask)]
        if self.decode_shape == "split":
            self._chain(self._kept)

    def decode(self, token: int, position: int, mask: np.ndarray) -> np.ndarray:
        self._set_mask(mask)
        if not 0 <= position < self.max_context:
            raise FirstEdgeError(f"position {position} is outside this bundle's context of {self.max_context}")
        self._ids[0, 0] = token
        self._pos[0] = position
        try:
            if self.decode_shape == "fused":
                self.decode_sess.run_with_iobinding(self._binding)
            else:
                self.embed_sess.run_with_iobinding(self._embed_b)
                for l in self._kept:
                    self.layer_sess[l].run_with_iobinding(self._layer_b[l])
                self.head_sess.run_with_iobinding(self._head_b)
        except Exception as e:  # noqa: BLE001  (a damaged graph can fail only when it runs)
            raise FirstEdgeError(f"a decode graph failed: {first_line(e)}") from None
        self.lengths[self._mask] += 1
        return self._logits[0]

    # ------------------------------------------------------------------ misc
    def end_profiling(self) -> List[str]:
        """Stop profiling (profile=DIR) and return the JSON trace files of the decode session(s)."""
        sess = [self.decode_sess] if self.decode_shape == "fused" else \
            [self.embed_sess] + self.layer_sess + [self.head_sess]
        return [s.end_profiling() for s in sess]

    def close(self):
        self._pages = []  # the sessions (and their mappings) go below
        self._sessions.clear()
        for a in ("prefill_sess", "extend_sess", "decode_sess", "embed_sess", "layer_sess", "head_sess", "_binding",
                  "_embed_b", "_layer_b", "_head_b"):
            if hasattr(self, a):
                delattr(self, a)
        self.shared = None  # the mapping goes once no session holds its tensors
