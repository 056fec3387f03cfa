"""Measured layer importance: the quality cost of a layer mask on the base model's own continuation.

Everything the evaluation protocol v2 and the training v2 labels need reduces to one measurement:
for a prompt, the base model (every layer) decodes a greedy continuation ``y`` once; a mask ``m`` is
then scored teacher-forced on ``y`` (the prompt passes every layer, as in inference, so its K/V is
computed once and shared): per-token ``KL(base || m)`` and top-1 agreement with the base model.
:class:`Scorer` does this for many masks of one prompt in a batch (the rows share the prompt K/V).

On top of it:
- ``single_skip_costs``: the KL of skipping one layer (every other kept), per layer;
- ``toggle_labels``: the effect of toggling each layer on top of a static mask (the training labels);
- ``greedy_order`` / ``greedy_masks``: the greedy skip order (best mask sequence for k = 1..K skipped
  layers) under any score;
- ``paired_bootstrap``: the 95% interval of a mean paired difference;
- ``spread_sample``: a seeded sample spread over a file (one record per stratum).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from runtime.errors import FirstEdgeError

from .model import FirstModel, bf16_working_copy


def bf16_is_fast() -> bool:
    """bf16 pays off on CPUs with AMX (about 4x faster than fp32 for the 135M model); without AMX the
    bf16 kernels are much slower than fp32 (measured on an avx512_bf16 CPU without AMX: a 24-token
    greedy continuation took 97 s in bf16 and 6 s in fp32)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


@dataclass
class PromptState:
    """One prompt, prefilled once: ids, per-layer prompt K/V, router scores and the base continuation."""
    ids: List[int]
    kv: List[tuple]           # per layer (k, v) [1, n_kv, Tp, hd] in the scorer's dtype
    scores: np.ndarray        # router scores g [L] (float32)
    cont: List[int]           # the base model's greedy continuation (y_1 .. y_n)
    hidden: Optional[list] = None  # per layer: pooled prompt hidden states [P, D] (router inputs), if kept

    @property
    def n_scored(self) -> int:
        return max(len(self.cont) - 1, 0)


