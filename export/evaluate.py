"""Evaluate a router run: protocol v2 (DESIGN.md section 4, docs/finetuning.md "Evaluation").

    python -m export.evaluate --run runs/NAME --data DIR [--split val] [--prompts 100] [--budgets 3,6,9,12]
                              [--thresholds T,..] [--gen-prompts 32] [--oracle N] [--out DIR]

Phases (``evaluate``):
1. **sample**: per task a seeded sample spread over the split's file (``importance.spread_sample``: one
   record per stratum, so one article or database does not fill the sample), the same for every
   configuration, prompts capped as in training.
2. **calibrate baselines** on the train split (``--calib`` prompts a task, spread the same way):
   Block Influence and the static importance order (the KL of skipping each layer alone on the base
   model's continuation), each globally (over the tasks the routers were trained on) and per task
   (for tasks the routers were trained on; a held-out task gets only the global ones).
3. **score** (primary, cheap, low noise): for each prompt the base model's own greedy continuation,
   then per configuration, teacher-forced on it, the per-token KL(base || configuration) and top-1
   agreement, and the NLL of the reference completion. Configurations:
   - budget mode, at each k of ``--budgets`` the same k on every prompt: FiRST top-k (the routers'
     budget mask), Block Influence global / per task, static importance global / per task, evenly
     spaced, random (3 seeds, averaged per prompt);
   - threshold mode, at each threshold: FiRST's mask, and every baseline at the count FiRST skipped
     on that prompt.
4. **compare**: per task, mode and k (or threshold), the paired bootstrap 95% interval of
   (baseline KL - FiRST KL) over prompts: a win when it lies above 0, a loss below, else a tie.
5. **generate** (secondary, ``--gen-prompts``): greedy generation scored with each record's metric, and
   the agreement with the base model's own answer (the metric against the base output), for base,
   FiRST and the best static baseline at the budgets 6 and 9 and at each threshold.
6. **oracle** (``--oracle N`` prompts a task): the best static mask per task and the best per-prompt
   mask at k = 6 and 9 (greedy, chosen on the first half of the continuation, scored on the second),
   against FiRST and the best calibrated baseline on the same second halves.
Writes ``results.json``, ``report.md``, ``kl_vs_k.png``, ``mask_heatmap.png`` (and
``quality_vs_skip.png`` with generation) into ``--out`` (default ``<run>/eval_<split>``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from runtime.errors import FirstEdgeError, cli_main
from runtime.loop import SamplingConfig, generate
from runtime.masks import budget_mask, mask_str, threshold_mask

from . import baselines, distributed
from .data import Encoder, end_of_turn_id, load_split
from .reference import TorchBackend, eos_ids
from .importance import (PromptState, Scorer, greedy_masks, importance_order, paired_bootstrap, single_skip_costs,
                         spread_sample, static_mask, verdict)
from .metrics import score
from .distributed import current
from .model import FirstModel, build_first_model

METHODS = ("bi_global", "bi_task", "static_global", "static_task", "even", "random")
# the baselines the targets name (issue: Block Influence global and per task, the static importance mask,
# evenly spaced, random); static_task (a static importance mask per task) is reported as an extra
TARGET_METHODS = ("bi_global", "bi_task", "static_global", "even", "random")
LABELS = {"first": "FiRST", "bi_global": "Block Influence (global)", "bi_task": "Block Influence (per task)",
          "static_global": "static importance (global)", "static_task": "static importance (per task)",
          "even": "evenly spaced", "random": "random (3 seeds)"}
SEEDS = (0, 1, 2)
TARGET_KS = (6, 9)


def layer_flops(fm: FirstModel) -> np.ndarray:
    """Matmul FLOPs per decoded token: 2 * weights of each layer, and of the LM head last."""
    per = [2 * sum(p.numel() for n, p in fm.layers[l].named_parameters() if p.dim() == 2) for l in range(fm.n_layers)]
    return np.array(per + [2 * fm.vocab_size * fm.hidden_size], dtype=np.float64)


# ------------------------------------------------------------------ 1. sample
def sample_prompts(data_dir, split: str, tasks, n: int, seed: int, enc: Encoder) -> Dict[str, list]:
    """{task: [(record, prompt ids)]}: ``n`` records a task spread over the file, seeded."""
    per = load_split(data_dir, split, tasks)
    return {t: [(r, enc.prompt(r.prompt)) for r in spread_sample(recs, n, seed=seed)] for t, recs in per.items()}


# ------------------------------------------------------------------ 2. calibrate baselines
def calibrate_baselines(fm: FirstModel, scorer: Scorer, data_dir, tasks: List[str], enc: Encoder, n: int,
                        n_new: int, eos, seed: int, progress=None, dist=None) -> dict:
    """Block Influence and single-layer KL costs on ``n`` train prompts per task; global = mean over tasks.
    Data parallel: prompt g of the calibration sample (counted over the tasks) is measured by rank
    g % world; the per-prompt sums are gathered. Block Influence runs on ``fm`` (on the CPU)."""
    dist = dist or current()
    samples = sample_prompts(data_dir, "train", tasks, n, seed + 1, enc)
    flat = [(t, ids) for t, items in samples.items() for _, ids in items]
    part = {}
    for g in dist.mine(range(len(flat))):
        ids = flat[g][1]
        bi = baselines.block_influence(fm, [ids])
        part[g] = ((1.0 - bi) * len(ids), len(ids), single_skip_costs(scorer, scorer.prepare(ids, n_new, eos)))
        if progress:
            progress(1)
    got = dist.merge(part)
    bi, costs = {}, {}
    for t in samples:
        rows = [got[g] for g in range(len(flat)) if flat[g][0] == t]
        bi[t] = 1.0 - np.sum([r[0] for r in rows], 0) / sum(r[1] for r in rows)
        costs[t] = np.mean([r[2] for r in rows], 0)
    return {"bi_task": bi, "cost_task": costs, "bi_global": np.mean([bi[t] for t in tasks], 0),
            "cost_global": np.mean([costs[t] for t in tasks], 0), "tasks": tasks, "prompts_per_task": n}


def baseline_mask(method: str, k: int, L: int, cal: dict, task: str, seed: int = 0) -> Optional[np.ndarray]:
    """One baseline's mask at k skipped layers, or None where it is not available (per-task calibration
    of a task the routers did not train on)."""
    if method == "bi_global":
        return baselines.bi_mask(cal["bi_global"], k)
    if method == "bi_task":
        return baselines.bi_mask(cal["bi_task"][task], k) if task in cal["bi_task"] else None
    if method == "static_global":
        return static_mask(importance_order(cal["cost_global"]), k, L)
    if method == "static_task":
        return static_mask(importance_order(cal["cost_task"][task]), k, L) if task in cal["cost_task"] else None
    if method == "even":
        return baselines.even_mask(L, k)
    if method == "random":
        return baselines.random_mask(L, k, seed)
    raise FirstEdgeError(f"unknown baseline '{method}'")


# ------------------------------------------------------------------ 3. score
def prompt_configs(g: np.ndarray, fm: FirstModel, ks, thresholds, cal: dict, task: str) -> Dict[str, List[np.ndarray]]:
    """Every configuration's mask(s) for one prompt: name -> [mask] (random: one per seed)."""
    L = fm.n_layers
    out: Dict[str, List[np.ndarray]] = {}

    def add(prefix, k, first):
        out[f"{prefix}/first"] = [first]
        for m in METHODS:
            if k == 0:
                out[f"{prefix}/{m}"] = [np.ones(L, dtype=bool)]
                continue
            seeds = SEEDS if m == "random" else (0,)
            masks = [baseline_mask(m, k, L, cal, task, s) for s in seeds]
            if masks[0] is not None:
                out[f"{prefix}/{m}"] = masks

    for k in ks:
        add(f"budget/{k}", k, budget_mask(g, L - k, fm.pinned))
    for t in thresholds:
        m = threshold_mask(g, t, fm.pinned)
        add(f"threshold/{t:g}", int(L - m.sum()), m)
    return out


