"""The main job on the embedded default model, end to end.

1. finetune routers with the ``quick`` preset (``python -m export.finetune``; reused if the run exists),
2. with ``--eval``: evaluate them on a slice of the val split (``python -m export.evaluate``; its report
   goes into the bundles),
3. build the Raspberry Pi bundle (ONNX Runtime) and the Android bundle (ExecuTorch),
4. run both bundles on their device runtimes with the routers' mask and with every layer, interleaved
   (ABAB, medians of at least 5 pairs), and print the decode speedups side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.errors import FirstEdgeError, cli_main

PROMPTS = [
    "Translate into German: The weather is nice today.",
    "What is 47 plus 38?",
    "Explain in a few short paragraphs how a rainbow forms, why its colors always appear in the same "
    "order, and why the sky is blue.",
]


def step(title: str, args) -> None:
    print(f"\n== {title}\n$ python -m {' '.join(args)}", flush=True)
    r = subprocess.run([sys.executable, "-m", *args])
    if r.returncode != 0:
        raise FirstEdgeError(f"step failed ({title}): python -m {' '.join(args)} exited {r.returncode}")


def interleaved(run_a: Callable[[], object], run_b: Callable[[], object], speed: Callable[[object], float],
                pairs: int = 5, warmup: int = 1) -> dict:
    """Time two configurations alternately on one machine: ``warmup`` untimed A, B, then ``pairs`` of A, B
    (ABAB...), so load that comes and goes hits both alike. Returns each side's median speed, the median of the
    per-pair ratios B/A (one pair's two runs saw the same load) and every run's result."""
    if pairs < 1:
        raise FirstEdgeError("pairs must be at least 1")
    for _ in range(warmup):
        run_a()
        run_b()
    res_a, res_b = [], []
    for _ in range(pairs):
        res_a.append(run_a())
        res_b.append(run_b())
    sa = [speed(r) for r in res_a]
    sb = [speed(r) for r in res_b]
    return {"a": statistics.median(sa), "b": statistics.median(sb),
            "ratio": statistics.median([b / a for a, b in zip(sa, sb)]),
            "speeds_a": sa, "speeds_b": sb, "results_a": res_a, "results_b": res_b}


def reply_text(tok, result, eos_ids) -> str:
    """The text a user would see: the reply up to the end-of-turn token (a timed run decodes a fixed count past
    it with ``ignore_eos``; those tokens are timed but not part of the reply)."""
    return tok.decode(result.reply_tokens(eos_ids))


def measure(bundle_dir: Path, prompt: str, new_tokens: int, threads: int, pairs: int = 5):
    """Decode tok/s with every layer (A) and with the routers' mask (B) on one loaded backend, interleaved."""
    from runtime.backends import load_backend
    from runtime.bundle import Bundle
    from runtime.loop import SamplingConfig, generate
    from runtime.tokenizer import BundleTokenizer

    b = Bundle(bundle_dir)
    tok = BundleTokenizer(b)
    be = load_backend(b, threads=threads)
    ids = tok.encode_prompt(prompt)
    cfg = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True, eos_ids=b.eos_ids)
    ones = np.ones(b.n_layers, bool)

    def run(mask):
        return lambda: generate(be, ids, cfg, mask=mask, pinned=b.pinned, default_threshold=b.default_threshold)

    r = interleaved(run(ones), run(None), lambda g: g.decode_tokens_per_s, pairs=pairs)
    return b, tok, r


