"""Benchmark method and harness shared by every bench script (same as ../shared/peers, so numbers compare).

Prompt: the chat-formatted 58-token "rainbow" message; 128 greedy new tokens, EOS ignored;
1 warm-up + 3 timed runs, median; prefill_ms = start to first new token; decode tok/s =
(new_tokens - 1) / (time from first to last new token).

The runtime benchmarks (bench_onnx.py, bench_et.py) share the harness below: a child process per
configuration under ``/usr/bin/time -v`` (``run_child``, ``timed_child``), bundles built once under
dist/bench/ (``ensure_bundle``), the peers in their own virtual environments (``run_peer``), the ideal
speedup of a mask (``first_mask_row``), the result table (``result_columns``, ``result_table``) and the
closing lines (``finish``). Each script keeps its backend, its rows and its extra lines.
"""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

USER_MSG = ("Explain in a few short paragraphs how a rainbow forms, why its colors "
            "always appear in the same order, and why the sky is blue.")
N_NEW = int(os.environ.get("BENCH_NEW_TOKENS", "128"))
N_RUNS = int(os.environ.get("BENCH_RUNS", "3"))
N_WARMUP = int(os.environ.get("BENCH_WARMUP", "1"))

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("FIRST_EDGE_CACHE", Path.home() / ".cache" / "first-edge"))
PEERS = Path(os.environ.get("FIRST_EDGE_PEERS", CACHE / "peers"))


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


