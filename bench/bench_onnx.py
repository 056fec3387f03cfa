#!/usr/bin/env python
"""Decode-speed benchmark of the ONNX Runtime bundle against stock ONNX Runtime exports (prints a table).

    python bench/bench_onnx.py [--model DIR] [--run runs/NAME] [--quantize none,int4] [--keep K]
                               [--peers onnx-fp32,onnx-int8,genai-fp32,genai-int4] [--runs 3]

Method (the peers' harness, bench/peers/peer_common.py): the SmolLM2 chat prompt of 58 tokens, 128 greedy
tokens with EOS ignored, 2 threads, 1 warm-up + ``--runs`` timed runs in one child process per
configuration, median; peak RSS = "Maximum resident set size" of ``/usr/bin/time -v`` around that child.
prefill ms = prompt forward + first greedy pick; decode tok/s = 127 / (first to last new token).

Rows: our bundle (fused and split decode) with the all-ones mask and a FiRST mask on the same bundle,
the per-token cost at two max_context values (it must not grow), and the peers, each in its own
virtual environment (``bash bench/peers/setup.sh onnx genai``): Optimum's export run with
``ORTModelForCausalLM`` (fp32, int8) and onnxruntime-genai's model builder (fp32, int4).
The ideal speedup of a mask is computed from the decode weights it skips (embedding lookup excluded,
LM head included).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: runtime/, export/

from common import (add_model_args, add_output_args, bundle_tag, ensure_bundle, finish, first_mask_args,  # noqa: E402
                    first_mask_row, result_columns, result_table, run_child, run_peer)

PEER_SCRIPTS = {  # name -> (venv, script, variant)
    "onnx-fp32": ("venv-onnx", "peer_onnxruntime.py", "fp32"),
    "onnx-int8": ("venv-onnx", "peer_onnxruntime.py", "int8"),
    "genai-fp32": ("venv-genai", "peer_ortgenai.py", "fp32"),
    "genai-int4": ("venv-genai", "peer_ortgenai.py", "int4"),
}


# ------------------------------------------------------------------ child: one configuration, runtime only
def child(args):
    from common import measure_bundle
    from runtime.bundle import Bundle
    from runtime.ort_backend import OrtBackend

    b = Bundle(args.bundle)
    be = OrtBackend(b, threads=args.threads, decode_shape=args.shape)
    print(json.dumps(measure_bundle(be, b, args.new_tokens, args.runs, mask=args.mask, keep=args.keep,
                                    threshold=args.threshold)))


def memory_child(args):
    """Peak-RSS configuration: load the bundle, generate ``--new-tokens`` greedy tokens (EOS ignored) for the
    benchmark prompt, and with ``--chat`` a second chat turn (the extend graph loaded on first use) of as many
    tokens; prints one JSON line (``/usr/bin/time -v`` in the parent reads the peak)."""
    from common import USER_MSG, peak_rss_mb
    from runtime.bundle import Bundle
    import numpy as np

    from runtime.loop import SamplingConfig, generate
    from runtime.ort_backend import OrtBackend
    from runtime.session import Session
    from runtime.tokenizer import BundleTokenizer

    b = Bundle(args.bundle)
    opts = dict(kv.split("=", 1) for kv in args.backend_opt)
    be = OrtBackend(b, threads=args.threads, decode_shape=args.shape, **opts)
    out = {"loaded_rss_mb": round(peak_rss_mb(), 1)}
    tok = BundleTokenizer(b)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    if not args.chat:  # single-turn generation: prefill and decode graphs only
        r = generate(be, tok.encode_prompt(USER_MSG), cfg, default_threshold=b.default_threshold, mask=np.ones(b.n_layers, bool))
        out.update(turn1_tok_s=round(r.decode_tokens_per_s, 2), turn1_prefill_ms=round(r.prefill_ms, 1), text=tok.decode(r.tokens)[:60])
    else:  # a chat session (loads the extend graph when it starts), two turns
        s = Session.from_bundle(b, be, tok)
        for turn in range(2):
            r = s.chat(USER_MSG if turn == 0 else "Now say it again in one sentence.", cfg, mask=np.ones(b.n_layers, bool))
            out[f"turn{turn + 1}_tok_s"] = round(r.result.decode_tokens_per_s, 2)
            out[f"turn{turn + 1}_prefill_ms"] = round(r.result.prefill_ms, 1)
        out["text"] = r.reply[:60]
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(out))


def memory(args):
    """``--memory``: peak RSS of each bundle (``--bundles``) generating ``--new-tokens`` tokens, one turn and two
    chat turns (the second loads the extend graph), each in its own child under ``/usr/bin/time -v``."""
    from common import timed_child

    rows = []
    for spec in args.bundles.split(","):
        bundle, *opts = spec.split(":")  # dist/NAME[:opt=value[:opt=value]]
        for chat in (False, True):
            cmd = [sys.executable, Path(__file__).resolve(), "--memory-child", "--bundle", bundle, "--shape",
                   args.shape, "--threads", args.threads, "--new-tokens", args.new_tokens]
            cmd += [x for o in opts for x in ("--backend-opt", o)] + (["--chat"] if chat else [])
            d = timed_child(cmd, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
            d["name"] = f"{Path(bundle).name}{' ' + ' '.join(opts) if opts else ''}, {'2 chat turns' if chat else '1 turn'}"
            rows.append(d)
            print(json.dumps(d), file=sys.stderr)
    print(f"\n## Peak RSS ({time.strftime('%Y-%m-%d %H:%M')}, {args.threads} threads, {args.new_tokens} tokens a turn)\n")
    print("| configuration | peak RSS after loading MB | peak RSS MB | prefill ms (turn 1 / 2) | decode tok/s (turn 1 / 2) | load |\n"
          "|---|---:|---:|---|---|---:|")
    for d in rows:
        if "error" in d:
            print(f"| {d['name']} | error: {d['error']} | | |")
        else:
            two = "turn2_tok_s" in d
            print(f"| {d['name']} | {d['loaded_rss_mb']:.0f} | **{d['peak_rss_mb']:.0f}** | {d.get('turn1_prefill_ms')}"
                  f"{' / ' + str(d['turn2_prefill_ms']) if two else ''} | {d.get('turn1_tok_s')}"
                  f"{' / ' + str(d['turn2_tok_s']) if two else ''} | {d['load_before']} |")


# ------------------------------------------------------------------ parent
def onnx_bundle(name, model, run, quantize, max_context, rebuild):
    return ensure_bundle(name, "rpi", model, run, quantize, max_context, rebuild, extra=["--opt", "decode_shape=both"])


def layer_weight_bytes(bundle: Path):
    """Decode weight bytes per layer graph and of the head graph (rotary caches excluded)."""
    import onnx

    def size(f):
        m = onnx.load(str(bundle / f), load_external_data=False)
        tot = 0
        for t in m.graph.initializer:
            if t.name.startswith("rope."):
                continue
            ext = {e.key: e.value for e in t.external_data}
            tot += int(ext["length"]) if "length" in ext else len(t.raw_data)
        return tot

    man = json.loads((bundle / "manifest.json").read_text())
    sp = man["graphs"]["split"]
    return [size(f) for f in sp["layers"]], size(sp["head"])


def ours(bundle, shape, mask_args, args):
    return run_child(__file__, bundle, args, args.threads, mask_args, extra=["--shape", shape])


def peer(name, args):
    venv, script, variant = PEER_SCRIPTS[name]
    return run_peer(venv, script, variant, args.threads, args)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend-opt", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--memory", action="store_true",
                    help="peak RSS of --bundles (one turn, and two chat turns) instead of the speed table")
    ap.add_argument("--bundles", help="--memory: comma-separated bundle folders, each optionally "
                                      "followed by :opt=value backend options")
    ap.add_argument("--bundle")
    ap.add_argument("--shape", default="fused")
    ap.add_argument("--mask")
    ap.add_argument("--threshold", type=float)
    add_model_args(ap)
    ap.add_argument("--quantize", default="none,int4")
    ap.add_argument("--shapes", default="fused,split")
    ap.add_argument("--peers", default="onnx-fp32,onnx-int8,genai-fp32,genai-int4")
    ap.add_argument("--contexts", default="256,4096", help="two max_context values for the per-token cost check")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    add_output_args(ap)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.memory_child:
        return memory_child(args)
    if args.memory:
        return memory(args)

    rows = []
    tag = bundle_tag(args.model, args.run)
    mask_first = first_mask_args(args.keep, args.run)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    bundles = {}
    for q in args.quantize.split(","):
        bundles[q] = onnx_bundle(f"{tag}-{q}", args.model, args.run, q, 1024, args.rebuild)
    for q, b in bundles.items():
        layers, head = layer_weight_bytes(b)
        for shape in args.shapes.split(","):
            base = ours(b, shape, ["--mask", "1" * len(layers)], args)
            rows.append(dict(base, name=f"FiRST-Edge {q} {shape}, all-ones mask", ratio_to=None))
            rows.append(first_mask_row(ours(b, shape, mask_first, args), base, layers, head,
                                       f"FiRST-Edge {q} {shape}, FiRST mask"))
    # per-token cost vs max_context (fused fp32 all-ones; long generation so the KV length matters)
    ctx = {}
    for c in contexts:
        b = onnx_bundle(f"{tag}-none-ctx{c}", args.model, args.run, "none", c, args.rebuild)
        d = ours(b, "fused", ["--mask", "1" * len(layer_weight_bytes(b)[0])], args)
        ctx[c] = d
        rows.append(dict(d, name=f"FiRST-Edge none fused, all-ones, max_context={c}"))
    for p in [p for p in args.peers.split(",") if p]:
        d = peer(p, args)
        rows.append(dict(d, name=f"peer {p}: " + d.get("variant", "")))

    ref = {r["name"].split(":")[0]: r.get("decode_tok_s") for r in rows}
    opt = ref.get("peer onnx-fp32")
    print(f"\n## FiRST-Edge ONNX Runtime benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {args.threads} threads, "
          f"{args.new_tokens} greedy tokens, median of {args.runs} runs after 1 warm-up)\n")
    vs_optimum = (lambda r: f"{r['decode_tok_s'] / opt:.2f}x") if opt else (lambda r: "")
    print(result_table(rows, result_columns("vs Optimum fp32", vs_optimum)))
    if ctx and all("decode_tok_s" in ctx[c] for c in ctx):
        print("\nper-token decode cost vs max_context (fused fp32, all-ones): " +
              ", ".join(f"max_context {c}: {1e3 / ctx[c]['decode_tok_s']:.2f} ms/token" for c in ctx))
    finish(rows, args.json)


if __name__ == "__main__":
    main()
