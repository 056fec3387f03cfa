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
import subprocess
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
    be = OrtBackend(b, threads=args.threads, decode_shape=opts.pop("decode_shape", args.shape), **opts)
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
    chat turns (the second loads the extend graph), each in its own child under ``/usr/bin/time -v``; with
    ``--peers``, the peers' peak RSS too (their own child under ``/usr/bin/time -v``: 1 warm-up + ``--runs`` runs of
    one turn). A bundle with ``prepack=disk`` is run once unmeasured first, so its pre-packed cache exists."""
    from common import timed_child

    rows = []
    for spec in args.bundles.split(","):
        bundle, *opts = spec.split(":")  # dist/NAME[:opt=value[:opt=value]]
        for chat in ((None, False, True) if "prepack=disk" in opts else (False, True)):
            cmd = [sys.executable, Path(__file__).resolve(), "--memory-child", "--bundle", bundle, "--shape",
                   args.shape, "--threads", args.threads, "--new-tokens", args.new_tokens]
            cmd += [x for o in opts for x in ("--backend-opt", o)] + (["--chat"] if chat is not False else [])
            d = timed_child(cmd, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
            if chat is None:  # warm-up (a chat: every graph loaded): makes the pre-packed caches if missing
                print(f"# warm-up {spec}: {json.dumps(d)}", file=sys.stderr)
                continue
            d["name"] = f"{Path(bundle).name}{' ' + ' '.join(opts) if opts else ''}, {'2 chat turns' if chat else '1 turn'}"
            rows.append(d)
            print(json.dumps(d), file=sys.stderr)
    for p in [p for p in (args.peers or "").split(",") if p]:
        d = peer(p, args)
        d.update(name=f"peer {p}, 1 turn ({1 + args.runs} generations)", loaded_rss_mb=None,
                 turn1_prefill_ms=d.get("prefill_ms"), turn1_tok_s=d.get("decode_tok_s"))
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
            loaded = "-" if d.get("loaded_rss_mb") is None else f"{d['loaded_rss_mb']:.0f}"
            print(f"| {d['name']} | {loaded} | **{d['peak_rss_mb']:.0f}** | {d.get('turn1_prefill_ms')}"
                  f"{' / ' + str(d['turn2_prefill_ms']) if two else ''} | {d.get('turn1_tok_s')}"
                  f"{' / ' + str(d['turn2_tok_s']) if two else ''} | {d['load_before']} |")


# ------------------------------------------------------------------ interleaved A/B (--interleave)
def ab_child(args):
    """One process, one thread count: our bundles (``--bundles``, each all-ones and, with ``--first``, the FiRST
    mask) and onnxruntime-genai's exports (``--genai``) decode the benchmark prompt in turn, ``--rounds`` times
    (ABAB...: load that comes and goes hits every configuration alike); prints one JSON line with every run.
    Runs in the genai venv (our runtime is torch-free: numpy, onnxruntime, tokenizers), so both share the process,
    the ONNX Runtime build and the load; genai's sessions use their own 2-thread pools as in its config."""
    import statistics

    import numpy as np

    from common import USER_MSG
    from runtime.bundle import Bundle
    from runtime.loop import SamplingConfig, generate
    from runtime.ort_backend import OrtBackend
    from runtime.tokenizer import BundleTokenizer

    N = args.new_tokens
    cfgs = []  # (name, fn) ; fn() -> decode tok/s
    ids = None
    for spec in [b for b in (args.bundles or "").split(",") if b]:
        label, path = spec.split("=", 1) if "=" in spec else (Path(spec).name, spec)
        b = Bundle(path)
        be = OrtBackend(b, threads=args.threads, decode_shape=args.shape)
        tok = BundleTokenizer(b)
        ids = tok.encode_prompt(USER_MSG)
        cfg = SamplingConfig(max_new_tokens=N, ignore_eos=True)
        ones = np.ones(b.n_layers, bool)
        # the FiRST mask: the routers' budget mask for the benchmark prompt
        first = generate(be, ids, cfg, keep=args.first_keep, pinned=b.pinned).mask if args.first_keep else ones

        def run(be=be, m=ones, b=b, cfg=cfg, ids=ids):
            return generate(be, ids, cfg, mask=m, pinned=b.pinned).decode_tokens_per_s
        cfgs.append((f"{label} all-ones", run))
        if args.first_keep:
            cfgs.append((f"{label} FiRST {int(first.sum())}/{b.n_layers}",
                         lambda be=be, m=first, b=b, cfg=cfg, ids=ids:
                         generate(be, ids, cfg, mask=m, pinned=b.pinned).decode_tokens_per_s))
    for spec in [g for g in (args.genai or "").split(",") if g]:
        import json as _json

        import onnxruntime_genai as og

        label, d = spec.split("=", 1)
        gc = _json.loads((Path(d) / "genai_config.json").read_text())
        so = gc["model"]["decoder"]["session_options"]
        if so.get("intra_op_num_threads") != args.threads:
            so["intra_op_num_threads"], so["inter_op_num_threads"] = args.threads, 1
            (Path(d) / "genai_config.json").write_text(_json.dumps(gc, indent=4))
        config = og.Config(d)
        config.clear_providers()
        model = og.Model(config)

        def grun(model=model):
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, max_length=len(ids) + N, min_length=len(ids) + N)
            gen = og.Generator(model, params)
            ts = []
            gen.append_tokens(ids)
            while not gen.is_done() and len(ts) < N:
                gen.generate_next_token()
                int(gen.get_next_tokens()[0])
                ts.append(time.perf_counter())
            del gen
            return (len(ts) - 1) / (ts[-1] - ts[0])
        cfgs.append((f"{label} all-ones", grun))
    for _, fn in cfgs:  # warm-up
        fn()
    runs = {n: [] for n, _ in cfgs}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for n, fn in cfgs:
            runs[n].append(fn())
    print(json.dumps({"threads": args.threads, "new_tokens": N, "rounds": args.rounds, "runs": runs,
                      "medians": {n: statistics.median(r) for n, r in runs.items()},
                      "load": [round(min(loads), 2), round(max(loads), 2)]}))