def score_prompt(scorer: Scorer, ps: PromptState, configs: Dict[str, List[np.ndarray]], ref: Sequence[int],
                 nll_prefix: str = "budget/") -> Dict[str, dict]:
    """KL, top-1 agreement (and reference NLL for budget mode) of every configuration, each distinct mask
    computed once; random averages its seeds."""
    uniq: Dict[bytes, int] = {}
    rows = []
    for masks in configs.values():
        for m in masks:
            if m.tobytes() not in uniq:
                uniq[m.tobytes()] = len(rows)
                rows.append(m)
    kl, ag = scorer.kl(ps, np.stack(rows))
    nll_rows = sorted({uniq[m.tobytes()] for n, ms in configs.items() if n.startswith(nll_prefix) for m in ms})
    nll = dict(zip(nll_rows, scorer.nll(ps, np.stack([rows[i] for i in nll_rows]), ref))) if nll_rows else {}
    res = {}
    for name, masks in configs.items():
        idx = [uniq[m.tobytes()] for m in masks]
        r = {"kl": float(np.mean(kl[idx])), "top1": float(np.mean(ag[idx])),
             "skipped": float(np.mean([(~m).sum() for m in masks]))}
        if all(i in nll for i in idx):
            r["nll"] = float(np.mean([nll[i] for i in idx]))
        res[name] = r
    return res


# ------------------------------------------------------------------ 4. compare
def compare(per_prompt: Dict[str, List[dict]], prefix: str, n_boot: int, seed: int, key: str = "kl") -> dict:
    """At one operating point (``prefix``): each method's mean, and per baseline the paired bootstrap of
    (baseline - FiRST) with its verdict; ``best`` = the baseline of ``TARGET_METHODS`` with the lowest mean."""
    first = np.array([r[key] for r in per_prompt[f"{prefix}/first"]])
    out = {"first": {key: float(first.mean()), "top1": float(np.mean([r["top1"] for r in per_prompt[f"{prefix}/first"]])),
                     "skipped": float(np.mean([r["skipped"] for r in per_prompt[f"{prefix}/first"]]))},
           "baselines": {}}
    for m in METHODS:
        name = f"{prefix}/{m}"
        if name not in per_prompt:
            continue
        b = np.array([r[key] for r in per_prompt[name]])
        ci = paired_bootstrap(b - first, n_boot=n_boot, seed=seed)
        out["baselines"][m] = {key: float(b.mean()), "top1": float(np.mean([r["top1"] for r in per_prompt[name]])),
                               "diff": ci, "verdict": verdict(ci)}
    named = [m for m in TARGET_METHODS if m in out["baselines"]]
    if named:
        best = min(named, key=lambda m: out["baselines"][m][key])
        out["best"] = best
        out["verdict_vs_best"] = out["baselines"][best]["verdict"]
    return out


