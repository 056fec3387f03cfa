"""Input-agnostic layer-skipping baselines (DESIGN.md section 4), as explicit layer masks.

- Block Influence (ShortGPT, Men et al. 2024): BI_l = 1 - mean_t cos(h_l[t], h_{l+1}[t]) over
  calibration prompts; skip the k layers with the lowest BI (ties: the higher index goes first).
- Evenly spaced middle layers (Unified Layer Skipping): skip k layers spread uniformly over layers
  1..L-2 (the first and last layers are kept).
- Random: k layers drawn uniformly without replacement (one seed a mask; reports average 3 seeds).

Every mask is a bool array [L] with exactly L - k True entries (True = layer kept).
"""
from __future__ import annotations

from typing import Iterable, List, Sequence

import numpy as np
import torch

from runtime.errors import FirstEdgeError

KINDS = ("block_influence", "even", "random")


def _check(L: int, k: int):
    if not 0 <= int(k) <= L - 1:
        raise FirstEdgeError(f"cannot skip {k} of {L} layers (keep at least one)")


@torch.no_grad()
def block_influence(fm, prompts: Iterable[Sequence[int]]) -> np.ndarray:
    """BI per layer [L] over the tokens of the given prompts (token id lists), full model."""
    dev = fm.inv_freq.device  # the model's device
    tot = torch.zeros(fm.n_layers, dtype=torch.float64, device=dev)
    n = 0
    for ids in prompts:
        x = torch.tensor([list(ids)], dtype=torch.int64, device=dev)
        pos = torch.arange(x.shape[1], dtype=torch.int64, device=dev).unsqueeze(0)
        cos, sin = fm.rope(pos)
        h = fm.embed(x)
        for l in range(fm.n_layers):
            out, _, _ = fm.layer(l, h, cos, sin)
            tot[l] += torch.nn.functional.cosine_similarity(h[0].double(), out[0].double(), dim=-1).sum()
            h = out
        n += x.shape[1]
    if n == 0:
        raise FirstEdgeError("Block Influence needs at least one calibration prompt")
    return (1.0 - tot / n).cpu().numpy()


def bi_mask(bi: Sequence[float], k: int) -> np.ndarray:
    bi = np.asarray(bi, dtype=np.float64)
    L = len(bi)
    _check(L, k)
    order = np.lexsort((-np.arange(L), bi))  # lowest BI first, ties: higher index first
    mask = np.ones(L, dtype=bool)
    mask[order[:k]] = False
    return mask


def even_mask(L: int, k: int) -> np.ndarray:
    _check(L, k)
    mask = np.ones(L, dtype=bool)
    if k == 0:
        return mask
    middle = np.arange(1, L - 1) if L > 2 else np.arange(L)
    if k <= len(middle):
        pos = np.linspace(0, len(middle) - 1, k + 2)[1:-1] if k <= len(middle) - 2 else np.linspace(0, len(middle) - 1, k)
        idx = np.floor(pos + 0.5).astype(int)
        chosen = list(dict.fromkeys(int(middle[i]) for i in idx))
    else:
        chosen = [int(i) for i in middle]
    # fill up (only when rounding collided or k exceeds the middle) nearest to the centre first
    rest = sorted((i for i in range(L) if i not in chosen), key=lambda i: (abs(i - (L - 1) / 2), i))
    chosen += rest[:k - len(chosen)]
    mask[chosen[:k]] = False
    return mask


def random_mask(L: int, k: int, seed: int) -> np.ndarray:
    _check(L, k)
    rng = np.random.default_rng(seed)
    mask = np.ones(L, dtype=bool)
    mask[rng.choice(L, size=k, replace=False)] = False
    return mask


def baseline_masks(kind: str, L: int, k: int, bi=None, seeds: Sequence[int] = (0, 1, 2)) -> List[np.ndarray]:
    """The mask(s) of one baseline at k skipped layers (random: one per seed)."""
    if kind == "block_influence":
        if bi is None:
            raise FirstEdgeError("Block Influence needs calibration scores")
        return [bi_mask(bi, k)]
    if kind == "even":
        return [even_mask(L, k)]
    if kind == "random":
        return [random_mask(L, k, s) for s in seeds]
    raise FirstEdgeError(f"unknown baseline '{kind}' (known: {', '.join(KINDS)})")