def interleave(args):
    """``--interleave``: for each ``--threads-list`` value one child process (the genai venv's Python) runs every
    configuration in turn (``ab_child``); prints per configuration the median tok/s, the range, and the median of
    the per-round ratios to the row named by ``--ratio-to`` (same round, same load)."""
    import statistics

    from common import PEERS, ROOT

    py = PEERS / "venv-genai" / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{py} missing (bash bench/peers/setup.sh genai)")
    for th in [int(t) for t in args.threads_list.split(",")]:
        cmd = [str(py), str(Path(__file__).resolve()), "--ab-child", "--threads", str(th), "--rounds",
               str(args.rounds), "--new-tokens", str(args.new_tokens), "--shape", args.shape,
               "--bundles", args.bundles or "", "--genai", args.genai or "", "--first-keep", str(args.first_keep)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=str(ROOT))
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        if p.returncode or not lines:
            print(f"threads {th}: error rc={p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:300]}")
            continue
        d = json.loads(lines[-1])
        print(f"\n### {th} thread(s), {d['new_tokens']} tokens, {d['rounds']} interleaved rounds, load {d['load'][0]}-{d['load'][1]}"
              f" ({time.strftime('%Y-%m-%d %H:%M')})\n")
        print("| configuration | median tok/s | range | per-round ratio to " + args.ratio_to + " (median) |\n|---|---:|---|---:|")
        base = next((n for n in d["runs"] if n.startswith(args.ratio_to)), None)
        for n, r in d["runs"].items():
            rat = statistics.median([a / b for a, b in zip(r, d["runs"][base])]) if base else float("nan")
            print(f"| {n} | **{statistics.median(r):.1f}** | {min(r):.1f}–{max(r):.1f} | {rat:.3f} |")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(d) + "\n")


