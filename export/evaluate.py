"""Evaluate a router run against the base model and input-agnostic skipping (DESIGN.md section 4).

    python -m export.evaluate --run runs/NAME --data DIR --split val [--tasks ...] [--limit N]
                              [--thresholds 0.3,0.5,0.7,0.9] [--max-new-tokens 48] [--out DIR]

Per task, every record is scored with the metric its ``metric`` field names (so any task folder in
the data format evaluates, seen in training or not); greedy decoding through the core generator
(``runtime.loop.generate`` on the PyTorch reference backend). Configurations per record:
- base: every layer kept (the same model, with the run's LoRA if it has one);
- FiRST at each threshold of the sweep (the router mask from the prompt);
- at the same number of skipped layers as FiRST on that task (rounded mean), the input-agnostic
  baselines of ``export.baselines`` applied with an explicit ``mask=``: Block Influence, evenly
  spaced middle layers, random (mean of 3 seeds).
The prompt's prefill (every layer, independent of the mask) is computed once per record and shared
by all configurations; identical masks are generated once. Writes ``results.json``, ``report.md``,
``samples.jsonl``, ``quality_vs_skip.png`` and ``mask_heatmap.png`` into ``--out``
(default ``<run>/eval_<split>``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from runtime.errors import FirstEdgeError, cli_main
from runtime.loop import SamplingConfig, generate
from runtime.masks import mask_str

from . import baselines as B
from .data import Encoder, end_of_turn_id, load_split, mix_tasks
from .generate import TorchBackend, eos_ids
from .metrics import score
from .model import FirstModel, build_first_model

BASELINE_LABELS = {"block_influence": "Block Influence", "even": "evenly spaced", "random": "random (3 seeds)"}


class SharedPrefillBackend(TorchBackend):
    """The reference backend, remembering prefills: generating the same prompt again with another
    mask only rewinds the KV lengths (the prompt entries stay in the buffers), and prompts seen
    before (kept until ``forget()``) get their prompt K/V copied back instead of recomputed."""

    def __init__(self, fm: FirstModel, max_context: Optional[int] = None):
        super().__init__(fm, max_context)
        self._key = None
        self._store = {}
        self.prefills = 0

    def forget(self):
        self._store.clear()

    def prefill(self, input_ids, threshold: float):
        ids = np.asarray(input_ids, dtype=np.int64)
        key = ids.tobytes()
        T = int(ids.size)
        if key != self._key:
            if key in self._store:
                res, ks, vs = self._store[key]
                for l in range(self.n_layers):
                    self.k[l][:, :, :T] = ks[l]
                    self.v[l][:, :, :T] = vs[l]
            else:
                res = super().prefill(ids, threshold)
                self.prefills += 1
                self._store[key] = (res, [k[:, :, :T].clone() for k in self.k], [v[:, :, :T].clone() for v in self.v])
            self._res = res
            self._key = key
        self.lengths = [T] * self.n_layers
        self.layer_calls.clear()
        logits, g, _ = self._res
        mask = (g >= np.float32(threshold)) | self.fm.pinned_mask.numpy()
        return logits, g, mask


def layer_flops(fm: FirstModel) -> np.ndarray:
    """Matmul FLOPs per decoded token: 2 * weights of each layer, and of the LM head last."""
    per = [2 * sum(p.numel() for n, p in fm.layers[l].named_parameters() if p.dim() == 2) for l in range(fm.n_layers)]
    head = 2 * fm.vocab_size * fm.hidden_size
    return np.array(per + [head], dtype=np.float64)


def flops_skipped(mask: np.ndarray, flops: np.ndarray) -> float:
    return float(flops[:-1][~np.asarray(mask, bool)].sum() / flops.sum())


def _mean(xs):
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def evaluate(fm: FirstModel, tok, data_dir, split: str = "val", tasks=None, limit: Optional[int] = 20,
             thresholds: Sequence[float] = (0.3, 0.5, 0.7, 0.9), max_new_tokens: int = 48,
             max_prompt_tokens: int = 512, calib: int = 4, seeds: Sequence[int] = (0, 1, 2),
             baselines: Sequence[str] = B.KINDS, progress: bool = True, log=None) -> dict:
    """Run the protocol; returns the results dict (see module doc)."""
    log = log or (lambda s: print(s, file=sys.stderr))
    per_task = load_split(data_dir, split, tasks, limit=limit)
    L = fm.n_layers
    thresholds = sorted(set(float(t) for t in thresholds) | {float(fm.threshold)})
    end = end_of_turn_id(tok, fm.cfg)
    enc = Encoder(tok, end, max_prompt_tokens=max_prompt_tokens, max_completion_tokens=10 ** 6)
    eos = eos_ids(tok, fm.cfg)
    flops = layer_flops(fm)
    be = SharedPrefillBackend(fm, max_context=max_prompt_tokens + max_new_tokens + 8)
    bi = None
    if "block_influence" in baselines:
        cal = mix_tasks(load_split(data_dir, "train", list(per_task), limit=max(calib * 4, calib)), calib, seed=1)
        t0 = time.time()
        bi = B.block_influence(fm, [enc.prompt(r.prompt) for r in cal])
        log(f"[evaluate] Block Influence from {len(cal)} calibration prompts ({time.time() - t0:.0f} s): "
            f"lowest {list(np.argsort(bi)[:8])}")
    ones = np.ones(L, dtype=bool)
    results = {"split": split, "limit": limit, "thresholds": thresholds, "n_layers": L, "max_new_tokens": max_new_tokens,
               "default_threshold": fm.threshold, "pinned": fm.pinned, "flops_per_token": flops.tolist(),
               "block_influence": None if bi is None else [float(x) for x in bi], "tasks": {}}
    samples = []
    bar = None
    total_recs = sum(len(v) for v in per_task.values())
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * total_recs, desc="evaluating", unit="prompt", file=sys.stderr, dynamic_ncols=True)
    t_all = time.time()
    for task, recs in per_task.items():
        prompts = [enc.prompt(r.prompt) for r in recs]
        # pass 1: router scores of every prompt (prefill only) -> FiRST masks and skip counts
        scores = []
        for ids in prompts:
            _, g, _ = be.prefill(np.asarray(ids), fm.threshold)
            scores.append(np.asarray(g, dtype=np.float32))
            if bar is not None:
                bar.update(1)
        first_masks = {tau: [fm.mask_for(g, threshold=tau) for g in scores] for tau in thresholds}
        ks = sorted({int(round(L - np.mean([m.sum() for m in first_masks[tau]]))) for tau in thresholds} - {0})
        ks = [k for k in ks if k <= L - 1]
        configs = {"base": lambda i: ones}
        for tau in thresholds:
            configs[f"first@{tau:g}"] = (lambda t: (lambda i: first_masks[t][i]))(tau)
        for kind in baselines:
            for k in ks:
                for j, m in enumerate(B.baseline_masks(kind, L, k, bi=bi, seeds=seeds)):
                    configs[f"{kind}@{k}#{j}"] = (lambda mm: (lambda i: mm))(m)
        scores_by = {c: [] for c in configs}
        chrf_by = {c: [] for c in configs}
        masks_by = {c: [] for c in configs}
        # pass 2: generate every distinct mask once per prompt (the prefill is shared)
        for i, (rec, ids) in enumerate(zip(recs, prompts)):
            ref_len = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in rec.references)
            max_new = int(min(max_new_tokens, max(8, 1.5 * ref_len + 4)))
            sc = SamplingConfig(max_new_tokens=max_new, eos_ids=eos)
            memo: Dict[bytes, tuple] = {}
            for name, fn in configs.items():
                m = np.asarray(fn(i), dtype=bool)
                key = m.tobytes()
                if key not in memo:
                    res = generate(be, ids, sc, mask=m, pinned=fm.pinned, default_threshold=fm.threshold)
                    text = tok.decode([t for t in res.tokens if t not in eos], skip_special_tokens=True).strip()
                    memo[key] = (text, score(text, rec.references, rec.metric),
                                 score(text, rec.references, "chrf"))
                    samples.append({"task": task, "i": i, "config": name, "mask": mask_str(m), "prediction": text,
                                    "score": memo[key][1]})
                text, s, c = memo[key]
                scores_by[name].append(s)
                chrf_by[name].append(c)
                masks_by[name].append(m)
            if bar is not None:
                bar.update(1)
        be.forget()
        metric = Counter(r.metric for r in recs).most_common(1)[0][0]

        def point(name):
            ms = np.array(masks_by[name])
            skipped = L - ms.sum(1)
            return {"quality": _mean(scores_by[name]), "chrf": _mean(chrf_by[name]),
                    "skipped_layers": float(skipped.mean()), "skip_rate": float(skipped.mean() / L),
                    "flops_skipped": _mean(flops_skipped(m, flops) for m in ms)}

        tr = {"metric": metric, "n": len(recs), "base": point("base"), "first": [], "baselines": {}}
        for tau in thresholds:
            p = point(f"first@{tau:g}")
            p["threshold"] = tau
            p["mean_mask"] = np.array(masks_by[f"first@{tau:g}"], dtype=np.float64).mean(0).round(4).tolist()
            p["matched_k"] = int(round(p["skipped_layers"]))
            tr["first"].append(p)
        for kind in baselines:
            rows = []
            for k in ks:
                names = [n for n in configs if n.startswith(f"{kind}@{k}#")]
                pts = [point(n) for n in names]
                row = {"k": k, "quality": _mean(p["quality"] for p in pts), "chrf": _mean(p["chrf"] for p in pts),
                       "skipped_layers": float(k), "skip_rate": k / L,
                       "flops_skipped": _mean(p["flops_skipped"] for p in pts),
                       "masks": [mask_str(masks_by[n][0]) for n in names]}
                if len(pts) > 1:
                    row["per_seed"] = [p["quality"] for p in pts]
                rows.append(row)
            tr["baselines"][kind] = rows
        tr["router_scores_mean"] = np.mean(scores, 0).round(4).tolist()
        results["tasks"][task] = tr
        log(f"[evaluate] {task}: base {tr['base']['quality']:.3f} | " + ", ".join(
            f"tau {p['threshold']:g}: {p['quality']:.3f} @ {p['skipped_layers']:.1f} skipped" for p in tr["first"]))
    if bar is not None:
        bar.close()
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    results["eval_s"] = round(time.time() - t_all, 1)
    results["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 1)
    results["summary"] = summarize(results)
    results["_samples"] = samples
    return results


def _best_baseline(tr: dict, k: int):
    best = None
    for kind, rows in tr["baselines"].items():
        for r in rows:
            if r["k"] == k and (best is None or r["quality"] > best[1]):
                best = (kind, r["quality"])
    return best


def summarize(res: dict) -> dict:
    """Averages over tasks per threshold and the three targets of the issue."""
    tasks = res["tasks"]
    L = res["n_layers"]
    per_tau = []
    for j, tau in enumerate(res["thresholds"]):
        rel, skip, flop, wins, compared, ties = [], [], [], [], 0, 0
        for t, tr in tasks.items():
            p = tr["first"][j]
            qb = tr["base"]["quality"]
            if qb > 0:
                rel.append(p["quality"] / qb)
            skip.append(p["skip_rate"])
            flop.append(p["flops_skipped"])
            if p["matched_k"] > 0:
                bb = _best_baseline(tr, p["matched_k"])
                if bb is not None:
                    compared += 1
                    if p["quality"] > bb[1] + 1e-12:
                        wins.append(t)
        per_tau.append({"threshold": tau, "mean_skip_rate": _mean(skip), "mean_flops_skipped": _mean(flop),
                        "mean_relative_quality": _mean(rel), "tasks_in_relative_mean": len(rel),
                        "wins_vs_best_baseline": wins, "tasks_compared": compared})
    ok1 = [p for p in per_tau if p["mean_skip_rate"] >= 0.25 and p["mean_relative_quality"] >= 0.95]
    at95 = [p for p in per_tau if p["mean_relative_quality"] >= 0.95]
    best95 = max(at95, key=lambda p: p["mean_skip_rate"]) if at95 else None
    most_wins = max(per_tau, key=lambda p: (len(p["wins_vs_best_baseline"]), p["mean_skip_rate"]))
    # adaptivity at the run's default threshold: layers where two tasks' mean masks fall on
    # different sides of 0.5 (the majority decision differs)
    j0 = res["thresholds"].index(float(res["default_threshold"]))
    names = list(tasks)
    pairs = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            ma = np.array(tasks[names[a]]["first"][j0]["mean_mask"]) >= 0.5
            mb = np.array(tasks[names[b]]["first"][j0]["mean_mask"]) >= 0.5
            pairs.append({"tasks": [names[a], names[b]], "layers_differ": int((ma != mb).sum()),
                          "fraction": float((ma != mb).mean())})
    adaptive = [p for p in pairs if p["fraction"] > 0.2]
    involved = sorted({t for p in adaptive for t in p["tasks"]})
    return {
        "per_threshold": per_tau,
        "target_skip25_at_95": {"met": bool(ok1), "best_skip_rate_at_95": None if best95 is None else best95["mean_skip_rate"],
                                "threshold": None if best95 is None else best95["threshold"]},
        "target_beats_baselines": {"met": len(most_wins["wins_vs_best_baseline"]) >= min(5, len(tasks)),
                                   "threshold": most_wins["threshold"], "wins": most_wins["wins_vs_best_baseline"],
                                   "tasks_compared": most_wins["tasks_compared"]},
        "target_adaptivity": {"met": len(involved) >= 2, "threshold": res["default_threshold"],
                              "pairs_over_20pct": adaptive, "max_pair": max(pairs, key=lambda p: p["fraction"]) if pairs else None},
        "n_layers": L,
    }


# ------------------------------------------------------------------ outputs
def plot(res: dict, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(res["tasks"])
    n = len(tasks)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    styles = {"block_influence": ("tab:orange", "s"), "even": ("tab:green", "^"), "random": ("tab:gray", "x")}
    for ax, t in zip(axes.flat, tasks):
        tr = res["tasks"][t]
        pts = sorted([(0.0, tr["base"]["quality"])] + [(p["skip_rate"], p["quality"]) for p in tr["first"]])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color="tab:blue", label="FiRST (threshold sweep)")
        for p in tr["first"]:
            ax.annotate(f"{p['threshold']:g}", (p["skip_rate"], p["quality"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points", color="tab:blue")
        ax.axhline(tr["base"]["quality"], ls="--", color="k", lw=0.8, label="base (no skipping)")
        for kind, rows_ in tr["baselines"].items():
            if not rows_:
                continue
            c, mk = styles.get(kind, ("tab:red", "d"))
            xs = [r["skip_rate"] for r in rows_]
            ys = [r["quality"] for r in rows_]
            if kind == "random" and all("per_seed" in r for r in rows_):
                lo = [r["quality"] - min(r["per_seed"]) for r in rows_]
                hi = [max(r["per_seed"]) - r["quality"] for r in rows_]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=mk + "--", color=c, capsize=2, lw=1, label=BASELINE_LABELS[kind])
            else:
                ax.plot(xs, ys, mk + "--", color=c, lw=1, label=BASELINE_LABELS.get(kind, kind))
        allq = [p[1] for p in pts] + [r["quality"] for rows_ in tr["baselines"].values() for r in rows_]
        if max(allq) <= 0:  # nothing scored: a readable empty axis instead of a 1e-17 offset
            ax.set_ylim(-0.05, 1.0)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(f"{t} ({tr['metric']}, n={tr['n']})")
        ax.set_xlabel("decode layers skipped (fraction)")
        ax.set_ylabel(tr["metric"])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_skip.png", dpi=110)
    plt.close(fig)

    j0 = res["thresholds"].index(float(res["default_threshold"]))
    M = np.array([res["tasks"][t]["first"][j0]["mean_mask"] for t in tasks])
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * res["n_layers"] + 2), 0.45 * n + 1.6))
    im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(n))
    ax.set_yticklabels(tasks)
    ax.set_xticks(range(res["n_layers"]))
    ax.set_xticklabels(range(res["n_layers"]), fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"mean FiRST mask per task (1 = kept), threshold {res['default_threshold']:g}")
    fig.colorbar(im, ax=ax, fraction=0.025)
    fig.tight_layout()
    fig.savefig(out / "mask_heatmap.png", dpi=110)
    plt.close(fig)


def report_md(res: dict, meta: dict) -> str:
    L = res["n_layers"]
    s = res["summary"]
    lines = [f"# FiRST evaluation: {meta.get('run')}", "",
             f"Split `{res['split']}`, up to {res['limit']} records per task, greedy decoding (max "
             f"{res['max_new_tokens']} new tokens, capped at 1.5x the longest reference + 4), {L} layers. "
             f"Quality = each record's own metric (f1/exact: SQuAD normalisation; rougeL: rouge-score; chrf: sacrebleu), "
             f"in [0, 1]. Skip = decode layers skipped, averaged over prompts; FLOPs = share of per-token matmul "
             f"FLOPs skipped (LM head in the denominator). Baselines skip the rounded FiRST count on that task.",
             f"Command: `{meta.get('command')}`; {res['eval_s']:.0f} s wall, {res.get('cpu_s', 0):.0f} s CPU.", "",
             "## Summary over tasks", "",
             "| threshold | mean skip | mean FLOPs skipped | mean quality / base | wins vs best baseline |",
             "|---|---|---|---|---|"]
    for p in s["per_threshold"]:
        lines.append(f"| {p['threshold']:g} | {p['mean_skip_rate']:.1%} | {p['mean_flops_skipped']:.1%} | "
                     f"{p['mean_relative_quality']:.3f} ({p['tasks_in_relative_mean']} tasks) | "
                     f"{len(p['wins_vs_best_baseline'])}/{p['tasks_compared']} {', '.join(p['wins_vs_best_baseline'])} |")
    t1, t2, t3 = s["target_skip25_at_95"], s["target_beats_baselines"], s["target_adaptivity"]
    mp = t3["max_pair"]
    lines += ["", "## Targets", "",
              f"- >=25% of decode layers skipped at >=95% of base quality: **{'met' if t1['met'] else 'not met'}**"
              + (f" (best skip at >=95%: {t1['best_skip_rate_at_95']:.1%} at threshold {t1['threshold']:g})"
                 if t1["best_skip_rate_at_95"] is not None else " (no threshold keeps 95%)"),
              f"- FiRST above the best input-agnostic baseline at equal skip on >=5 of 6 tasks: "
              f"**{'met' if t2['met'] else 'not met'}** (best: {len(t2['wins'])}/{t2['tasks_compared']} at threshold "
              f"{t2['threshold']:g}: {', '.join(t2['wins']) or '-'})",
              f"- input adaptivity (two tasks whose mean masks fall on different sides of 0.5 in >20% of layers, "
              f"threshold {t3['threshold']:g}): **{'met' if t3['met'] else 'not met'}**"
              + (f" (largest: {mp['tasks'][0]} vs {mp['tasks'][1]}, {mp['layers_differ']}/{L} layers)" if mp else ""),
              "", "## Per task", ""]
    for t, tr in res["tasks"].items():
        lines += [f"### {t} ({tr['metric']}, n={tr['n']})", "",
                  "| config | skipped layers | FLOPs skipped | quality | chrF |", "|---|---|---|---|---|",
                  f"| base | 0 | 0% | {tr['base']['quality']:.3f} | {tr['base']['chrf']:.3f} |"]
        for p in tr["first"]:
            lines.append(f"| FiRST tau={p['threshold']:g} | {p['skipped_layers']:.2f} | {p['flops_skipped']:.1%} | "
                         f"{p['quality']:.3f} | {p['chrf']:.3f} |")
        for kind, rows in tr["baselines"].items():
            for r in rows:
                lines.append(f"| {BASELINE_LABELS.get(kind, kind)} k={r['k']} | {r['k']} | {r['flops_skipped']:.1%} | "
                             f"{r['quality']:.3f} | {r['chrf']:.3f} |")
        lines.append("")
    lines += ["## Plots", "", "![quality vs skip](quality_vs_skip.png)", "", "![mean mask](mask_heatmap.png)", ""]
    return "\n".join(lines)


def write_outputs(res: dict, out: Path, meta: dict):
    out.mkdir(parents=True, exist_ok=True)
    samples = res.pop("_samples", [])
    res["meta"] = meta
    (out / "results.json").write_text(json.dumps(res, indent=1))
    with open(out / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    plot(res, out)
    (out / "report.md").write_text(report_md(res, meta))


def _floats(s: str) -> List[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise FirstEdgeError(f"--thresholds must be comma-separated numbers, got '{s}'") from None


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run folder written by export.finetune")
    ap.add_argument("--data", required=True, help="task data folder")
    ap.add_argument("--split", default="val", choices=["train", "val"])
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--model", help="base model folder (default: the run's, else the embedded default)")
    ap.add_argument("--limit", type=int, default=20, help="records per task (0 = all)")
    ap.add_argument("--thresholds", default="0.3,0.5,0.7,0.9")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--calib", type=int, default=4, help="calibration prompts per task for Block Influence")
    ap.add_argument("--baselines", default=",".join(B.KINDS), help="comma-separated, or 'none'")
    ap.add_argument("--out", help="output folder (default <run>/eval_<split>)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    if not (run / "routers.json").exists():
        raise FirstEdgeError(f"{run} is not a finetuned run (no routers.json)")
    try:
        rcfg = json.loads((run / "routers.json").read_text())
    except ValueError as e:
        raise FirstEdgeError(f"{run / 'routers.json'} is not valid JSON: {e}") from None
    model = args.model or rcfg.get("model_dir")
    kinds = [] if args.baselines == "none" else [k.strip() for k in args.baselines.split(",") if k.strip()]
    for k in kinds:
        if k not in B.KINDS:
            raise FirstEdgeError(f"unknown baseline '{k}' (known: {', '.join(B.KINDS)})")
    if args.limit is not None and args.limit < 0:
        raise FirstEdgeError("--limit must be >= 0")
    fm, tok = build_first_model(model, str(run))
    res = evaluate(fm, tok, args.data, args.split, args.tasks, limit=args.limit or None,
                   thresholds=_floats(args.thresholds), max_new_tokens=args.max_new_tokens,
                   max_prompt_tokens=args.max_prompt_tokens, calib=args.calib, baselines=kinds,
                   progress=not args.no_progress)
    out = Path(args.out) if args.out else run / f"eval_{args.split}"
    meta = {"run": str(run), "model": model or "default", "lora": bool(rcfg.get("lora")),
            "command": "python -m export.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_outputs(res, out, meta)
    s = res["summary"]
    print(f"[evaluate] wrote {out}/report.md, results.json, quality_vs_skip.png, mask_heatmap.png", file=sys.stderr)
    for p in s["per_threshold"]:
        print(f"threshold {p['threshold']:g}: skip {p['mean_skip_rate']:.1%}, quality/base "
              f"{p['mean_relative_quality']:.3f}, wins {len(p['wins_vs_best_baseline'])}/{p['tasks_compared']}")


if __name__ == "__main__":
    main()