class Scorer:
    """Teacher-forced scoring of layer masks for one base model.

    ``bf16=None`` picks bf16 where it is fast (:func:`bf16_is_fast`). ``bf16=True`` runs a bf16 copy of the frozen model (about 4x faster on CPU; the base and every
    mask go through the same path, so differences between masks are measured consistently); the
    routers stay fp32 and read the hidden states in fp32, as the exported graphs do.
    ``work``: the model to run instead (``export.distributed.working_copy``: any dtype, any device);
    results come back on the CPU.
    """

    def __init__(self, fm: FirstModel, bf16: Optional[bool] = None, chunk: int = 32, work: Optional[FirstModel] = None):
        self.fm = fm
        self._bufs, self._bufs_key = None, None
        self.L = fm.n_layers
        self.chunk = int(chunk)
        if work is not None:
            self.work = work
            self.dtype = next(work.hf.parameters()).dtype
        else:
            if bf16 is None:
                bf16 = bf16_is_fast()
            if bf16:
                self.work = bf16_working_copy(fm)
                self.dtype = torch.bfloat16
            else:
                self.work = fm
                self.dtype = torch.float32
        self.device = next(self.work.hf.parameters()).device

    def _rope(self, positions):
        return tuple(t.to(self.dtype) for t in self.work.rope(positions))

    # ---- prefill and continuation
    @torch.inference_mode()
    def prepare(self, ids: Sequence[int], n_new: int, eos_ids: Sequence[int] = (), keep_hidden: bool = False
                ) -> PromptState:
        """Prefill ``ids`` with every layer, record router scores and K/V, decode ``n_new`` greedy tokens
        (stopping after an EOS id, which is kept as the last target)."""
        w = self.work
        dev = self.device
        x = torch.tensor([list(ids)], dtype=torch.int64, device=dev)
        T = x.shape[1]
        shape = (1, w.n_kv_heads, T + n_new, w.head_dim)
        bufs = [(torch.zeros(shape, dtype=self.dtype, device=dev), torch.zeros(shape, dtype=self.dtype, device=dev))
                for _ in range(self.L)]
        cos, sin = self._rope(torch.arange(T, dtype=torch.int64, device=dev).unsqueeze(0))
        pool = w.pool_weights(torch.ones(1, T, dtype=torch.bool, device=dev))[0]
        h = w.embed(x)
        scores, hidden = [], []
        for l in range(self.L):
            hf = h[0, pool].float()
            scores.append(float(w.router_probs(l, hf).mean()))
            if keep_hidden:
                hidden.append(hf.to(torch.bfloat16).cpu().clone())
            h, _, _ = w.layer(l, h, cos, sin, cache=(bufs[l][0], bufs[l][1], 0))
        tok = int(w.head(h[:, -1:])[0, -1].float().argmax())
        cont = [tok]
        eos = set(int(e) for e in eos_ids)
        pos = T
        while len(cont) < n_new and tok not in eos:
            h = w.embed(torch.tensor([[tok]], dtype=torch.int64, device=dev))
            c, s = self._rope(torch.tensor([[pos]], dtype=torch.int64, device=dev))
            for l in range(self.L):
                h, _, _ = w.layer(l, h, c, s, cache=(bufs[l][0], bufs[l][1], pos))
            tok = int(w.head(h)[0, -1].float().argmax())
            cont.append(tok)
            pos += 1
        kv = [(k[:, :, :T], v[:, :, :T]) for k, v in bufs]
        return PromptState(ids=list(ids), kv=kv, scores=np.array(scores, dtype=np.float32), cont=cont,
                           hidden=hidden if keep_hidden else None)

    def _batch_cache(self, ps: PromptState, rows: int, length: int):
        """Per layer (k, v) buffers [rows, n_kv, Tp + length, hd] holding the prompt's K/V in every row,
        kept between calls for the same prompt (decoded positions are written in place after Tp)."""
        Tp = len(ps.ids)
        key = (id(ps), rows, Tp + length)
        if self._bufs_key != key:
            self._bufs = None  # free the old buffers first
            w = self.work
            shape = (rows, w.n_kv_heads, Tp + length, w.head_dim)
            self._bufs = []
            for k, v in ps.kv:
                kb = torch.empty(shape, dtype=self.dtype, device=self.device)
                vb = torch.empty(shape, dtype=self.dtype, device=self.device)
                kb[:, :, :Tp] = k
                vb[:, :, :Tp] = v
                self._bufs.append((kb, vb))
            self._bufs_key = key
        return self._bufs

    # ---- teacher-forced forward of many masks
    @torch.inference_mode()
    def logprobs(self, ps: PromptState, masks: np.ndarray, tokens: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Log-probabilities [M, T, V] (float32) after each of ``tokens`` (default: the continuation but
        its last token), the prompt's K/V shared, the decoded positions gated by each mask row."""
        w = self.work
        toks = ps.cont[:-1] if tokens is None else list(tokens)
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.L)
        M, T = masks.shape[0], len(toks)
        dev = self.device
        if T == 0:
            return torch.zeros(M, 0, w.vocab_size, device=dev)
        Tp = len(ps.ids)
        rows = min(self.chunk, M)
        bufs = self._batch_cache(ps, rows, max(T, len(ps.cont)))
        cos, sin = self._rope((Tp + torch.arange(T, dtype=torch.int64, device=dev)).unsqueeze(0))
        emb = w.embed(torch.tensor([toks], dtype=torch.int64, device=dev))
        out = []
        for a in range(0, M, rows):
            g = torch.from_numpy(masks[a:a + rows]).to(dev)
            m = g.shape[0]
            h = emb.expand(m, T, -1)
            gates = g.to(h.dtype).view(m, self.L, 1, 1)
            for l in range(self.L):
                if not bool(g[:, l].any()):
                    continue
                kb, vb = bufs[l]
                o, _, _ = w.layer(l, h, cos, sin, cache=(kb[:m], vb[:m], Tp))
                h = o if bool(g[:, l].all()) else h + gates[:, l] * (o - h)
            out.append(torch.log_softmax(w.head(h).float(), -1))
        return torch.cat(out, 0)

    def kl(self, ps: PromptState, masks: np.ndarray, per_token: bool = False, upto: Optional[int] = None):
        """KL(base || mask) per scored token [M, T] (``per_token``) or its mean [M], and top-1 agreement
        with the base model (same shapes). The base is the all-ones mask through the same path.
        ``upto``: score only the first ``upto`` positions (causal: the rest is not computed)."""
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.L)
        ones = np.ones((1, self.L), dtype=bool)
        lp = self.logprobs(ps, np.concatenate([ones, masks], 0), tokens=ps.cont[:-1][:upto])
        base, rest = lp[:1], lp[1:]
        kl = (base.exp() * (base - rest)).sum(-1).clamp_min(0.0)
        agree = (rest.argmax(-1) == base.argmax(-1)).float()
        kl, agree = kl.cpu(), agree.cpu()
        if per_token:
            return kl.numpy(), agree.numpy()
        if kl.shape[1] == 0:
            return np.zeros(len(masks)), np.ones(len(masks))
        return kl.mean(1).numpy(), agree.mean(1).numpy()

    def nll(self, ps: PromptState, masks: np.ndarray, ref: Sequence[int]) -> np.ndarray:
        """Mean NLL [M] of the reference completion ``ref`` (tokens after the first, which the prompt's
        last position predicts whatever the mask)."""
        ref = list(ref)
        if len(ref) < 2:
            return np.zeros(len(np.asarray(masks).reshape(-1, self.L)))
        lp = self.logprobs(ps, masks, tokens=ref[:-1])
        tgt = torch.tensor(ref[1:], dtype=torch.int64, device=lp.device).view(1, -1, 1).expand(lp.shape[0], -1, 1)
        return (-lp.gather(-1, tgt).squeeze(-1)).mean(1).cpu().numpy()


