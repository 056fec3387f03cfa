"""Chat-session cost: a turn's prefill grows with its new tokens, not with the conversation (issue 12).

    python bench/bench_session.py --bundle dist/NAME [--turns 8] [--new-tokens 48] [--threads 2] [--json OUT]

One runtime.Session on the bundle (ONNX Runtime or ExecuTorch, whichever it names) talks through ``--turns``
fixed user messages, greedy, stopping at end of turn. For every turn it reports the conversation's length, the
tokens this turn ran through every layer (the previous reply, the template and the user message) and the
time of that step, and, for comparison, the time a runtime without sessions would pay: a second backend
prefilling the whole conversation so far. Decode speed and layers kept are reported too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import table  # noqa: E402
from runtime.errors import cli_main  # noqa: E402

MESSAGES = [
    "What is a rainbow?",
    "Why are its colors always in the same order?",
    "And why is the sky blue?",
    "Give me one sentence about sunsets.",
    "What is 12 times 7?",
    "Translate 'good morning' into French.",
    "Name three planets of the solar system.",
    "Thank you. Summarize our conversation in one sentence.",
]


@cli_main
def main(argv=None):
    from runtime.backends import load_backend
    from runtime.bundle import Bundle
    from runtime.loop import SamplingConfig
    from runtime.session import Session
    from runtime.tokenizer import BundleTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    bundle = Bundle(args.bundle)
    tok = BundleTokenizer(bundle)
    session = Session.from_bundle(bundle, load_backend(bundle, threads=args.threads), tok)
    full = load_backend(bundle, threads=args.threads)  # the no-session baseline: re-prefill everything
    rows = []
    for i in range(args.turns):
        r = session.chat(MESSAGES[i % len(MESSAGES)], SamplingConfig(max_new_tokens=args.new_tokens), trim=True)
        hist = session.history
        t0 = time.perf_counter()
        full.prefill(hist, bundle.default_threshold)
        full_ms = (time.perf_counter() - t0) * 1e3
        s = r.stats()
        rows.append({"turn": r.turn, "conversation tokens": len(hist), "reused": r.reused_tokens,
                     "new tokens": r.prefilled_tokens, "session prefill ms": round(s["prefill_ms"], 1),
                     "full re-prefill ms": round(full_ms, 1),
                     "ratio": round(full_ms / max(s["prefill_ms"], 1e-9), 2),
                     "decode tok/s": s["decode_tokens_per_s"], "reply tokens": len(r.reply_ids),
                     "layers kept": f"{s['layers_kept']}/{s['n_layers']}", "dropped turns": r.dropped_turns})
        print(f"[bench] {r.stats_line()} | full re-prefill {full_ms:.1f} ms", file=sys.stderr)
    cols = list(rows[0])
    print(f"bundle {bundle.path.name} ({bundle.manifest['runtime']}, {bundle.manifest.get('quantization')}), "
          f"{args.threads} threads, up to {args.new_tokens} new tokens a turn")
    print(table(rows, cols))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
