"""User-facing errors shared by the host toolchain and the device runtime.

Anything the user can cause (bad folder, bad bundle, bad prompt, bad mask) raises
:class:`FirstEdgeError` with one line naming the problem; the CLIs print that line and exit 2
instead of showing a traceback.
"""
from __future__ import annotations

import functools
import sys


class FirstEdgeError(Exception):
    """An error caused by the user's input, reported as a single clear line."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty),
    at most ``limit`` characters: what a one-line error quotes from a library's exception."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(e).__name__


def quiet_host_libraries():
    """Silence import-time chatter of host libraries (torchao's optional CUDA kernels, pytree notices)."""
    import logging
    import os
    import warnings

    # deprecation notices from inside torch/executorch (e.g. pytree's LeafSpec, ~100 per ExecuTorch export)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(copyreg|torch|executorch|torchao)(\.|$)")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cli_main(fn):
    """Decorate a CLI ``main``: a FirstEdgeError becomes ``error: ...`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FirstEdgeError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            raise SystemExit(130)

    return wrapper