# ------------------------------------------------------------------ masks from measurements
def skip_one_masks(L: int, base: Optional[np.ndarray] = None) -> np.ndarray:
    """Row l: ``base`` (default every layer) with layer l toggled."""
    b = np.ones(L, dtype=bool) if base is None else np.asarray(base, dtype=bool)
    out = np.repeat(b[None], L, 0)
    out[np.arange(L), np.arange(L)] = ~b
    return out


def single_skip_costs(scorer: Scorer, ps: PromptState) -> np.ndarray:
    """KL of skipping layer l alone (every other layer kept), for every l: [L]."""
    return scorer.kl(ps, skip_one_masks(scorer.L))[0]


def toggle_labels(scorer: Scorer, ps: PromptState, static: np.ndarray) -> tuple:
    """Per-layer marginal importance around a static mask ``static`` (True = kept):
    ``u[l] = KL(static with l off) - KL(static)`` for a kept layer (what removing it costs) and
    ``u[l] = KL(static) - KL(static with l on)`` for a skipped layer (what adding it gains). A higher
    ``u`` means more important for this prompt. Returns (u [L], KL(static))."""
    static = np.asarray(static, dtype=bool)
    kl, _ = scorer.kl(ps, np.concatenate([static[None], skip_one_masks(scorer.L, static)], 0))
    k0, kt = kl[0], kl[1:]
    u = np.where(static, kt - k0, k0 - kt)
    return u.astype(np.float32), float(k0)


def importance_order(costs: np.ndarray, pinned: Sequence[int] = ()) -> np.ndarray:
    """Layers from least to most important (the order a static mask skips them); pinned layers
    last. Ties: the higher layer index is skipped first (as Block Influence)."""
    costs = np.asarray(costs, dtype=np.float64).copy()
    L = len(costs)
    costs[list(pinned)] = np.inf
    return np.lexsort((-np.arange(L), costs))