# ------------------------------------------------------------------ parent: children, bundles, peers
def timed_child(cmd, env=None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``; its last JSON line, with peak RSS (the larger of the child's own
    and time's "Maximum resident set size") and the load average before; or {"error": ...}."""
    load = os.getloadavg()[0]
    p = subprocess.run(["/usr/bin/time", "-v"] + [str(c) for c in cmd], capture_output=True, text=True, env=env,
                       cwd=str(ROOT))
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        lines = p.stderr.strip().splitlines()
        err = [l for l in lines if "error" in l.lower()] or lines or [""]
        return {"error": f"rc={p.returncode}: {err[-1][:200]}"}
    d = json.loads(lines[-1])
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if m and "error" not in d:
        d["peak_rss_mb"] = max(d.get("peak_rss_mb") or 0, round(int(m.group(1)) / 1024, 1))
    d["load_before"] = round(load, 2)
    return d


def run_child(script, bundle, args, threads, mask_args, extra=(), env=None) -> dict:
    """One configuration of our bundle in a child process: ``script --child`` (the bench script itself) with
    ``args.runs`` / ``args.new_tokens``, ``threads`` and the mask options; repo root on PYTHONPATH."""
    cmd = [sys.executable, Path(script).resolve(), "--child", "--bundle", bundle, *extra, "--runs", args.runs,
           "--threads", threads, "--new-tokens", args.new_tokens, *mask_args]
    return timed_child(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))


def ensure_bundle(name, target, model, run, quantize, max_context, rebuild, extra=(), note="") -> Path:
    """dist/bench/NAME, built with ``export.build`` unless it exists (or ``rebuild``)."""
    from runtime.bundle import Bundle
    from runtime.errors import FirstEdgeError

    out = ROOT / "dist" / "bench" / name
    if (out / "manifest.json").exists() and not rebuild:
        try:
            Bundle(out, verify_hashes=False)  # e.g. built by an older toolchain (another format version)
            return out
        except FirstEdgeError as e:
            print(f"# rebuilding {out}: {e}", file=sys.stderr)
    cmd = [sys.executable, "-m", "export.build", "--target", target, "--quantize", quantize, "--out", str(out),
           "--max-context", str(max_context), *extra]
    if model:
        cmd += ["--model", model]
    if run:
        cmd += ["--run", run]
    print(f"# building {out}{note} ...", file=sys.stderr)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    print(f"# built in {time.time() - t:.0f}s", file=sys.stderr)
    return out


def run_peer(venv, script, variant, threads, args) -> dict:
    """A peer script of bench/peers/ in its own virtual environment (PEERS/venv, ``bash bench/peers/setup.sh``)."""
    py = PEERS / venv / "bin" / "python"
    if not py.exists():
        return {"error": f"{py} missing (bash bench/peers/setup.sh {venv.split('-')[1]})"}
    env = dict(os.environ, PEER_RUNS=str(args.runs), PEER_THREADS=str(threads), PEER_NEW_TOKENS=str(args.new_tokens),
               HF_HUB_OFFLINE="1")
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


# ------------------------------------------------------------------ masks and the ideal speedup
def add_model_args(ap):
    """--model, --run, --keep: the model and how the FiRST mask is chosen."""
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--run", help="finetuning run folder with trained routers (FiRST mask from the routers)")
    ap.add_argument("--keep", type=int, default=None,
                    help="FiRST mask by layer budget K (default without --run: 20 of 30 layers)")


def add_output_args(ap):
    """--new-tokens, --rebuild, --json."""
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--json", help="also write all rows as JSON lines to this file")


def bundle_tag(model, run) -> str:
    """Name part of the dist/bench bundles: the model folder's name (or smollm2), plus the run's."""
    tag = Path(model).name if model else "smollm2"
    return tag + "-" + Path(run).name if run else tag


def first_mask_args(keep, run) -> list:
    """The child options of the FiRST mask: ``--keep K``; the routers' own mask with ``--run``; else 20 layers."""
    return ["--keep", str(keep)] if keep else ([] if run else ["--keep", "20"])


def ideal_speedup(layers, head, mask: str) -> float:
    """Decode weights of all layers + head over those the mask keeps (the embedding lookup excluded)."""
    return (sum(layers) + head) / (sum(w for w, m in zip(layers, mask) if m == "1") + head)


def first_mask_row(fr: dict, base: dict, layers, head, name: str) -> dict:
    """The FiRST-mask row ``fr`` named ``name``: with its mask, the ideal and measured speedup over the all-ones
    row ``base`` (nan if that failed) and the layers kept in the name."""
    if "mask" in fr:
        ideal = ideal_speedup(layers, head, fr["mask"])
        got = fr["decode_tok_s"] / base["decode_tok_s"] if "decode_tok_s" in base else float("nan")
        fr = dict(fr, ideal=ideal, speedup=got, frac_ideal=got / ideal if ideal > 1 else float("nan"))
        name += f" ({fr['layers_kept']}/{len(layers)} layers)"
    return dict(fr, name=name)


# ------------------------------------------------------------------ the result table
def fmt_range(d) -> str:
    r = [x["decode_tok_s"] for x in d.get("runs", []) if "decode_tok_s" in x]
    return f"{min(r):.0f}–{max(r):.0f}" if r else ""


def text_cell(r) -> str:
    """The first 40 characters of the text (or of the token list), escaped for a Markdown table."""
    return str(r.get("text", "") or (str(r.get("tokens", ""))[:40]))[:40].replace("\n", "\\n").replace("|", "\\|")


def speedup_cell(r) -> str:
    return f"{r['speedup']:.2f}x / {r['ideal']:.2f}x = {r['frac_ideal']:.2f}" if "ideal" in r else ""


def result_columns(vs_header, vs, text_header="text", extra=()) -> list:
    """The table's columns, (header, right-aligned, cell of a row): configuration, prefill, decode, range,
    ``vs_header`` (the row's speed against a peer: ``vs(row)``), FiRST speedup / ideal, ``extra``, peak RSS,
    load and text."""
    return [("configuration", False, lambda r: r["name"]),
            ("prefill ms", True, lambda r: f"{r['prefill_ms']:.0f}"),
            ("decode tok/s", True, lambda r: f"**{r['decode_tok_s']:.1f}**"),
            ("range", False, fmt_range),
            (vs_header, True, vs),
            ("FiRST speedup / ideal", False, speedup_cell),
            *extra,
            ("peak RSS MB", True, lambda r: f"{r.get('peak_rss_mb', 0):.0f}"),
            ("load", True, lambda r: f"{r.get('load_before', '')}"),
            (text_header, False, text_cell)]


def result_table(rows, columns) -> str:
    """A Markdown table, one line per row; a row with an "error" shows it in the last column."""
    out = ["| " + " | ".join(h for h, _, _ in columns) + " |",
           "|" + "|".join("---:" if right else "---" for _, right, _ in columns) + "|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | " + "| " * (len(columns) - 2) + f"error: {r['error'][:120]} |")
        else:
            out.append("| " + " | ".join(cell(r) for _, _, cell in columns) + " |")
    return "\n".join(out)


def finish(rows, json_path=None):
    """The closing line (the load average now) and, with ``json_path``, every row as a JSON line."""
    print(f"\nload average now: {os.getloadavg()[0]:.2f} (other processes on the machine make the numbers noisy)")
    if json_path:
        with open(json_path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
