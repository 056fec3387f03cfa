#!/usr/bin/env python
"""Decode-speed benchmark of the ExecuTorch bundle (Python and C++ runners) against optimum-executorch.

    python bench/bench_et.py [--model DIR] [--run runs/NAME] [--quantize none,8da4w] [--keep K]
                             [--threads 1,2] [--peers et-fp32,et-8da4w] [--runs 3] [--contexts 256,1024]

Method (the peers' harness, bench/peers/peer_common.py): the SmolLM2 chat prompt of 58 tokens, 128 greedy
tokens with EOS ignored, 1 warm-up + ``--runs`` timed runs in one child process per configuration, median;
peak RSS = "Maximum resident set size" of ``/usr/bin/time -v`` around that child. prefill ms = prompt
forward + first greedy pick; decode tok/s = 127 / (first to last new token). Torch (only glue in the
Python runner and the peer) runs 1 thread; ExecuTorch's XNNPACK pool gets ``--threads`` (both 1 and 2 are
measured: on the 2-core VM an idle core halts at once, so 2 threads can be slower than 1).

Rows: our bundle with the all-ones mask and a FiRST mask (``--keep K`` layers, default 20 of 30, or the
trained routers of ``--run``) on the same .pte, in the Python runner (``executorch.runtime``) and the C++
runner (runtime/cpp, built here with CMake), and optimum-executorch's own XNNPACK export of the same model
(custom SDPA + custom KV cache, fp32 and 8da4w) in its own virtual environment (``bash bench/peers/setup.sh et``).
The ideal speedup of a mask is computed from the decode weights it skips (layers + LM head; the embedding
lookup excluded). ``--contexts A,B`` also builds two fp32 bundles with different max_context and compares
their per-token cost (it must not grow with max_context).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: runtime/, export/, tools/

from common import (USER_MSG, add_model_args, add_output_args, bundle_tag, ensure_bundle,  # noqa: E402
                    finish, first_mask_args, first_mask_row, result_columns, result_table, run_child, run_peer,
                    timed_child)

PEER_VARIANTS = {"et-fp32": "fp32", "et-8da4w": "8da4w"}


# ------------------------------------------------------------------ child: the Python runner, runtime only
def child(args):
    from common import measure_bundle
    from runtime.bundle import Bundle
    from runtime.et_backend import EtBackend

    b = Bundle(args.bundle)
    be = EtBackend(b, threads=args.threads)
    print(json.dumps(measure_bundle(be, b, args.new_tokens, args.runs, mask=args.mask, keep=args.keep)))


# ------------------------------------------------------------------ parent
def et_bundle(name, model, run, quantize, max_context, rebuild):
    return ensure_bundle(name, "android", model, run, quantize, max_context, rebuild,
                         note=" (ExecuTorch export + XNNPACK lowering takes minutes)")


def cpp_runner() -> Path:
    from tools.cpp_build import cpp_build  # the same CMake build as the tests

    return cpp_build() / "first_edge_run"


def prompt_ids(bundle: Path):
    from runtime.bundle import Bundle
    from runtime.tokenizer import BundleTokenizer

    return BundleTokenizer(Bundle(bundle, verify_hashes=False)).encode_prompt(USER_MSG)


def weights(model_dir):
    """Decode weight counts per layer and of the LM head (from the model config)."""
    from transformers import AutoConfig

    from export.loading import default_model_dir

    c = AutoConfig.from_pretrained(model_dir or str(default_model_dir(verbose=False)))
    D, I = c.hidden_size, c.intermediate_size
    hd = getattr(c, "head_dim", None) or D // c.num_attention_heads
    nkv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    layer = D * c.num_attention_heads * hd * 2 + D * nkv * hd * 2 + 3 * D * I
    return [layer] * c.num_hidden_layers, D * c.vocab_size


def ours_py(bundle, mask_args, threads, args):
    return run_child(__file__, bundle, args, threads, mask_args, env=dict(OMP_NUM_THREADS="1"))


def ours_cpp(exe, bundle, ids, mask_args, threads, args):
    cmd = [exe, "--bundle", bundle, "--ids", ",".join(map(str, ids)), "--max-new-tokens", args.new_tokens,
           "--ignore-eos", "--threads", threads, "--runs", args.runs, "--warmup", 1] + mask_args
    d = timed_child(cmd)
    if "decode_tokens_per_s" in d:
        d["decode_tok_s"] = d.pop("decode_tokens_per_s")
        d["runs"] = [{"decode_tok_s": x} for x in d.get("decode_tokens_per_s_runs", [])]
    return d


def peer(name, threads, args):
    return run_peer("venv-et", "peer_executorch.py", PEER_VARIANTS[name], threads, args)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--mask", help=argparse.SUPPRESS)
    add_model_args(ap)
    ap.add_argument("--quantize", default="none,8da4w")
    ap.add_argument("--runners", default="cpp,py")
    ap.add_argument("--threads", default="1,2", help="XNNPACK thread counts to measure (C++ runner and peers)")
    ap.add_argument("--py-threads", default=None, help="thread counts for the Python runner (default: --threads)")
    ap.add_argument("--peers", default="et-fp32,et-8da4w")
    ap.add_argument("--contexts", default="", help="e.g. 256,1024: per-token cost at two max_context values")
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    add_output_args(ap)
    args = ap.parse_args()
    if args.child:
        args.threads = int(args.threads)
        return child(args)

    rows = []
    tag = bundle_tag(args.model, args.run)
    first = first_mask_args(args.keep, args.run)
    threads = [int(t) for t in args.threads.split(",")]
    layers, head = weights(args.model)
    L = len(layers)
    exe = cpp_runner() if "cpp" in args.runners else None
    bundles = {q: et_bundle(f"et-{tag}-{q}-ctx{args.max_context}", args.model, args.run, q, args.max_context,
                            args.rebuild) for q in args.quantize.split(",") if q}
    ids = prompt_ids(next(iter(bundles.values()))) if bundles else []
    ref_tokens = {}
    for q, b in bundles.items():
        for runner in args.runners.split(","):
            for t in (threads if runner == "cpp" or not args.py_threads else [int(x) for x in args.py_threads.split(",")]):
                def go(mask_args):
                    return (ours_cpp(exe, b, ids, mask_args, t, args) if runner == "cpp"
                            else ours_py(b, mask_args, t, args))

                base = go(["--mask", "1" * L])
                rname = "C++" if runner == "cpp" else "Python"
                rows.append(dict(base, name=f"FiRST-Edge {q} {rname} runner, {t} thr, all-ones mask", q=q, t=t))
                if "tokens" in base:
                    ref_tokens.setdefault(q, base["tokens"])
                fr = go(first)
                rows.append(dict(first_mask_row(fr, base, layers, head, f"FiRST-Edge {q} {rname} runner, {t} thr, "
                                                "FiRST mask"), q=q, t=t))
    agreement = None
    if "none" in ref_tokens and "8da4w" in ref_tokens:
        a, b8 = ref_tokens["none"], ref_tokens["8da4w"]
        agreement = sum(x == y for x, y in zip(a, b8)) / max(1, len(a))
    ctx = {}
    if args.contexts and exe:
        for c in (int(x) for x in args.contexts.split(",")):
            b = et_bundle(f"et-{tag}-none-ctx{c}", args.model, args.run, "none", c, args.rebuild)
            d = ours_cpp(exe, b, ids, ["--mask", "1" * L], 1, args)
            ctx[c] = d
            rows.append(dict(d, name=f"FiRST-Edge none C++ runner, 1 thr, all-ones, max_context={c}"))
    for p in [p for p in args.peers.split(",") if p]:
        for t in threads:
            d = peer(p, t, args)
            rows.append(dict(d, name=f"peer optimum-executorch {PEER_VARIANTS[p]}, {t} thr: {d.get('variant', '')}",
                             q="none" if p == "et-fp32" else "8da4w", t=t, peer=True))

    peer_speed = {(r["q"], r["t"]): r.get("decode_tok_s") for r in rows if r.get("peer")}
    print(f"\n## FiRST-Edge ExecuTorch benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {args.new_tokens} greedy tokens, "
          f"{len(ids)}-token prompt, median of {args.runs} runs after 1 warm-up)\n")

    def vs_peer(r):
        ps = peer_speed.get((r.get("q"), r.get("t")))
        return f"{r['decode_tok_s'] / ps:.2f}x" if ps and not r.get("peer") else ""

    def cpu(r):
        return f"{r['decode_cpu_ms_per_token']:.1f}" if r.get("decode_cpu_ms_per_token") else ""

    print(result_table(rows, result_columns("vs optimum-executorch (same precision, threads)", vs_peer,
                                            "text / tokens", extra=[("decode CPU ms/token", True, cpu)])))
    if agreement is not None:
        print(f"\n8da4w vs fp32 greedy token agreement (all-ones, first runner): {agreement:.1%}")
    if len(ctx) == 2 and all("decode_tok_s" in d for d in ctx.values()):
        (a, da), (b, db) = sorted(ctx.items())
        print(f"\nper-token cost vs max_context: {a}: {1e3 / da['decode_tok_s']:.2f} ms/token, "
              f"{b}: {1e3 / db['decode_tok_s']:.2f} ms/token")
    finish(rows, args.json)


if __name__ == "__main__":
    main()
