"""Backend registry: the manifest's ``runtime`` names the module that runs the bundle's graphs."""
from __future__ import annotations

import importlib

from .bundle import Bundle
from .errors import FirstEdgeError

BACKENDS = {
    "onnxruntime": ("runtime.ort_backend", "OrtBackend"),
    "executorch": ("runtime.et_backend", "EtBackend"),
}


def load_backend(bundle: Bundle, threads: int = 2, **opts):
    mod_name, cls_name = BACKENDS[bundle.manifest["runtime"]]
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise FirstEdgeError(f"the {bundle.manifest['runtime']} backend is not available here: {e}") from None
    return getattr(mod, cls_name)(bundle, threads=threads, **opts)