# ------------------------------------------------------------------ --profile: where the decode time goes
def _genai_stepper(gdir: str, threads: int, past: int):
    """onnxruntime-genai's exported graph driven by plain ONNX Runtime (this process's build and thread pool), one
    decode step at a fixed cache length ``past`` with the KV buffers shared between past and present, as genai
    runs it on CPU (``past_present_share_buffer``); returns (session, run-one-step function)."""
    import numpy as np
    import onnxruntime as ort

    from runtime.ort_backend import session_options

    cfg = json.loads((Path(gdir) / "genai_config.json").read_text())["model"]
    dec = cfg["decoder"]
    L, KV, hd, V, C = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"], cfg["vocab_size"], 1024
    so = session_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / "genai_decode")
    s = ort.InferenceSession(str(Path(gdir) / dec["filename"]), so, providers=["CPUExecutionProvider"])
    io = s.io_binding()
    keep = [np.zeros((1, KV, C, hd), np.float32) for _ in range(2 * L)]
    for l in range(L):
        for kind, buf in (("key", keep[2 * l]), ("value", keep[2 * l + 1])):
            for name, out in ((f"past_key_values.{l}.{kind}", False), (f"present.{l}.{kind}", True)):
                (io.bind_output if out else io.bind_input)(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    mask = np.ones((1, past + 1), np.int64)
    ids = np.full((1, 1), 5, np.int64)
    logits = np.zeros((1, 1, V), np.float32)
    keep += [mask, ids, logits]
    io.bind_input("attention_mask", "cpu", 0, np.int64, list(mask.shape), mask.ctypes.data)
    io.bind_input("input_ids", "cpu", 0, np.int64, [1, 1], ids.ctypes.data)
    io.bind_output("logits", "cpu", 0, np.float32, [1, 1, V], logits.ctypes.data)
    return s, (lambda: s.run_with_iobinding(io)), keep


def profile_totals(files) -> dict:
    """Per operator type: the sum over the graph's nodes of each node's median kernel time (ONNX Runtime profiler
    traces), the node count, and the median model_run time. Medians per node keep out the steps another process
    interrupted (this machine is shared)."""
    import statistics
    from collections import defaultdict

    durs, ops, runs = defaultdict(list), {}, []
    for f in files:
        for e in json.load(open(f)):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                durs[e["name"]].append(e["dur"])
                ops[e["name"]] = e["args"]["op_name"]
            elif e.get("cat") == "Session" and e["name"] == "model_run":
                runs.append(e["dur"])
    tot, cnt = defaultdict(float), defaultdict(int)
    for n, d in durs.items():
        tot[ops[n]] += statistics.median(d)
        cnt[ops[n]] += 1
    return {"ops": dict(tot), "nodes": dict(cnt), "model_run_median": statistics.median(runs) if runs else float("nan")}


def profile(args):
    """``--profile``: ONNX Runtime's profiler on our fused decode graph (``--bundle``) and on onnxruntime-genai's
    graph (``--genai DIR``), interleaved step by step in one process, ``--steps`` decode steps each at the same cache
    length (58, the benchmark prompt; the KV length reset every step), every layer kept; prints per operator type
    the sum of per-node median kernel times (the If row contains the layers' nodes, which are also listed)."""
    import numpy as np

    from runtime.bundle import Bundle
    from runtime.ort_backend import OrtBackend

    out = Path(os.environ.get("TMPDIR", "/tmp")) / "first_edge_profile"
    out.mkdir(parents=True, exist_ok=True)
    b = Bundle(args.bundle)
    be = OrtBackend(b, threads=args.threads, decode_shape="fused", profile=str(out))
    P = 58
    be.prefill(np.arange(100, 100 + P), 0.5)
    ones = np.ones(b.n_layers, bool)
    gs, gstep, _keep = _genai_stepper(args.genai, args.threads, P)
    for _ in range(args.steps):
        be.lengths[:] = P
        be.decode(5, P, ones)
        gstep()
    res = {"ours": profile_totals(be.end_profiling()), "genai": profile_totals([gs.end_profiling()])}
    ops = sorted(set(res["ours"]["ops"]) | set(res["genai"]["ops"]), key=lambda o: -max(
        res["ours"]["ops"].get(o, 0), res["genai"]["ops"].get(o, 0)))
    print(f"\n## Decode step profile ({time.strftime('%Y-%m-%d %H:%M')}, {args.threads} thread(s), {args.steps} steps at "
          f"cache length {P}, load {os.getloadavg()[0]:.1f}): sum of per-node median kernel times, us\n")
    print(f"| operator | ours ({Path(args.bundle).name}) | nodes | genai ({Path(args.genai).name}) | nodes |\n|---|---:|---:|---:|---:|")
    for o in ops:
        cells = [f"{res[k]['ops'].get(o, 0):.0f} | {res[k]['nodes'].get(o, 0)}" if o in res[k]["ops"] else " | "
                 for k in ("ours", "genai")]
        print(f"| {o} | {cells[0]} | {cells[1]} |")
    tot = {k: sum(v for o, v in res[k]["ops"].items() if o != "If") for k in res}
    print(f"| **all kernels** (If excluded) | **{tot['ours']:.0f}** | | **{tot['genai']:.0f}** | |")
    print(f"| model_run (median, incl. profiler overhead) | {res['ours']['model_run_median']:.0f} | | "
          f"{res['genai']['model_run_median']:.0f} | |")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")


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
    ap.add_argument("--interleave", action="store_true",
                    help="interleaved A/B in one process per thread count: --bundles (LABEL=DIR,...) and --genai "
                         "(LABEL=DIR,...: onnxruntime-genai exports), --rounds rounds, medians and per-round ratios")
    ap.add_argument("--ab-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true",
                    help="ONNX Runtime profiler: per-operator decode time of --bundle against the --genai DIR graph")
    ap.add_argument("--steps", type=int, default=200, help="--profile: decode steps per graph")
    ap.add_argument("--genai", help="--interleave: LABEL=DIR of onnxruntime-genai exports, comma-separated; "
                                    "--profile: one export's DIR")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads-list", default="1,2")
    ap.add_argument("--first-keep", type=int, default=20, help="--interleave: FiRST mask by budget (0: none)")
    ap.add_argument("--ratio-to", default="genai", help="--interleave: ratio column against the row starting so")
    ap.add_argument("--shape", default="fused")
    ap.add_argument("--mask")
    ap.add_argument("--threshold", type=float)
    add_model_args(ap)
    ap.add_argument("--quantize", default="none,int4")
    ap.add_argument("--shapes", default="fused,split")
    ap.add_argument("--peers", help="peers to run (default: onnx-fp32,onnx-int8,genai-fp32,genai-int4; "
                                    "with --memory: none)")
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
    if args.peers is None:
        args.peers = "onnx-fp32,onnx-int8,genai-fp32,genai-int4"
    if args.ab_child:
        return ab_child(args)
    if args.profile:
        return profile(args)
    if args.interleave:
        return interleave(args)

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