def run_prompts(bundle_dir: Path, runtime_name: str, prompts, new_tokens: int, threads: int, pairs: int) -> list:
    """Measure each prompt (``measure``), print its reply (to the end of turn) and per-run speeds; the table rows."""
    rows = []
    for prompt in prompts:
        b, tok, r = measure(bundle_dir, prompt, new_tokens, threads, pairs=pairs)
        f_res = r["results_b"][-1]
        kept = f_res.layers_kept
        print(f"-- {prompt[:60]!r}\n   {reply_text(tok, f_res, b.eos_ids)[:160]!r}\n   {f_res.stats_line()}")
        print(f"   all layers tok/s {' '.join(f'{x:.1f}' for x in r['speeds_a'])} | "
              f"FiRST tok/s {' '.join(f'{x:.1f}' for x in r['speeds_b'])}", flush=True)
        rows.append({"runtime": runtime_name, "prompt": prompt[:40], "kept": f"{kept}/{b.n_layers}",
                     "all": r["a"], "first": r["b"], "speedup": r["ratio"],
                     "ideal": b.n_layers / kept, "pairs": pairs,
                     "all_runs": r["speeds_a"], "first_runs": r["speeds_b"]})
    return rows


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m export.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="task data folder (JSONL, see ../shared/data/README.md)")
    ap.add_argument("--model", help="local HF model folder (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--run", default="runs/quick", help="run folder for the routers")
    ap.add_argument("--dist", default="dist", help="where the bundles go")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--retrain", action="store_true", help="finetune again even if the run exists")
    ap.add_argument("--eval", action="store_true",
                    help="also evaluate the routers on a slice of the val split (slow on CPU; the report goes "
                         "into the bundles)")
    ap.add_argument("--eval-prompts", type=int, default=16, help="val prompts per task for --eval (KL measures)")
    ap.add_argument("--targets", default="rpi,android")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=5,
                    help="timed (every layer, FiRST mask) pairs per prompt, run alternately; medians (at least 5)")
    args = ap.parse_args(argv)
    if args.pairs < 5:
        raise FirstEdgeError(f"--pairs must be at least 5 (got {args.pairs})")
    if not Path(args.data).is_dir():
        raise FirstEdgeError(f"task data folder not found: {args.data} (give --data DIR or set FIRST_EDGE_DATA)")
    model = ["--model", args.model] if args.model else []
    run = Path(args.run)
    if args.retrain or not (run / "routers.json").exists():
        step("finetune routers (quick preset)",
             ["export.finetune", "--data", args.data, "--out", str(run), "--preset", args.preset, *model])
    else:
        print(f"\n== routers: reusing {run} (--retrain to finetune again)")
    if args.eval and not (run / "eval_val" / "report.md").exists():
        step("evaluate on a slice of the val split",
             ["export.evaluate", "--run", str(run), "--data", args.data, "--split", "val",
              "--prompts", str(args.eval_prompts), "--budgets", "6,9", "--gen-prompts", "0", "--calib", "4",
              "--no-progress", *model])
    names = {"rpi": "ONNX Runtime (Raspberry Pi bundle)", "android": "ExecuTorch (Android bundle)"}
    rows = []
    for target in [t for t in args.targets.split(",") if t]:
        out = Path(args.dist) / f"{run.name}-{target}"
        step(f"build the {target} bundle",
             ["export.build", "--target", target, "--run", str(run), "--out", str(out), *model])
        print(f"\n== run {out} on {names[target]}: {args.new_tokens} greedy tokens timed (the reply is shown to "
              f"its end of turn), {args.threads} threads, every layer and FiRST mask interleaved: "
              f"{args.pairs} pairs after a warm-up, medians")
        rows += run_prompts(out, names[target], PROMPTS, args.new_tokens, args.threads, args.pairs)
    print(f"\n== decode speed: FiRST mask vs every layer, same bundle (tokens/s, medians of {args.pairs} interleaved "
          f"pairs; speedup = median of the per-pair ratios)")
    print(f"{'runtime':38s} {'prompt':42s} {'kept':>6s} {'all':>8s} {'FiRST':>8s} {'speedup':>8s} {'ideal':>6s}")
    for r in rows:
        print(f"{r['runtime']:38s} {r['prompt']:42s} {r['kept']:>6s} {r['all']:8.1f} {r['first']:8.1f} "
              f"{r['speedup']:7.2f}x {r['ideal']:5.2f}x")
    (Path(args.dist) / "demo_results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