# ------------------------------------------------------------------ 5. generate
def generate_texts(fm: FirstModel, tok, items, configs_by_prompt: List[Dict[str, np.ndarray]], n_new: int,
                   eos, max_context: int) -> List[Dict[str, str]]:
    """Greedy generation per configuration: per prompt {configuration: reply text}."""
    be = TorchBackend(fm, max_context=max_context)
    out = []
    for (rec, ids), cfgs in zip(items, configs_by_prompt):
        memo: Dict[bytes, str] = {}
        texts = {}
        for name, m in cfgs.items():
            if m.tobytes() not in memo:
                res = generate(be, ids, SamplingConfig(max_new_tokens=n_new, eos_ids=eos), mask=m)
                memo[m.tobytes()] = tok.decode(res.reply_tokens(eos), skip_special_tokens=True).strip()
            texts[name] = memo[m.tobytes()]
        out.append(texts)
    return out


def quality_of_texts(items, texts_by_prompt: List[Dict[str, str]]) -> Dict[str, dict]:
    """Mean task metric and agreement with the base answer, per configuration."""
    scores: Dict[str, list] = {}
    agree: Dict[str, list] = {}
    for (rec, ids), texts in zip(items, texts_by_prompt):
        for name, text in texts.items():
            scores.setdefault(name, []).append(score(text, rec.references, rec.metric))
            agree.setdefault(name, []).append(score(text, [texts["base"]], rec.metric) if texts["base"] else float(text == ""))
    return {n: {"quality": float(np.mean(scores[n])), "agreement": float(np.mean(agree[n])), "n": len(scores[n])}
            for n in scores}


def generate_quality(fm: FirstModel, tok, items, configs_by_prompt: List[Dict[str, np.ndarray]], n_new: int,
                     eos, max_context: int) -> Dict[str, dict]:
    """Greedy generation per configuration: mean task metric and agreement with the base answer."""
    return quality_of_texts(items, generate_texts(fm, tok, items, configs_by_prompt, n_new, eos, max_context))


# ------------------------------------------------------------------ 6. oracle
def first_half_kl(scorer: Scorer, states: List[PromptState], halves: List[int], masks: np.ndarray) -> np.ndarray:
    """Mean KL per mask [M] over the first ``halves[i]`` continuation tokens of each prompt (what the
    oracle masks are chosen on)."""
    return np.mean([scorer.kl(s, masks, upto=h)[0] for s, h in zip(states, halves)], 0)


def second_half_kl(scorer: Scorer, state: PromptState, half: int, masks: np.ndarray) -> np.ndarray:
    """Mean KL per mask [M] over the continuation tokens from ``half`` on (what the oracle is scored on)."""
    kl, _ = scorer.kl(state, masks, per_token=True)
    return kl[:, half:].mean(1)


