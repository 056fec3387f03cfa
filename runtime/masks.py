"""Layer-mask rules of DESIGN.md section 1, in numpy, shared by every runtime and the host.

``g`` are the prompt-mean router scores, one per layer. A layer is kept when ``g >= threshold``
(threshold mode) or when it is among the ``keep`` highest scores (budget mode, ties broken by the
lower layer index). Pinned layers are always kept; in budget mode they take their slots first.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from .errors import FirstEdgeError


def pinned_array(n_layers: int, pinned: Iterable[int]) -> np.ndarray:
    out = np.zeros(n_layers, dtype=bool)
    for p in pinned:
        p = int(p)
        if not 0 <= p < n_layers:
            raise FirstEdgeError(f"pinned layer {p} is out of range for a model with {n_layers} layers")
        out[p] = True
    return out


def threshold_mask(scores: np.ndarray, threshold: float, pinned: Iterable[int] = ()) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32)
    return (scores >= np.float32(threshold)) | pinned_array(len(scores), pinned)


def budget_mask(scores: np.ndarray, keep: int, pinned: Iterable[int] = ()) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32)
    n = len(scores)
    pin = pinned_array(n, pinned)
    keep = int(keep)
    if not 1 <= keep <= n:
        raise FirstEdgeError(f"--keep must be between 1 and the number of layers ({n}), got {keep}")
    if keep < int(pin.sum()):
        raise FirstEdgeError(f"--keep {keep} is smaller than the number of pinned layers ({int(pin.sum())})")
    mask = pin.copy()
    # highest score first, ties broken by the lower layer index (np.lexsort: last key is primary)
    order = np.lexsort((np.arange(n), -scores))
    for idx in order:
        if mask.sum() >= keep:
            break
        mask[idx] = True
    return mask


def make_mask(scores: np.ndarray, threshold: Optional[float] = None, keep: Optional[int] = None,
              pinned: Iterable[int] = (), default_threshold: float = 0.5) -> np.ndarray:
    if threshold is not None and keep is not None:
        raise FirstEdgeError("give either a threshold or a layer budget (--keep), not both")
    if keep is not None:
        return budget_mask(scores, keep, pinned)
    return threshold_mask(scores, default_threshold if threshold is None else threshold, pinned)


def check_mask(mask, n_layers: int) -> np.ndarray:
    """Validate a user- or graph-supplied mask: length L, booleans (or 0/1)."""
    arr = np.asarray(mask)
    if arr.ndim != 1 or arr.shape[0] != n_layers:
        raise FirstEdgeError(f"layer mask has length {arr.size if arr.ndim else 0}, the model has {n_layers} layers")
    if arr.dtype != bool:
        if not np.all((arr == 0) | (arr == 1)):
            raise FirstEdgeError("layer mask must contain only 0/1 (or booleans)")
        arr = arr.astype(bool)
    return arr


def parse_mask(text: str, n_layers: int) -> np.ndarray:
    """Parse a mask given as a string of 0/1 characters, e.g. ``1101...``."""
    text = text.strip()
    if not set(text) <= {"0", "1"}:
        raise FirstEdgeError("a mask string must contain only the characters 0 and 1")
    return check_mask(np.array([c == "1" for c in text], dtype=bool), n_layers)


def mask_str(mask) -> str:
    return "".join("1" if m else "0" for m in mask)
