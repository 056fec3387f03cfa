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
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("FIRST_EDGE_CACHE", Path.home() / ".cache" / "first-edge"))
PEERS = Path(os.environ.get("FIRST_EDGE_PEERS", CACHE / "peers"))
USER_MSG = ("Explain in a few short paragraphs how a rainbow forms, why its colors always appear in the same "
            "order, and why the sky is blue.")
PEER_SCRIPTS = {  # name -> (venv, script, variant)
    "onnx-fp32": ("venv-onnx", "peer_onnxruntime.py", "fp32"),
    "onnx-int8": ("venv-onnx", "peer_onnxruntime.py", "int8"),
    "genai-fp32": ("venv-genai", "peer_ortgenai.py", "fp32"),
    "genai-int4": ("venv-genai", "peer_ortgenai.py", "int4"),
}


# ------------------------------------------------------------------ child: one configuration, runtime only
def child(args):
    sys.path.insert(0, str(ROOT))
    from common import measure_bundle
    from runtime.bundle import Bundle
    from runtime.ort_backend import OrtBackend

    b = Bundle(args.bundle)
    be = OrtBackend(b, threads=args.threads, decode_shape=args.shape)
    print(json.dumps(measure_bundle(be, b, args.new_tokens, args.runs, mask=args.mask, keep=args.keep,
                                    threshold=args.threshold)))


# ------------------------------------------------------------------ parent
def timed_child(cmd, env=None):
    load = os.getloadavg()[0]
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": f"rc={p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}"}
    d = json.loads(lines[-1])
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if m and "error" not in d:
        d["peak_rss_mb"] = max(d.get("peak_rss_mb") or 0, round(int(m.group(1)) / 1024, 1))
    d["load_before"] = round(load, 2)
    return d


def ensure_bundle(name, model, run, quantize, max_context, rebuild):
    out = ROOT / "dist" / "bench" / name
    if (out / "manifest.json").exists() and not rebuild:
        return out
    cmd = [sys.executable, "-m", "export.build", "--target", "rpi", "--quantize", quantize, "--out", str(out),
           "--max-context", str(max_context), "--opt", "decode_shape=both"]
    if model:
        cmd += ["--model", model]
    if run:
        cmd += ["--run", run]
    print(f"# building {out} ...", file=sys.stderr)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    print(f"# built in {time.time() - t:.0f}s", file=sys.stderr)
    return out


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


def ideal_speedup(layers, head, mask: str):
    total = sum(layers) + head
    kept = sum(w for w, m in zip(layers, mask) if m == "1") + head
    return total / kept


def ours(bundle, shape, mask_args, args):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--bundle", str(bundle), "--shape", shape,
           "--runs", str(args.runs), "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)] + mask_args
    return timed_child(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def peer(name, args):
    venv, script, variant = PEER_SCRIPTS[name]
    py = PEERS / venv / "bin" / "python"
    if not py.exists():
        return {"error": f"{py} missing (bash bench/peers/setup.sh {venv.split('-')[1]})"}
    env = dict(os.environ, PEER_RUNS=str(args.runs), PEER_THREADS=str(args.threads),
               PEER_NEW_TOKENS=str(args.new_tokens), HF_HUB_OFFLINE="1")
    if args.model:
        env["SMOLLM2_HF"] = args.model
    p = subprocess.run([str(py), str(HERE / "peers" / script), "--variant", variant], capture_output=True, text=True,
                       env=env, cwd=str(HERE / "peers"))
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if not lines:
        return {"error": f"rc={p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:200]}"}
    d = json.loads(lines[-1])
    d.setdefault("load_before", d.get("load_avg_1m_before"))
    return d


def fmt_range(d):
    r = [x["decode_tok_s"] for x in d.get("runs", [])]
    return f"{min(r):.0f}–{max(r):.0f}" if r else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundle")
    ap.add_argument("--shape", default="fused")
    ap.add_argument("--mask")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--run", help="finetuning run folder with trained routers (FiRST mask from the routers)")
    ap.add_argument("--keep", type=int, default=None,
                    help="FiRST mask by layer budget K (default without --run: 20 of 30 layers)")
    ap.add_argument("--quantize", default="none,int4")
    ap.add_argument("--shapes", default="fused,split")
    ap.add_argument("--peers", default="onnx-fp32,onnx-int8,genai-fp32,genai-int4")
    ap.add_argument("--contexts", default="256,4096", help="two max_context values for the per-token cost check")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--json", help="also write all rows as JSON lines to this file")
    args = ap.parse_args()
    if args.child:
        return child(args)

    rows = []
    tag = Path(args.model).name if args.model else "smollm2"
    if args.run:
        tag += "-" + Path(args.run).name
    mask_first = ["--keep", str(args.keep)] if args.keep else ([] if args.run else ["--keep", "20"])
    contexts = [int(c) for c in args.contexts.split(",") if c]
    bundles = {}
    for q in args.quantize.split(","):
        bundles[q] = ensure_bundle(f"{tag}-{q}", args.model, args.run, q, 1024, args.rebuild)
    ideal_rows = {}
    for q, b in bundles.items():
        layers, head = layer_weight_bytes(b)
        for shape in args.shapes.split(","):
            base = ours(b, shape, ["--mask", "1" * len(layers)], args)
            rows.append(dict(base, name=f"FiRST-Edge {q} {shape}, all-ones mask", ratio_to=None))
            fr = ours(b, shape, mask_first, args)
            name = f"FiRST-Edge {q} {shape}, FiRST mask"
            if "mask" in fr:
                ideal = ideal_speedup(layers, head, fr["mask"])
                got = fr["decode_tok_s"] / base["decode_tok_s"] if "decode_tok_s" in base else float("nan")
                fr.update(ideal=ideal, speedup=got, frac_ideal=got / ideal if ideal > 1 else float("nan"))
                name += f" ({fr['layers_kept']}/{len(layers)} layers)"
            rows.append(dict(fr, name=name))
            ideal_rows[(q, shape)] = fr
    # per-token cost vs max_context (fused fp32 all-ones; long generation so the KV length matters)
    ctx = {}
    for c in contexts:
        b = ensure_bundle(f"{tag}-none-ctx{c}", args.model, args.run, "none", c, args.rebuild)
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
    print("| configuration | prefill ms | decode tok/s | range | vs Optimum fp32 | FiRST speedup / ideal | peak RSS MB | load | text |")
    print("|---|---:|---:|---|---:|---|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | | | | | | | | error: {r['error'][:120]} |")
            continue
        vs = f"{r['decode_tok_s'] / opt:.2f}x" if opt else ""
        sp = f"{r['speedup']:.2f}x / {r['ideal']:.2f}x = {r['frac_ideal']:.2f}" if "ideal" in r else ""
        text = str(r.get("text", ""))[:40].replace("\n", "\\n").replace("|", "\\|")
        print(f"| {r['name']} | {r['prefill_ms']:.0f} | **{r['decode_tok_s']:.1f}** | {fmt_range(r)} | {vs} | {sp} | "
              f"{r.get('peak_rss_mb', 0):.0f} | {r.get('load_before', '')} | {text} |")
    if ctx and all("decode_tok_s" in ctx[c] for c in ctx):
        print("\nper-token decode cost vs max_context (fused fp32, all-ones): " +
              ", ".join(f"max_context {c}: {1e3 / ctx[c]['decode_tok_s']:.2f} ms/token" for c in ctx))
    print(f"\nload average now: {os.getloadavg()[0]:.2f} (other processes on the machine make the numbers noisy)")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
