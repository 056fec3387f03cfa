"""The main job on the embedded default model, end to end.

1. finetune routers with the ``quick`` preset (``python -m export.finetune``; reused if the run exists),
2. with ``--eval``: evaluate them on a slice of the val split (``python -m export.evaluate``; its report
   goes into the bundles),
3. build the Raspberry Pi bundle (ONNX Runtime) and the Android bundle (ExecuTorch),
4. run both bundles on their device runtimes with the routers' mask and with every layer,
   and print the decode speedups side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

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


def measure(bundle_dir: Path, prompt: str, new_tokens: int, threads: int, runs: int = 3):
    """Median decode tok/s with the routers' mask and with every layer, on one loaded backend."""
    from runtime.backends import load_backend
    from runtime.bundle import Bundle
    from runtime.loop import SamplingConfig, generate
    from runtime.tokenizer import BundleTokenizer

    b = Bundle(bundle_dir)
    tok = BundleTokenizer(b)
    be = load_backend(b, threads=threads)
    ids = tok.encode_prompt(prompt)
    cfg = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True, eos_ids=b.eos_ids)
    out = {}
    for label, mask in (("first", None), ("all", np.ones(b.n_layers, bool))):
        generate(be, ids, cfg, mask=mask, pinned=b.pinned, default_threshold=b.default_threshold)  # warm-up
        res = [generate(be, ids, cfg, mask=mask, pinned=b.pinned, default_threshold=b.default_threshold)
               for _ in range(runs)]
        out[label] = (statistics.median(r.decode_tokens_per_s for r in res), res[-1])
    return b, tok, out


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
    args = ap.parse_args(argv)
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
        print(f"\n== run {out} on {names[target]}: {args.new_tokens} greedy tokens, {args.threads} threads, "
              f"median of 3 after a warm-up")
        for prompt in PROMPTS:
            b, tok, res = measure(out, prompt, args.new_tokens, args.threads)
            f_tps, f_res = res["first"]
            a_tps, _ = res["all"]
            kept = f_res.layers_kept
            reply = tok.decode(f_res.reply_tokens(b.eos_ids))  # timed over all tokens, shown to the end of turn
            print(f"-- {prompt[:60]!r}\n   {reply[:160]!r}\n   {f_res.stats_line()}")
            rows.append({"runtime": names[target], "prompt": prompt[:40], "kept": f"{kept}/{b.n_layers}",
                         "all": a_tps, "first": f_tps, "speedup": f_tps / a_tps,
                         "ideal": b.n_layers / kept})
    print("\n== decode speed: FiRST mask vs every layer, same bundle (tokens/s)")
    print(f"{'runtime':38s} {'prompt':42s} {'kept':>6s} {'all':>8s} {'FiRST':>8s} {'speedup':>8s} {'ideal':>6s}")
    for r in rows:
        print(f"{r['runtime']:38s} {r['prompt']:42s} {r['kept']:>6s} {r['all']:8.1f} {r['first']:8.1f} "
              f"{r['speedup']:7.2f}x {r['ideal']:5.2f}x")
    (Path(args.dist) / "demo_results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
