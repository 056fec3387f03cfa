#!/usr/bin/env python
"""Quality of ONNX bundles (fp32 / int8 / int4) with the evaluation protocol of the finetuning issue,
running on the ONNX Runtime backend (prints a table).

    python bench/quality_onnx.py --bundles dist/a,dist/b,... [--data ../shared/data] [--limit 10]
                                 [--tasks qa,arithmetic,...] [--max-new-tokens 48]

Per task, the ``val`` records (first ``--limit``), greedy decoding, scored with the metric each record
names (``export.metrics.score``, the evaluator's metric code), under the all-ones mask and the
routers' own mask (the bundle's default threshold; skipped for untrained routers, which keep every layer).
Also reports, per bundle, the mean decode layers kept and the token agreement with the first bundle.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    from export.data import load_split
    from export.metrics import score
    from runtime.bundle import Bundle
    from runtime.loop import SamplingConfig, generate
    from runtime.ort_backend import OrtBackend
    from runtime.tokenizer import BundleTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", required=True, help="comma-separated bundle folders")
    ap.add_argument("--data", default=os.environ.get("FIRST_EDGE_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    per_task = load_split(args.data, "val", args.tasks.split(",") if args.tasks else None, limit=args.limit)
    bundles = [Path(b) for b in args.bundles.split(",")]
    rows = []
    first_tokens = {}
    for bi, bpath in enumerate(bundles):
        b = Bundle(bpath)
        tok = BundleTokenizer(b)
        be = OrtBackend(b, threads=args.threads)
        eos = b.eos_ids
        t0 = time.time()
        modes = ("all-ones",) if b.routing.get("router_source") == "untrained" else ("all-ones", "routers")
        for mode in modes:
            res_task, kept, agree = {}, [], []
            for task, recs in per_task.items():
                s = []
                for i, rec in enumerate(recs):
                    ids = tok.encode_prompt(rec.prompt)[-(b.max_context - args.max_new_tokens - 1):]
                    kw = {"mask": np.ones(b.n_layers, bool)} if mode == "all-ones" else {}
                    r = generate(be, ids, SamplingConfig(max_new_tokens=args.max_new_tokens, eos_ids=eos),
                                 pinned=b.pinned, default_threshold=b.default_threshold, **kw)
                    text = tok.decode([t for t in r.tokens if t not in eos]).strip()
                    s.append(score(text, rec.references, rec.metric))
                    kept.append(r.layers_kept)
                    key = (mode, task, i)
                    if bi == 0:
                        first_tokens[key] = r.tokens
                    elif key in first_tokens:
                        ref = first_tokens[key]
                        n = min(len(ref), len(r.tokens))
                        agree.append(float(np.mean([a == c for a, c in zip(ref[:n], r.tokens[:n])])) if n else 0.0)
                res_task[task] = (float(np.mean(s)), recs[0].metric)
            rows.append({"bundle": bpath.name, "quant": b.manifest.get("quantization"), "mode": mode,
                         "tasks": res_task, "kept": float(np.mean(kept)),
                         "agree": float(np.mean(agree)) if agree else 1.0})
        print(f"# {bpath}: {time.time() - t0:.0f}s", file=sys.stderr)
    tasks = list(per_task)
    print(f"\n## Quality on this backend (val, first {args.limit} records per task, greedy, "
          f"max {args.max_new_tokens} new tokens)\n")
    print("| bundle | quantization | mask | " + " | ".join(f"{t} ({per_task[t][0].metric})" for t in tasks)
          + " | mean | layers kept | token agreement with first bundle |")
    print("|---|---|---|" + "---:|" * (len(tasks) + 3))
    for r in rows:
        vals = [r["tasks"][t][0] for t in tasks]
        print(f"| {r['bundle']} | {r['quant']} | {r['mode']} | " + " | ".join(f"{v:.3f}" for v in vals)
              + f" | {np.mean(vals):.3f} | {r['kept']:.1f} | {r['agree']:.2f} |")


if __name__ == "__main__":
    main()
