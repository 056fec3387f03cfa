"""Leave-one-task-out for a rank-recipe run: do the routers help on a task they never saw?

    python -m export.loto --run runs/NAME --data DIR [--prompts 50] [--budgets 6,9] [--out DIR]

For each task X of the run: the importance prior and pinned layers are re-estimated from the other
tasks' calibration prompts, routers are initialised from that prior and fitted on the other tasks'
labels only (``export.rank``), and ``export.evaluate`` scores them on X's val split in budget mode,
against baselines calibrated on the other tasks only (a held-out task gets no per-task baseline).
The labels themselves are the run's: their reference mask (the static mask they toggle around) was
chosen from the calibration prompts of every task, X's included (3-8 prompts of X of the 18-48); no
label of X is fitted. Writes ``loto.json`` and ``loto.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runtime.errors import FirstEdgeError, cli_main

from .evaluate import METHODS, evaluate, parse_list, read_run
from .finetune import TrainConfig
from .model import build_first_model
from .rank import TASK_TARGETS, LabelSet, fit, init_from_importance, prior_from_costs


def loto(run: Path, data_dir, prompts: int, budgets, continuation: int, calib: int, seed: int,
         progress: bool = True, log=None) -> dict:
    log = log or (lambda s: print(s, file=sys.stderr))
    rcfg = read_run(run)
    if rcfg.get("recipe") != "rank":
        raise FirstEdgeError(f"{run} was not trained with the rank recipe (leave-one-task-out refits its labels)")
    if not (run / "labels" / "meta.json").exists():
        raise FirstEdgeError(f"{run} has no labels/ folder (train it again, or with --keep-cache)")
    labels = LabelSet(run / "labels").open()
    meta = labels.meta
    cfg = TrainConfig(**{k: v for k, v in rcfg["train"]["config"].items() if k in TrainConfig.__dataclass_fields__})
    tasks = sorted(set(labels.tasks))
    costs = np.array(meta["costs"])
    ctasks = np.array(meta["calib_tasks"])
    w_task = float(rcfg["train"].get("task_weight", 0.0))  # runs from before the task targets: toggle labels only
    task_u = None
    if w_task > 0:
        f = run / "labels" / TASK_TARGETS
        if not f.exists():
            raise FirstEdgeError(f"{run} was fitted with task targets but {f} is missing (train it again)")
        task_u = {t: np.array(v["u"]) for t, v in json.loads(f.read_text())["tasks"].items()}
    out = {"run": str(run), "prompts": prompts, "budgets": list(budgets), "tasks": {}}
    for x in tasks:
        t0 = time.time()
        others = [t for t in tasks if t != x]
        fm, tok = build_first_model(rcfg.get("model_dir"), None, verbose=False)
        fm.pool_start = int(rcfg.get("pool_start", 0))
        prior, pinned, order = prior_from_costs(costs[ctasks != x], meta.get("pin_nats", cfg.pin_nats))
        fm.set_pinned(pinned)
        init_from_importance(fm, order)
        subset = np.flatnonzero(np.array(labels.tasks) != x)
        static = np.array(meta["static"], dtype=bool)  # the labels' reference mask (the run's)
        fit(fm, labels, cfg, pinned, cfg.rank_steps, progress=False, subset=subset, static=static,
            task_u=task_u, task_weight=w_task,  # X's task targets exist but none of X's prompts is fitted
            level_weight=float(rcfg["train"].get("level_weight", 0.0)),
            level_budget=float(rcfg["train"].get("level_budget", 0.5)))
        res = evaluate(fm, tok, data_dir, "val", [x], prompts=prompts, budgets=budgets, thresholds=[],
                       continuation=continuation, max_prompt_tokens=cfg.max_prompt_tokens, calib=calib,
                       train_tasks=others, gen_prompts=0, seed=seed, progress=progress, log=lambda s: None)
        tr = res["tasks"][x]
        row = {}
        for k in budgets:
            b = tr["budget"][str(k)]
            best = b["best"]
            row[str(k)] = {"first_kl": b["first"]["kl"], "best": best, "best_kl": b["baselines"][best]["kl"],
                           "diff": b["baselines"][best]["diff"], "verdict": b["verdict_vs_best"],
                           "baselines": {m: b["baselines"][m]["kl"] for m in METHODS if m in b["baselines"]}}
        out["tasks"][x] = {"trained_on": others, "pinned": pinned, "fit_prompts": int(len(subset)), "budget": row,
                           "seconds": round(time.time() - t0, 1)}
        log(f"[loto] {x}: " + "; ".join(f"k={k}: FiRST {r['first_kl']:.3f} vs {r['best']} {r['best_kl']:.3f} "
                                        f"({r['verdict']})" for k, r in row.items()))
    return out


def report(res: dict, command: str) -> str:
    lines = [f"# Leave-one-task-out: {res['run']}", "",
             f"{res['prompts']} val prompts of the held-out task; routers and baselines calibrated without it; "
             f"KL(base || config) per token on the base model's own continuation; verdict from the paired "
             f"bootstrap 95% interval of (best baseline - FiRST).", f"Command: `{command}`", "",
             "| held-out task | k | FiRST KL | best static baseline | its KL | interval (baseline - FiRST) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for t, tr in res["tasks"].items():
        for k, r in tr["budget"].items():
            lines.append(f"| {t} | {k} | {r['first_kl']:.3f} | {r['best']} | {r['best_kl']:.3f} | "
                         f"[{r['diff']['lo']:+.3f}, {r['diff']['hi']:+.3f}] | {r['verdict']} |")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m export.loto", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", "--run-dir", dest="run", required=True,
                    help="a rank-recipe run folder (with labels/, i.e. --keep-cache)"
                         "; --run-dir: the same, for torchrun, whose own --run-path makes --run ambiguous")
    ap.add_argument("--data", required=True)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--budgets", default="6,9")
    ap.add_argument("--continuation", type=int, default=24)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="output folder (default <run>/loto)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    read_run(run)
    budgets = parse_list(args.budgets, int, "budgets")
    res = loto(run, args.data, args.prompts, budgets, args.continuation, args.calib, args.seed,
               progress=not args.no_progress)
    out = Path(args.out) if args.out else run / "loto"
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m export.loto " + " ".join(sys.argv[1:] if argv is None else argv)
    res["command"] = command
    (out / "loto.json").write_text(json.dumps(res, indent=1))
    (out / "loto.md").write_text(report(res, command))
    wins = sum(r["verdict"] == "win" for tr in res["tasks"].values() for r in tr["budget"].values())
    total = sum(len(tr["budget"]) for tr in res["tasks"].values())
    print(f"[loto] wrote {out}/loto.md: FiRST below the best static baseline (significant) in {wins} of {total} "
          f"held-out task x budget cases")


if __name__ == "__main__":
    main()
