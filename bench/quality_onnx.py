#!/usr/bin/env python
"""Quality of ONNX bundles (fp32 / int8 / int4) with the evaluation protocol of the finetuning issue,
running on the ONNX Runtime backend (prints a table).

    python bench/quality_onnx.py --bundles dist/a,dist/b,... [--data ../shared/data] [--limit 10 | --sample 8]
                                 [--seed 0] [--tasks qa,arithmetic,...] [--max-new-tokens 48] [--wait S]

Per task, the ``val`` records (the first ``--limit``, or with ``--sample N`` a seeded sample of N spread over the
file, as export/evaluate.py samples), greedy decoding, scored with the metric each record
names (``export.metrics.score``, the evaluator's metric code), under the all-ones mask and the
routers' own mask (the bundle's default threshold; skipped for untrained routers, which keep every layer).
Also reports, per bundle, the mean decode layers kept, the token agreement with the first bundle, and
KL(first bundle || this bundle) in nats per token, teacher-forced on the first bundle's own greedy continuation
(each bundle's prefill, then its decode graph fed the first bundle's tokens, under the same mask rule), and the
mean metric as a fraction of the first bundle's. Put the reference (fp32) bundle first.
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


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(-1)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def forced_logits(be, ids, tokens, mask, threshold: float):
    """The bundle's logits for each position of ``tokens`` (another bundle's continuation of ``ids``): prefill, then
    decode fed ``tokens`` (teacher forcing) under ``mask``."""
    logits = be.prefill(np.asarray(ids, np.int64), threshold)[0]
    m = np.asarray(mask, bool)
    out = [np.array(logits, np.float32).reshape(-1)]
    for i, t in enumerate(tokens[:-1]):
        out.append(np.array(be.decode(int(t), len(ids) + i, m), np.float32).reshape(-1))
    return out


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
    ap.add_argument("--sample", type=int, default=0, help="N records a task spread over the val file (seeded) "
                    "instead of the first --limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait", type=float, default=0, help="seconds to wait for a bundle that is still being built "
                    "(no manifest.json yet) when its turn comes")
    args = ap.parse_args()
    if args.sample:
        from export.importance import spread_sample

        per_task = {t: spread_sample(recs, args.sample, seed=args.seed)
                    for t, recs in load_split(args.data, "val", args.tasks.split(",") if args.tasks else None).items()}
    else:
        per_task = load_split(args.data, "val", args.tasks.split(",") if args.tasks else None, limit=args.limit)
    bundles = [Path(b) for b in args.bundles.split(",")]
    rows = []
    first_tokens = {}
    first_logp = {}  # (mode, task, i) -> float16 log-probabilities of the first bundle along its continuation
    for bi, bpath in enumerate(bundles):
        deadline = time.time() + args.wait
        while not (bpath / "manifest.json").exists() and time.time() < deadline:
            time.sleep(10)
        b = Bundle(bpath)
        tok = BundleTokenizer(b)
        be = OrtBackend(b, threads=args.threads)
        eos = b.eos_ids
        t0 = time.time()
        modes = ("all-ones",) if b.routing.get("router_source") == "untrained" else ("all-ones", "routers")
        for mode in modes:
            res_task, kept, agree = {}, [], []
            for task, recs in per_task.items():
                s, kls = [], []
                for i, rec in enumerate(recs):
                    ids = tok.encode_prompt(rec.prompt)[-(b.max_context - args.max_new_tokens - 1):]
                    kw = {"mask": np.ones(b.n_layers, bool)} if mode == "all-ones" else {}
                    r = generate(be, ids, SamplingConfig(max_new_tokens=args.max_new_tokens, eos_ids=eos),
                                 pinned=b.pinned, default_threshold=b.default_threshold, keep_logits=bi == 0, **kw)
                    key = (mode, task, i)
                    if bi == 0:
                        first_logp[key] = [log_softmax(x).astype(np.float16)
                                           for x in [r.first_logits] + r.step_logits]
                    elif key in first_tokens:
                        ref = first_tokens[key]
                        # under the mask this bundle's own generation used (all-ones, or its routers' mask)
                        got = forced_logits(be, ids, ref, r.mask, b.default_threshold)
                        for lp_ref, lg in zip(first_logp[key], got):
                            p = lp_ref.astype(np.float64)
                            kls.append(float((np.exp(p) * (p - log_softmax(lg))).sum()))
                    text = tok.decode([t for t in r.tokens if t not in eos]).strip()
                    s.append(score(text, rec.references, rec.metric))
                    kept.append(r.layers_kept)
                    if bi == 0:
                        first_tokens[key] = r.tokens
                    elif key in first_tokens:
                        ref = first_tokens[key]
                        n = min(len(ref), len(r.tokens))
                        agree.append(float(np.mean([a == c for a, c in zip(ref[:n], r.tokens[:n])])) if n else 0.0)
                res_task[task] = (float(np.mean(s)), recs[0].metric, kls)
            q = b.manifest.get("quantization")
            qz = b.manifest.get("graphs", {}).get("quantizer") or {}
            algo = qz.get("algorithm")
            if algo and qz.get("int8_weights"):  # mixed precision: the 8-bit rule after the 4-bit algorithm
                algo += " + 8-bit " + qz["int8_weights"]["rule"]
            all_kl = [k for t in res_task.values() for k in t[2]]
            rows.append({"bundle": bpath.name, "quant": f"{q} {algo}" if algo else (q if q == "none" else f"{q} (before)"),
                         "mode": mode, "tasks": res_task, "kept": float(np.mean(kept)),
                         "agree": float(np.mean(agree)) if agree else 1.0,
                         "kl": float(np.mean(all_kl)) if all_kl else 0.0})
        be.close()
        print(f"# {bpath}: {time.time() - t0:.0f}s", file=sys.stderr)
    tasks = list(per_task)
    n = len(next(iter(per_task.values())))
    how = (f"{args.sample} records per task spread over the file, seed {args.seed}" if args.sample
           else f"first {args.limit} records per task")
    print(f"\n## Quality on this backend (val, {how}, greedy, max {args.max_new_tokens} new tokens; "
          f"{time.strftime('%Y-%m-%d %H:%M')})\n")
    print("| bundle | quantization | mask | " + " | ".join(f"{t} ({per_task[t][0].metric})" for t in tasks)
          + " | mean | mean / first | KL to first (nats/token) | layers kept | token agreement with first bundle |")
    print("|---|---|---|" + "---:|" * (len(tasks) + 5))
    base = {}
    for r in rows:
        vals = [r["tasks"][t][0] for t in tasks]
        base.setdefault(r["mode"], np.mean(vals))
        rel = np.mean(vals) / base[r["mode"]] if base[r["mode"]] > 0 else float("nan")
        print(f"| {r['bundle']} | {r['quant']} | {r['mode']} | " + " | ".join(f"{v:.3f}" for v in vals)
              + f" | {np.mean(vals):.3f} | {rel:.2f} | {r['kl']:.4f} | {r['kept']:.1f} | {r['agree']:.2f} |")
    if len(rows) > 1:
        print(f"\nKL per task (nats/token, {n} prompts a task):\n")
        print("| bundle | mask | " + " | ".join(tasks) + " |")
        print("|---|---|" + "---:|" * len(tasks))
        for r in rows[1:]:
            print(f"| {r['bundle']} | {r['mode']} | " + " | ".join(
                f"{np.mean(r['tasks'][t][2]):.4f}" if r["tasks"][t][2] else "" for t in tasks) + " |")


if __name__ == "__main__":
    main()
