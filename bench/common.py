"""Benchmark method shared by every bench script (same as ../shared/peers, so numbers compare).

Prompt: the chat-formatted 58-token "rainbow" message; 128 greedy new tokens, EOS ignored;
1 warm-up + 3 timed runs, median; prefill_ms = start to first new token; decode tok/s =
(new_tokens - 1) / (time from first to last new token).
"""
from __future__ import annotations

import os
import resource
import statistics

USER_MSG = ("Explain in a few short paragraphs how a rainbow forms, why its colors "
            "always appear in the same order, and why the sky is blue.")
N_NEW = int(os.environ.get("BENCH_NEW_TOKENS", "128"))
N_RUNS = int(os.environ.get("BENCH_RUNS", "3"))
N_WARMUP = int(os.environ.get("BENCH_WARMUP", "1"))


def median_runs(fn, runs: int = N_RUNS, warmup: int = N_WARMUP):
    """fn() -> GenerationResult; returns (median prefill ms, median decode tok/s, last result)."""
    for _ in range(warmup):
        fn()
    pre, dec, res = [], [], None
    for _ in range(runs):
        res = fn()
        pre.append(res.prefill_ms)
        dec.append(res.decode_tokens_per_s)
    return statistics.median(pre), statistics.median(dec), res, dec


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def table(rows, cols):
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)