def oracle_study(scorer: Scorer, fm: FirstModel, states: List[PromptState], cal: dict, task: str,
                 ks=TARGET_KS) -> dict:
    """Best static (per task) and best per-prompt greedy masks, chosen on the first half of each
    continuation and scored on the second half, with FiRST's budget masks and the calibrated static
    baselines on the same second halves."""
    L = fm.n_layers
    states = [s for s in states if s.n_scored >= 4]
    if not states:
        return {}
    halves = [s.n_scored // 2 for s in states]
    ks = [k for k in ks if k <= L - 1 - len(fm.pinned)]
    if not ks:
        return {}
    kmax = max(ks)
    task_masks = greedy_masks(partial(first_half_kl, scorer, states, halves), L, kmax, fm.pinned)
    prompt_masks = [greedy_masks(partial(first_half_kl, scorer, [s], [h]), L, kmax, fm.pinned)
                    for s, h in zip(states, halves)]
    out = {"prompts": len(states)}
    for k in ks:
        if k not in task_masks:
            continue
        rows = {"oracle_task": [], "oracle_prompt": [], "first": []}
        cal_rows: Dict[str, list] = {}
        for s, h, pm in zip(states, halves, prompt_masks):
            cand = {"oracle_task": task_masks[k], "oracle_prompt": pm[k],
                    "first": budget_mask(s.scores, L - k, fm.pinned)}
            for m in ("bi_global", "bi_task", "static_global", "static_task"):
                bm = baseline_mask(m, k, L, cal, task)
                if bm is not None:
                    cand[m] = bm
            v = second_half_kl(scorer, s, h, np.stack(list(cand.values())))
            for name, x in zip(cand, v):
                (rows[name] if name in rows else cal_rows.setdefault(name, [])).append(float(x))
        means = {n: float(np.mean(v)) for n, v in {**rows, **cal_rows}.items()}
        best_static = min(means["oracle_task"], *[means[n] for n in cal_rows]) if cal_rows else means["oracle_task"]
        gain = best_static - means["oracle_prompt"]
        captured = (best_static - means["first"]) / gain if gain > 1e-9 else float("nan")
        out[str(k)] = {"kl_second_half": means, "best_static": best_static, "oracle_gain": gain,
                       "first_gain": best_static - means["first"], "captured": captured,
                       "task_mask": mask_str(task_masks[k])}
    return out


# ------------------------------------------------------------------ the protocol
def check_budgets(fm: FirstModel, budgets: Sequence[int]):
    L = fm.n_layers
    for k in budgets:
        if not 0 < k <= L - 1 - len(fm.pinned):
            raise FirstEdgeError(f"budget {k} is out of range for {L} layers with {len(fm.pinned)} pinned")


def score_prompts(scorer: Scorer, fm: FirstModel, items, enc: Encoder, continuation: int, eos, budgets, thresholds,
                  cal: dict, task: str, tick=None) -> List[tuple]:
    """Phase score, for the given prompts of a task: per prompt ({configuration: result}, {FiRST's
    configuration: mask})."""
    out = []
    for rec, ids in items:
        ps = scorer.prepare(ids, continuation, eos)
        cfgs = prompt_configs(ps.scores, fm, budgets, thresholds, cal, task)
        res = score_prompt(scorer, ps, cfgs, enc.completion(rec.completion))
        out.append((res, {name: ms[0] for name, ms in cfgs.items() if name.endswith("/first")}))
        ps.kv = None
        if tick:
            tick(1)
    return out


def collect_scores(scored: List[tuple]):
    """(per_prompt {name: [result]}, first_masks {name: [mask]}) from ``score_prompts`` rows in prompt order."""
    per_prompt: Dict[str, List[dict]] = {}
    first_masks: Dict[str, List[np.ndarray]] = {}
    for res, masks in scored:
        for name, r in res.items():
            per_prompt.setdefault(name, []).append(r)
        for name, m in masks.items():
            first_masks.setdefault(name, []).append(m)
    return per_prompt, first_masks


def score_task(scorer: Scorer, fm: FirstModel, items, enc: Encoder, continuation: int, eos, budgets, thresholds,
               cal: dict, task: str, keep_states: int = 0, tick=None):
    """Phase score: every configuration of every prompt of a task in this process. Returns (per_prompt
    {name: [result]}, FiRST's masks {name: [mask per prompt]}, the first ``keep_states`` prompt states)."""
    per_prompt, first_masks = collect_scores(score_prompts(scorer, fm, items, enc, continuation, eos, budgets,
                                                           thresholds, cal, task, tick))
    states = [scorer.prepare(ids, continuation, eos) for _, ids in items[:keep_states]]
    return per_prompt, first_masks, states


def summarise_task(items, per_prompt: Dict[str, List[dict]], first_masks: Dict[str, List[np.ndarray]], budgets,
                   thresholds, flops: np.ndarray, n_boot: int, seed: int) -> dict:
    """Phase summarise (a task): the comparisons at each budget and threshold, FiRST's mean masks and
    skip rates."""
    L = len(flops) - 1
    metric = Counter(r.metric for r, _ in items).most_common(1)[0][0]
    tr = {"metric": metric, "n": len(items), "budget": {}, "threshold": {},
          "per_prompt": {n: [round(r["kl"], 5) for r in v] for n, v in per_prompt.items()}}
    for k in budgets:
        tr["budget"][str(k)] = compare(per_prompt, f"budget/{k}", n_boot, seed)
        tr["budget"][str(k)]["nll"] = {n.split("/")[-1]: float(np.mean([r["nll"] for r in v]))
                                       for n, v in per_prompt.items() if n.startswith(f"budget/{k}/") and "nll" in v[0]}
        tr["budget"][str(k)]["mean_mask"] = np.mean(first_masks[f"budget/{k}/first"], 0).round(4).tolist()
    for t in thresholds:
        c = compare(per_prompt, f"threshold/{t:g}", n_boot, seed)
        ms = np.array(first_masks[f"threshold/{t:g}/first"])
        c["mean_mask"] = ms.mean(0).round(4).tolist()
        c["skip_rate"] = float((~ms).sum(1).mean() / L)
        c["flops_skipped"] = float(np.mean([flops[:-1][~m].sum() / flops.sum() for m in ms]))
        c["skipped_per_prompt"] = [int((~m).sum()) for m in ms]
        tr["threshold"][f"{t:g}"] = c
    return tr


def generation_masks(tr: dict, first_masks: Dict[str, List[np.ndarray]], thresholds, cal: dict, task: str,
                     L: int, n: int) -> List[Dict[str, np.ndarray]]:
    """Phase masks (generation): per prompt, {configuration: mask} for base, FiRST at the target budgets
    and each threshold, and the best static baseline at the target budgets."""
    out = []
    for j in range(n):
        masks = {"base": np.ones(L, dtype=bool)}
        for k in TARGET_KS:
            if str(k) in tr["budget"]:
                masks[f"budget/{k}/first"] = first_masks[f"budget/{k}/first"][j]
                best = tr["budget"][str(k)].get("best")
                if best and best != "random":
                    masks[f"budget/{k}/best_static"] = baseline_mask(best, k, L, cal, task)
        for t in thresholds:
            masks[f"threshold/{t:g}/first"] = first_masks[f"threshold/{t:g}/first"][j]
        out.append(masks)
    return out


def evaluate(fm: FirstModel, tok, data_dir, split: str = "val", tasks=None, prompts: int = 100,
             budgets: Sequence[int] = (3, 6, 9, 12), thresholds: Sequence[float] = (), continuation: int = 24,
             max_prompt_tokens: int = 256, calib: int = 8, train_tasks: Optional[List[str]] = None,
             gen_prompts: int = 32, gen_tokens: int = 48, oracle: int = 0, seed: int = 0, n_boot: int = 2000,
             bf16: Optional[bool] = None, progress: bool = True, log=None, dist=None,
             work: Optional[FirstModel] = None) -> dict:
    """The protocol (module docstring): sample, calibrate, then per task score, summarise, oracle and
    generate; the summary over tasks last.

    Data parallel (``export.distributed``; torchrun / accelerate launch): the prompts are numbered over
    the tasks and prompt g is scored (and generated) by rank g % world; results are gathered in prompt
    order, so every process returns what one process would (up to floating-point summation order).
    The oracle study runs on rank 0. ``work``: the model the scorer runs (any dtype and device)."""
    dist = dist or current()
    if log is None:
        def log(line):
            print(line, file=sys.stderr)
    if not dist.main:
        progress, log = False, (lambda line: None)
    t_all = time.time()
    L = fm.n_layers
    eos = eos_ids(tok, fm.cfg)
    enc = Encoder(tok, end_of_turn_id(tok, fm.cfg), max_prompt_tokens=max_prompt_tokens,
                  max_completion_tokens=continuation)
    check_budgets(fm, budgets)
    thresholds = sorted(set(float(t) for t in thresholds) | {float(fm.threshold)})
    samples = sample_prompts(data_dir, split, tasks, prompts, seed, enc)
    cal_tasks = list(train_tasks or samples)  # global baselines: the tasks the routers were trained on
    scorer = Scorer(fm, bf16=bf16) if work is None else Scorer(fm, work=work)
    flat = [(t, j) for t, items in samples.items() for j in range(len(items))]
    mine = dist.mine(range(len(flat)))
    bar = None
    if progress:
        from tqdm import tqdm

        n_cal = len(dist.mine(range(calib * len(cal_tasks))))
        bar = tqdm(total=n_cal + len(mine), desc="evaluating", unit="prompt", file=sys.stderr, dynamic_ncols=True)
    tick = bar.update if bar is not None else None
    t0 = time.time()
    cal = calibrate_baselines(fm, scorer, data_dir, cal_tasks, enc, calib, continuation, eos, seed, progress=tick,
                              dist=dist)
    log(f"[evaluate] baselines calibrated on {calib} train prompts x {len(cal_tasks)} tasks ({time.time() - t0:.0f} s)")
    flops = layer_flops(fm)
    res = {"protocol": 2, "split": split, "n_layers": L, "prompts_per_task": prompts, "budgets": list(budgets),
           "thresholds": thresholds, "continuation_tokens": continuation, "max_prompt_tokens": max_prompt_tokens,
           "seed": seed, "bootstrap": n_boot, "pinned": fm.pinned, "default_threshold": fm.threshold,
           "pool_start": int(getattr(fm, "pool_start", 0)), "calibration_tasks": cal_tasks,
           "flops_per_token": flops.tolist(), "tasks": {}, "distributed": dist.summary(),
           "baseline_calibration": {"bi_global": cal["bi_global"].round(5).tolist(),
                                    "kl_skip_one_global": cal["cost_global"].round(5).tolist()}}
    # -- score: this process's prompts, then every prompt's results in order
    part = {}
    for g in mine:
        t, j = flat[g]
        part[g] = score_prompts(scorer, fm, [samples[t][j]], enc, continuation, eos, budgets, thresholds, cal, t,
                                tick)[0]
    scored = dist.merge(part)
    # -- summarise every task; oracle (rank 0); the generation masks
    gen_jobs = []  # (task, j, {configuration: mask})
    for task, items in samples.items():
        per_prompt, first_masks = collect_scores([scored[g] for g, (t, _) in enumerate(flat) if t == task])
        tr = summarise_task(items, per_prompt, first_masks, budgets, thresholds, flops, n_boot, seed)
        if oracle and dist.main:
            oks = [k for k in budgets if k in TARGET_KS] or list(budgets)  # k = 6, 9; any budget on a small model
            states = [scorer.prepare(ids, continuation, eos) for _, ids in items[:oracle]]
            tr["oracle"] = oracle_study(scorer, fm, states, cal, task, ks=oks)
        if gen_prompts:
            n_gen = len(items[:gen_prompts])
            masks = generation_masks(tr, first_masks, thresholds, cal, task, L, n_gen)
            gen_jobs += [(task, j, masks[j]) for j in range(n_gen)]
        res["tasks"][task] = tr
    # -- generate: this process's share of the generation prompts
    if gen_jobs:
        part = {}
        for g in dist.mine(range(len(gen_jobs))):
            task, j, masks = gen_jobs[g]
            part[g] = generate_texts(fm, tok, [samples[task][j]], [masks], gen_tokens, eos,
                                     max_prompt_tokens + gen_tokens + 8)[0]
        texts = dist.merge(part)
        for task, items in samples.items():
            rows = [(samples[t][j], texts[g]) for g, (t, j, _) in enumerate(gen_jobs) if t == task]
            res["tasks"][task]["generation"] = quality_of_texts([r[0] for r in rows], [r[1] for r in rows])
    for task, tr in res["tasks"].items():
        b6 = tr["budget"].get("6") or next(iter(tr["budget"].values()), None)
        if b6:
            log(f"[evaluate] {task}: budget KL FiRST {b6['first']['kl']:.3f} vs best static "
                f"{b6.get('best')} {b6['baselines'][b6['best']]['kl']:.3f} ({b6.get('verdict_vs_best')})")
    if bar is not None:
        bar.close()
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = dist.gather(round(ru.ru_utime + ru.ru_stime, 1))
    res["eval_s"] = round(time.time() - t_all, 1)
    res["cpu_s"] = round(sum(cpu), 1)
    if dist.active:
        res["cpu_s_per_rank"] = cpu
        res["prompts_per_rank"] = [len(dist.records_of(len(flat))[r]) for r in range(dist.world)]
    res["summary"] = summarize(res)
    if oracle and dist.active:  # the oracle study ran on rank 0: every process returns rank 0's result
        res = dist.broadcast(res)
    return res


def summarize(res: dict) -> dict:
    tasks = res["tasks"]
    n = len(tasks)
    need = min(5, n)
    budget = {}
    for k in res["budgets"]:
        v = {t: tr["budget"][str(k)].get("verdict_vs_best", "tie") for t, tr in tasks.items()}
        budget[str(k)] = {"wins": [t for t, x in v.items() if x == "win"], "ties": [t for t, x in v.items() if x == "tie"],
                          "losses": [t for t, x in v.items() if x == "loss"],
                          "first_kl": float(np.mean([tr["budget"][str(k)]["first"]["kl"] for tr in tasks.values()])),
                          "best_static_kl": float(np.mean([tr["budget"][str(k)]["baselines"][tr["budget"][str(k)]["best"]]["kl"]
                                                           for tr in tasks.values()]))}
    target_budget = {str(k): {"met": len(budget[str(k)]["wins"]) >= need, "wins": len(budget[str(k)]["wins"]),
                              "of": n} for k in TARGET_KS if str(k) in budget}
    thr = []
    for t in res["thresholds"]:
        row = {"threshold": t, "skip_rate": float(np.mean([tr["threshold"][f"{t:g}"]["skip_rate"] for tr in tasks.values()])),
               "kl": float(np.mean([tr["threshold"][f"{t:g}"]["first"]["kl"] for tr in tasks.values()])),
               "wins": [tk for tk, tr in tasks.items() if tr["threshold"][f"{t:g}"].get("verdict_vs_best") == "win"]}
        rel = []
        for tk, tr in tasks.items():
            gq = tr.get("generation") or {}
            name = f"threshold/{t:g}/first"
            if name in gq and "base" in gq:
                qb = gq["base"]["quality"]
                rel.append(gq[name]["quality"] / qb if qb >= 0.05 else gq[name]["agreement"])
        if rel:
            row["relative_quality"] = float(np.mean(rel))
        thr.append(row)
    ok = [r for r in thr if r["skip_rate"] >= 0.25 and r.get("relative_quality", 0) >= 0.95]
    oracle = {}
    for k in TARGET_KS:
        caps = [tr["oracle"][str(k)] for tr in tasks.values() if tr.get("oracle") and str(k) in tr["oracle"]]
        if caps:
            gain = float(np.mean([c["oracle_gain"] for c in caps]))
            fg = float(np.mean([c["first_gain"] for c in caps]))
            oracle[str(k)] = {"oracle_gain": gain, "first_gain": fg, "captured": fg / gain if gain > 1e-9 else float("nan"),
                              "met": gain > 1e-9 and fg / gain >= 0.5}
    return {"budget": budget, "target_budget": target_budget, "threshold": thr,
            "target_threshold": {"met": bool(ok), "assessed": any("relative_quality" in r for r in thr),
                                 "best": max(ok, key=lambda r: r["skip_rate"]) if ok else None},
            "oracle": oracle}


# ------------------------------------------------------------------ outputs
def plot(res: dict, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(res["tasks"])
    n = len(tasks)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows), squeeze=False)
    styles = {"first": ("tab:blue", "o"), "bi_global": ("tab:orange", "s"), "bi_task": ("tab:red", "s"),
              "static_global": ("tab:purple", "D"), "static_task": ("tab:brown", "D"), "even": ("tab:green", "^"),
              "random": ("tab:gray", "x")}
    ks = res["budgets"]
    for ax, t in zip(axes.flat, tasks):
        tr = res["tasks"][t]
        for m, (c, mk) in styles.items():
            ys, lo, hi, xs = [], [], [], []
            for k in ks:
                b = tr["budget"][str(k)]
                if m == "first":
                    y = b["first"]["kl"]
                    e = (0.0, 0.0)
                elif m in b["baselines"]:
                    y = b["baselines"][m]["kl"]
                    d = b["baselines"][m]["diff"]  # baseline - FiRST: its interval, placed on the baseline
                    e = (d["mean"] - d["lo"], d["hi"] - d["mean"])
                else:
                    continue
                xs.append(k)
                ys.append(y)
                lo.append(e[0])
                hi.append(e[1])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=mk + ("-" if m == "first" else "--"), color=c, capsize=2,
                            lw=1.6 if m == "first" else 0.9, label=LABELS[m])
        ax.set_title(f"{t} (n={tr['n']})")
        ax.set_xlabel("layers skipped (budget mode)")
        ax.set_ylabel("KL(base || config), nats/token")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "kl_vs_k.png", dpi=110)
    plt.close(fig)

    k = str(9 if 9 in ks else ks[len(ks) // 2])
    t0 = f"{res['default_threshold']:g}"
    mean_masks = np.array([res["tasks"][t]["budget"][k]["mean_mask"] for t in tasks] +
                 [res["tasks"][t]["threshold"][t0]["mean_mask"] for t in tasks])
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * res["n_layers"] + 2), 0.4 * len(mean_masks) + 1.6))
    im = ax.imshow(mean_masks, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(mean_masks)))
    ax.set_yticklabels([f"{t} (budget k={k})" for t in tasks] + [f"{t} (threshold {t0})" for t in tasks], fontsize=7)
    ax.set_xticks(range(res["n_layers"]))
    ax.set_xticklabels(range(res["n_layers"]), fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title("mean FiRST mask per task (1 = kept)")
    fig.colorbar(im, ax=ax, fraction=0.025)
    fig.tight_layout()
    fig.savefig(out / "mask_heatmap.png", dpi=110)
    plt.close(fig)


def report_md(res: dict, meta: dict) -> str:
    s = res["summary"]
    L = res["n_layers"]
    lines = [f"# FiRST evaluation (protocol v2): {meta.get('run')}", "",
             f"Split `{res['split']}`, {res['prompts_per_task']} prompts per task (seeded {res['seed']}, spread over each "
             f"file), prompts capped at {res['max_prompt_tokens']} tokens; primary measure: KL(base || configuration) "
             f"per token, teacher-forced on the base model's own greedy continuation ({res['continuation_tokens']} "
             f"tokens). A win needs the paired-bootstrap 95% interval ({res['bootstrap']} resamples) of "
             f"(baseline KL - FiRST KL) to lie above 0. {L} layers; pinned {res['pinned']}; router pooling from "
             f"token {res['pool_start']}.",
             f"Command: `{meta.get('command')}`; {res['eval_s']:.0f} s wall, {res['cpu_s']:.0f} s CPU.", "",
             "## Targets", ""]
    for k, t in s["target_budget"].items():
        b = s["budget"][k]
        lines.append(f"- budget mode, k = {k}: FiRST below the best static baseline on {t['wins']} of {t['of']} tasks "
                     f"(needed {min(5, t['of'])}): **{'met' if t['met'] else 'not met'}** (wins: {', '.join(b['wins']) or '-'}; "
                     f"ties: {', '.join(b['ties']) or '-'}; losses: {', '.join(b['losses']) or '-'}); mean KL FiRST "
                     f"{b['first_kl']:.3f} vs best static {b['best_static_kl']:.3f}")
    tt = s["target_threshold"]
    if tt["assessed"]:
        lines.append(f"- threshold mode, >= 25% skipped at >= 95% of base quality: **{'met' if tt['met'] else 'not met'}**")
    else:
        lines.append("- threshold mode quality target: not assessed (no generation: --gen-prompts 0)")
    for k, o in s["oracle"].items():
        lines.append(f"- oracle, k = {k}: per-prompt oracle gain over the best static mask {o['oracle_gain']:.3f} nats, "
                     f"FiRST's {o['first_gain']:.3f} ({o['captured']:.0%} captured): **{'met' if o['met'] else 'not met'}**")
    if not s["oracle"]:
        lines.append("- oracle: not run (--oracle 0)")
    lines += ["", "## Budget mode (same k on every prompt): mean KL per task", ""]
    head = ["task", "k", "FiRST"] + [LABELS[m] for m in METHODS] + ["verdict vs best named baseline"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, tr in res["tasks"].items():
        for k in res["budgets"]:
            b = tr["budget"][str(k)]
            cells = [t, str(k), f"{b['first']['kl']:.3f}"]
            for m in METHODS:
                x = b["baselines"].get(m)
                cells.append("-" if x is None else f"{x['kl']:.3f} [{x['diff']['lo']:+.3f}, {x['diff']['hi']:+.3f}]")
            cells.append(f"{b.get('verdict_vs_best')} ({b.get('best')})")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Brackets: 95% interval of (baseline - FiRST); above 0 = FiRST better.", "",
              "## Threshold mode (baselines skip FiRST's count on each prompt)", "",
              "| threshold | mean skip | mean KL FiRST | tasks won | relative quality (generation) |", "|---|---|---|---|---|"]
    for r in s["threshold"]:
        rq = f"{r['relative_quality']:.3f}" if "relative_quality" in r else "-"
        lines.append(f"| {r['threshold']:g} | {r['skip_rate']:.1%} | {r['kl']:.3f} | {len(r['wins'])} "
                     f"({', '.join(r['wins']) or '-'}) | {rq} |")
    gen = {t: tr["generation"] for t, tr in res["tasks"].items() if tr.get("generation")}
    if gen:
        lines += ["", "## Generation (secondary): task metric / agreement with the base answer", ""]
        names = list(next(iter(gen.values())))
        lines += ["| task | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for t, g in gen.items():
            lines.append(f"| {t} | " + " | ".join(f"{g[n]['quality']:.3f} / {g[n]['agreement']:.2f}" for n in names) + " |")
    orc = {t: tr["oracle"] for t, tr in res["tasks"].items() if tr.get("oracle")}
    if orc:
        lines += ["", "## Oracle study (second-half KL)", "", "| task | k | best static | per-prompt oracle | FiRST | captured |",
                  "|---|---|---|---|---|---|"]
        for t, o in orc.items():
            for k in TARGET_KS:
                if str(k) in o:
                    x = o[str(k)]
                    lines.append(f"| {t} | {k} | {x['best_static']:.3f} | {x['kl_second_half']['oracle_prompt']:.3f} | "
                                 f"{x['kl_second_half']['first']:.3f} | {x['captured']:.0%} |")
    lines += ["", "## Plots", "", "![KL vs k](kl_vs_k.png)", "", "![mean mask](mask_heatmap.png)", ""]
    return "\n".join(lines)


def write_outputs(res: dict, out: Path, meta: dict):
    out.mkdir(parents=True, exist_ok=True)
    res["meta"] = meta
    (out / "results.json").write_text(json.dumps(res, indent=1))
    plot(res, out)
    (out / "report.md").write_text(report_md(res, meta))


def read_run(run: Path) -> dict:
    """routers.json of a finetuned run folder, or a one-line error."""
    if not (run / "routers.json").exists():
        raise FirstEdgeError(f"{run} is not a finetuned run (no routers.json)")
    try:
        return json.loads((run / "routers.json").read_text())
    except ValueError as e:
        raise FirstEdgeError(f"{run / 'routers.json'} is not valid JSON: {e}") from None


def parse_list(s: str, typ, what: str):
    try:
        return [typ(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise FirstEdgeError(f"--{what} must be comma-separated numbers, got '{s}'") from None


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", "--run-dir", dest="run", required=True,
                    help="run folder written by export.finetune"
                         "; --run-dir: the same, for torchrun, whose own --run-path makes --run ambiguous")
    ap.add_argument("--data", required=True, help="task data folder")
    ap.add_argument("--split", default="val", choices=["train", "val"])
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--model", help="base model folder (default: the run's, else the embedded default)")
    ap.add_argument("--prompts", type=int, default=100, help="prompts per task for the KL measures")
    ap.add_argument("--budgets", default="3,6,9,12", help="skipped layers for budget mode")
    ap.add_argument("--thresholds", default=None,
                    help="thresholds for threshold mode (default: the run's calibrated points and its default)")
    ap.add_argument("--continuation", type=int, default=24, help="tokens of the base continuation scored")
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the run's training cap")
    ap.add_argument("--calib", type=int, default=8, help="train prompts per task calibrating the baselines")
    ap.add_argument("--gen-prompts", type=int, default=32, help="prompts per task for generation (0: none)")
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--oracle", type=int, default=0, help="prompts per task for the oracle study (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--fp32", action="store_true", help="fp32 even where bf16 is fast (the same as --dtype fp32)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    ap.add_argument("--dtype", default=None, help="the scored model's precision: bf16, fp16 or fp32 (default: bf16 on "
                                                  "CUDA and on CPUs with AMX, else fp32)")
    ap.add_argument("--out", help="output folder (default <run>/eval_<split>)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is not None:
        distributed.resolve_dtype(args.dtype, "cpu")  # an unknown name is a one-line error before anything loads
        if args.fp32 and args.dtype != "fp32":
            raise FirstEdgeError(f"give either --fp32 or --dtype {args.dtype}, not both")
    device = distributed.resolve_device(args.device)
    run = Path(args.run)
    rcfg = read_run(run)
    for name in ("prompts", "continuation", "calib", "bootstrap"):
        if getattr(args, name) < 1:
            raise FirstEdgeError(f"--{name} must be at least 1")
    for name in ("gen_prompts", "oracle"):
        if getattr(args, name) < 0:
            raise FirstEdgeError(f"--{name.replace('_', '-')} must be >= 0")
    model = args.model or rcfg.get("model_dir")
    tcfg = (rcfg.get("train") or {}).get("config") or {}
    cap = args.max_prompt_tokens or int(tcfg.get("max_prompt_tokens", 256))
    budgets = parse_list(args.budgets, int, "budgets")
    fm, tok = build_first_model(model, str(run))
    if args.thresholds is None:
        thresholds = [p["threshold"] for p in (rcfg.get("calibration") or {}).get("points", [])]
    else:
        thresholds = parse_list(args.thresholds, float, "thresholds")
    for t in thresholds:
        if not np.isfinite(t):
            raise FirstEdgeError(f"threshold {t} is not a finite number")
    train_tasks = (rcfg.get("train") or {}).get("tasks")
    try:
        dist = distributed.setup(device)
        dtype = distributed.resolve_dtype(args.dtype, dist.device, prefer_bf16=not args.fp32)
        work = distributed.working_copy(fm, dtype, dist.device, share_routers=False)
        res = evaluate(fm, tok, args.data, args.split, args.tasks, prompts=args.prompts, budgets=budgets,
                       thresholds=thresholds, continuation=args.continuation, max_prompt_tokens=cap, calib=args.calib,
                       train_tasks=train_tasks, gen_prompts=args.gen_prompts, gen_tokens=args.gen_tokens,
                       oracle=args.oracle, seed=args.seed, n_boot=args.bootstrap, progress=not args.no_progress,
                       dist=dist, work=work)
        res["distributed"]["dtype"] = dtype
        if not dist.main:
            return
    finally:
        distributed.teardown()
    out = Path(args.out) if args.out else run / f"eval_{args.split}"
    meta = {"run": str(run), "model": model or "default", "recipe": rcfg.get("recipe", "e2e"),
            "command": "python -m export.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_outputs(res, out, meta)
    s = res["summary"]
    print(f"[evaluate] wrote {out}/report.md, results.json, kl_vs_k.png, mask_heatmap.png", file=sys.stderr)
    for k, b in s["budget"].items():
        print(f"budget k={k}: mean KL FiRST {b['first_kl']:.3f} vs best static {b['best_static_kl']:.3f}; "
              f"wins {len(b['wins'])}, ties {len(b['ties'])}, losses {len(b['losses'])} of {len(res['tasks'])}")
    for r in s["threshold"]:
        rq = f", relative quality {r['relative_quality']:.3f}" if "relative_quality" in r else ""
        print(f"threshold {r['threshold']:g}: skip {r['skip_rate']:.1%}, KL {r['kl']:.3f}{rq}")


if __name__ == "__main__":
    main()