def static_mask(order: Sequence[int], k: int, L: int) -> np.ndarray:
    if not 0 <= k <= L - 1:
        raise FirstEdgeError(f"cannot skip {k} of {L} layers (keep at least one)")
    m = np.ones(L, dtype=bool)
    m[list(order)[:k]] = False
    return m


def greedy_order(score: Callable[[np.ndarray], np.ndarray], L: int, k_max: int,
                 pinned: Sequence[int] = (), prune: Optional[int] = None) -> dict:
    """Greedy skip order: from every layer kept, skip at each step the layer whose removal gives the
    lowest ``score`` (a function of masks [M, L] -> [M], lower is better). Returns ``order`` (the layer
    skipped at steps 1..K), ``score`` (the score after each step), ``first`` {layer: the score of
    skipping it alone} and ``last`` {layer: the score of skipping it at the last step} for the
    candidates still kept. ``prune``: after the first step only the ``prune`` layers that were cheapest
    to skip alone remain candidates (the rest are never skipped; ``first`` still scores them)."""
    cur = np.ones(L, dtype=bool)
    pin = set(int(p) for p in pinned)
    order, scores, first, last = [], [], {}, {}
    for step in range(k_max):
        cand = [l for l in range(L) if cur[l] and l not in pin]
        if not cand:
            break
        trial = np.repeat(cur[None], len(cand), 0)
        trial[np.arange(len(cand)), cand] = False
        s = np.asarray(score(trial), dtype=np.float64)
        best = int(np.argmin(s))
        cur[cand[best]] = False
        order.append(int(cand[best]))
        scores.append(float(s[best]))
        last = {int(l): float(v) for j, (l, v) in enumerate(zip(cand, s)) if j != best}
        if step == 0:
            first = {int(l): float(v) for l, v in zip(cand, s)}
            if prune is not None:
                pin |= set(sorted(last, key=lambda l: (last[l], -l))[max(int(prune) - 1, 0):])
    return {"order": order, "score": scores, "first": first, "last": last}


def greedy_masks(score: Callable[[np.ndarray], np.ndarray], L: int, k_max: int,
                 pinned: Sequence[int] = ()) -> Dict[int, np.ndarray]:
    """Greedy best masks (``greedy_order``) for k = 1..K skipped layers: {k: mask}."""
    order = greedy_order(score, L, k_max, pinned)["order"]
    out = {}
    for k in range(1, len(order) + 1):
        m = np.ones(L, dtype=bool)
        m[order[:k]] = False
        out[k] = m
    return out


# ------------------------------------------------------------------ statistics and sampling
def paired_bootstrap(diff: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of paired differences with a percentile bootstrap interval over the pairs."""
    d = np.asarray(diff, dtype=np.float64)
    if d.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(1)
    a = (1.0 - level) / 2
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(d.size)}


def verdict(ci: dict) -> str:
    """'win' when the interval of (baseline - FiRST) lies above 0, 'loss' below, else 'tie'."""
    if ci["n"] == 0:
        return "tie"
    if ci["lo"] > 0:
        return "win"
    if ci["hi"] < 0:
        return "loss"
    return "tie"


def spread_sample(items: Sequence, n: int, seed: int = 0) -> List:
    """``n`` items spread over the sequence: it is cut into ``n`` contiguous strata and one item is drawn
    from each (seeded), so records that sit together in a file (one article, one database) are not
    sampled together. All items, in order, when there are no more than ``n``."""
    items = list(items)
    if n <= 0 or len(items) <= n:
        return items
    rng = random.Random(seed)
    edges = np.linspace(0, len(items), n + 1)
    out = []
    for i in range(n):
        a, b = int(round(edges[i])), int(round(edges[i + 1]))
        out.append(items[rng.randrange(a, max(b, a + 1))])
    return out
