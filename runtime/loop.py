"""The one generation loop every backend plugs into (PyTorch reference, ONNX Runtime, ExecuTorch).

A backend implements :class:`Backend`: ``prefill`` runs every layer over the prompt, fills the
backend's own per-layer KV buffers and returns the last position's logits and the router scores;
``decode`` runs one token through the kept layers only. Sampling, stopping, streaming and the
statistics are written here once, in numpy, so every runtime decodes the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol, Sequence

import numpy as np

from .errors import FirstEdgeError
from .masks import check_mask, make_mask, mask_str, pinned_array


class Backend(Protocol):
    n_layers: int
    max_context: int

    def prefill(self, input_ids: np.ndarray, threshold: float):
        """Run all layers on ``input_ids`` (int64 [T]); return (logits [V], scores [L], mask [L] for threshold)."""

    def extend(self, input_ids: np.ndarray, past_length: int):
        """Chat sessions: run new tokens through every layer after ``past_length`` cached tokens, writing their K/V
        at past_length.. of every layer; return (logits [V], per-token router probabilities [L, T])."""

    def decode(self, token: int, position: int, mask: np.ndarray) -> np.ndarray:
        """Run one token at ``position`` through the layers where ``mask`` is True; return logits [V]."""


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    eos_ids: Sequence[int] = ()
    ignore_eos: bool = False

    def check(self):
        if self.max_new_tokens < 1:
            raise FirstEdgeError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise FirstEdgeError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise FirstEdgeError("top_p must be in (0, 1]")


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.cfg.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.cfg.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.cfg.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            cut = int(np.searchsorted(cum, self.cfg.top_p)) + 1  # smallest prefix with mass >= top_p
            keep = order[:cut]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(len(p), p=p))


@dataclass
class GenerationResult:
    tokens: List[int]
    mask: np.ndarray
    scores: np.ndarray
    prompt_tokens: int
    prefill_ms: float
    decode_s: float
    stop_reason: str
    first_logits: Optional[np.ndarray] = None
    step_logits: List[np.ndarray] = field(default_factory=list)

    def reply_tokens(self, eos_ids: Sequence[int]) -> List[int]:
        """The reply: the tokens before the first end-of-turn / EOS id (a run with ``ignore_eos``,
        e.g. a benchmark timing a fixed count, decodes past it; what follows is not the reply)."""
        eos = set(int(e) for e in eos_ids)
        for i, t in enumerate(self.tokens):
            if t in eos:
                return self.tokens[:i]
        return list(self.tokens)

    @property
    def layers_kept(self) -> int:
        return int(self.mask.sum())

    @property
    def decode_tokens_per_s(self) -> float:
        # tokens produced by decode steps (the first token comes from prefill)
        n = max(len(self.tokens) - 1, 0)
        return n / self.decode_s if self.decode_s > 0 and n else float("nan")

    def stats(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.tokens),
            "prefill_ms": round(self.prefill_ms, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "layers_kept": self.layers_kept,
            "n_layers": int(len(self.mask)),
            "kept_layers": [int(i) for i in np.flatnonzero(self.mask)],
            "mask": mask_str(self.mask),
            "stop_reason": self.stop_reason,
        }

    def stats_line(self) -> str:
        s = self.stats()
        skipped = [i for i in range(s["n_layers"]) if not self.mask[i]]
        return (f"prompt {s['prompt_tokens']} tok | prefill {s['prefill_ms']:.1f} ms | "
                f"decode {s['decode_tokens_per_s']:.2f} tok/s over {s['new_tokens']} tok | "
                f"layers kept {s['layers_kept']}/{s['n_layers']} | skipped {skipped} | stop: {s['stop_reason']}")


def generate(backend: Backend, input_ids: Sequence[int], sampling: SamplingConfig, *,
             threshold: Optional[float] = None, keep: Optional[int] = None, pinned: Sequence[int] = (),
             mask: Optional[np.ndarray] = None, default_threshold: float = 0.5,
             on_token: Optional[Callable[[int], None]] = None, keep_logits: bool = False,
             past_length: int = 0, pool_from: int = 0) -> GenerationResult:
    """Prefill, fix the mask once, then decode token by token through the kept layers.

    ``mask`` overrides the router decision (for tests and benchmarks); otherwise the mask comes
    from the prefill's router scores by threshold (the graph's own ``layer_mask``) or budget.

    ``past_length`` > 0 (a chat session's next turn, runtime/session.py): ``input_ids`` are new tokens after
    the ``past_length`` tokens every layer's cache already holds; they run through every layer with
    ``backend.extend`` and the router scores are the mean of their per-token probabilities over
    ``[min(pool_from, T - 1), T)`` (the turn's user message), the single-turn pooling rule.
    """
    sampling.check()
    ids = np.asarray(list(input_ids), dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise FirstEdgeError("the prompt is empty")
    if past_length + ids.size >= backend.max_context:
        raise FirstEdgeError(
            f"prompt has {past_length + ids.size} tokens, longer than the context of {backend.max_context} tokens "
            f"(at least one position must be left to generate)")
    thr = default_threshold if threshold is None else float(threshold)
    t0 = time.perf_counter()
    if past_length:
        logits, probs = backend.extend(ids, past_length)
        probs = np.asarray(probs, dtype=np.float32)
        scores = probs[:, min(int(pool_from), ids.size - 1):].mean(axis=1)
        graph_mask = None  # the threshold rule applies below, as for a budget
    else:
        logits, scores, graph_mask = backend.prefill(ids, thr)
    scores = np.asarray(scores, dtype=np.float32)
    if mask is not None:
        final_mask = check_mask(mask, backend.n_layers)  # used exactly as given
    elif keep is not None or graph_mask is None:
        final_mask = make_mask(scores, threshold=threshold, keep=keep, pinned=pinned, default_threshold=default_threshold)
    else:
        final_mask = check_mask(graph_mask, backend.n_layers) | pinned_array(backend.n_layers, pinned)
    sampler = Sampler(sampling)
    eos = set(int(e) for e in sampling.eos_ids)
    tok = sampler(logits)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    tokens = [tok]
    step_logits = []
    if on_token:
        on_token(tok)
    stop = "max_new_tokens"
    pos = int(past_length + ids.size)
    t1 = time.perf_counter()
    while True:
        if tok in eos and not sampling.ignore_eos:
            stop = "eos"
            break
        if len(tokens) >= sampling.max_new_tokens:
            break
        if pos >= backend.max_context:
            stop = "max_context"
            break
        out = backend.decode(tok, pos, final_mask)
        if keep_logits:
            step_logits.append(np.array(out, dtype=np.float32, copy=True))
        tok = sampler(out)
        tokens.append(tok)
        pos += 1
        if on_token:
            on_token(tok)
    decode_s = time.perf_counter() - t1
    return GenerationResult(tokens=tokens, mask=final_mask, scores=scores, prompt_tokens=int(ids.size),
                            prefill_ms=prefill_ms, decode_s=decode_s, stop_reason=stop,
                            first_logits=np.array(logits, dtype=np.float32, copy=True) if keep_logits else None,
                            step_logits=step_logits)


def add_generation_args(ap, prompt_required: bool = True) -> None:
    """The generation options shared by ``python -m runtime`` and ``python -m export.generate``."""
    ap.add_argument("--prompt", required=prompt_required, help="the user message (the chat template is applied)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, help="keep layer l when its prompt-mean router score >= T")
    g.add_argument("--keep", type=int, help="layer budget: keep the K highest-scoring layers")
    g.add_argument("--mask", help="explicit layer mask as a 0/1 string of length L (overrides the routers)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    ap.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    ap.add_argument("--json", action="store_true", help="print the stats as one JSON line")
