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
