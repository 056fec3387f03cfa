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


def measure_bundle(be, bundle, new_tokens: int, runs: int, mask: str = None, keep: int = None,
                   threshold: float = None) -> dict:
    """One bench configuration on a loaded runtime backend: 1 warm-up + ``runs`` timed generations.

    ``mask`` is a 0/1 string (overrides the routers); otherwise ``keep``/``threshold`` pick the mask.
    Returns the JSON-able summary the bench parents print (medians, each run, mask, text).
    """
    from runtime.loop import SamplingConfig, generate
    from runtime.masks import mask_str, parse_mask
    from runtime.tokenizer import BundleTokenizer

    tok = BundleTokenizer(bundle)
    ids = tok.encode_prompt(USER_MSG)
    cfg = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    m = parse_mask(mask, bundle.n_layers) if mask else None
    kw = dict(mask=m) if m is not None else dict(keep=keep, threshold=threshold)
    timed, res = [], None
    for i in range(1 + runs):
        res = generate(be, ids, cfg, pinned=bundle.pinned, default_threshold=bundle.default_threshold, **kw)
        if i:
            timed.append({"prefill_ms": round(res.prefill_ms, 2), "decode_tok_s": round(res.decode_tokens_per_s, 2)})
    return {
        "prefill_ms": statistics.median(r["prefill_ms"] for r in timed),
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in timed),
        "runs": timed, "new_tokens": len(res.tokens), "prompt_tokens": len(ids),
        "mask": mask_str(res.mask), "layers_kept": res.layers_kept,
        "tokens": res.tokens, "text": tok.decode(res.tokens)[:80],
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
