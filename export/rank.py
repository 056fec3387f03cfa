"""Router training v2 (the ``rank`` recipe of ``python -m export.finetune``): routers learn, per prompt,
how the measured importance of each layer deviates from a static importance order.

Phases (``train_rank``):
1. **prepare**: encode the records; the routers pool over the prompt after the chat template's shared
   prefix (``pool_start`` = its token count, DESIGN.md section 1).
2. **measure** (``measure``), once per run, cached under ``<out>/labels``:
   - on a calibration subset (``calib_per_task`` records a task), the KL cost of skipping each layer
     alone, on the base model's own greedy continuation: the **importance prior** (mean over
     prompts); layers that cost more than ``pin_nats`` on at least 90% of those prompts are
     **pinned**;
   - the static mask S skips the ``label_k`` least important layers;
   - for every training prompt, the **toggle labels** ``u[l]`` (``export.importance.toggle_labels``):
     what removing kept layer l from S costs, or what adding skipped layer l gains, in KL nats
     per token on that prompt's continuation; and the routers' inputs (the pooled prompt hidden
     states entering each layer).
3. **init**: routers whose score is a constant ramp in importance order (``fc2.weight = 0``), so budget
   mode reproduces the static importance mask exactly before any training, and threshold 0.5 keeps
   every layer;
4. **fit**: a pairwise ranking loss per prompt on the router logits: for layers i, j with
   ``u_i > u_j``, ``min(u_i - u_j, cap) * softplus(-(z_i - z_j) / temperature)``, averaged per prompt;
   weight decay keeps the routers near the prior where the labels do not agree;
5. **calibrate**: on a spread sample of the val split, the thresholds at which the routers skip 3, 6,
   9 and 12 layers on average, with the measured KL; the default threshold is the point nearest
   ``label_k`` skipped layers. Stored in ``routers.json`` (and the bundle manifest).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from runtime.errors import FirstEdgeError
from runtime.masks import budget_mask, threshold_mask

from .importance import (PromptState, Scorer, importance_order, single_skip_costs, spread_sample, static_mask,
                         toggle_labels)
from .model import FirstModel

LABELS_FORMAT = 1
INIT_LO, INIT_HI = 2.0, 4.0   # router logits of the least and most important layer at initialisation
CALIB_KS = (3, 6, 9, 12)


# ------------------------------------------------------------------ init
def init_from_importance(fm: FirstModel, order) -> None:
    """Routers that score every prompt the same, ranked by importance: budget mode at k skipped layers
    gives ``static_mask(order, k)``; every score is above 0.5 (sigmoid(2) = 0.88)."""
    L = fm.n_layers
    rank = np.empty(L, dtype=np.float64)
    rank[np.asarray(order)] = np.arange(L)
    with torch.no_grad():
        for l, r in enumerate(fm.routers):
            r.fc2.weight.zero_()
            r.fc2.bias.fill_(INIT_LO + (INIT_HI - INIT_LO) * rank[l] / max(L - 1, 1))


# ------------------------------------------------------------------ measure
class LabelSet:
    """Per training prompt: toggle labels u [L], KL of the static mask, task, and the pooled router
    inputs (memory-mapped [sum P, L, D] float16-safe bf16 bits)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def complete(self, key: str) -> bool:
        m = self.folder / "meta.json"
        try:
            meta = json.loads(m.read_text())
        except (OSError, ValueError):
            return False
        return meta.get("key") == key and meta.get("complete") is True and meta.get("format") == LABELS_FORMAT

    def write(self, key: str, meta: dict, states: List[PromptState], u: np.ndarray, k0: np.ndarray, tasks: List[str]):
        self.folder.mkdir(parents=True, exist_ok=True)
        L, D = len(states[0].hidden), states[0].hidden[0].shape[-1]
        lens = [int(s.hidden[0].shape[0]) for s in states]
        arr = np.memmap(self.folder / "hidden.bin", dtype=np.int16, mode="w+", shape=(sum(lens), L, D))
        off = 0
        for s, n in zip(states, lens):
            blk = torch.stack([h.to(torch.bfloat16) for h in s.hidden], 1)  # [P, L, D]
            arr[off:off + n] = blk.view(torch.int16).numpy()
            off += n
        arr.flush()
        del arr
        np.savez(self.folder / "labels.npz", u=u, k0=k0, lens=np.array(lens), tasks=np.array(tasks))
        meta = dict(meta, format=LABELS_FORMAT, key=key, tokens=sum(lens), L=L, D=D, complete=True)
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=1))

    def open(self):
        self.meta = json.loads((self.folder / "meta.json").read_text())
        z = np.load(self.folder / "labels.npz")
        self.u, self.k0, self.lens, self.tasks = z["u"], z["k0"], z["lens"], list(z["tasks"])
        self.offs = np.concatenate([[0], np.cumsum(self.lens)[:-1]]).astype(np.int64)
        L, D = self.meta["L"], self.meta["D"]
        self.arr = np.memmap(self.folder / "hidden.bin", dtype=np.int16, mode="r", shape=(self.meta["tokens"], L, D))
        return self

    def __len__(self):
        return len(self.u)

    def batch(self, idx) -> dict:
        P = int(max(self.lens[i] for i in idx))
        L, D = self.meta["L"], self.meta["D"]
        h = torch.zeros(len(idx), P, L, D, dtype=torch.float32)
        pm = torch.zeros(len(idx), P, dtype=torch.bool)
        for j, i in enumerate(idx):
            n, o = int(self.lens[i]), int(self.offs[i])
            h[j, :n] = torch.from_numpy(np.array(self.arr[o:o + n])).view(torch.bfloat16).float()
            pm[j, :n] = True
        return {"hidden": h, "pmask": pm, "u": torch.from_numpy(self.u[list(idx)]).float()}


def pooled_scores(fm: FirstModel, hidden: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
    """g [B, L] from pooled router inputs hidden [B, P, L, D] (pmask marks the pooled positions)."""
    w = pmask.float()
    den = w.sum(1).clamp_min(1.0)
    return torch.stack([(fm.router_probs(l, hidden[:, :, l]) * w).sum(1) / den for l in range(fm.n_layers)], 1)


def measure(fm: FirstModel, encoded, tasks: List[str], cfg, eos, progress: bool = True, log=print) -> dict:
    """Importance prior, pinned layers, static mask, and per-prompt labels with router inputs."""
    scorer = Scorer(fm, bf16=None if cfg.bf16 else False)
    L = fm.n_layers
    n_new = cfg.max_completion_tokens
    by_task: Dict[str, List[int]] = {}
    for i, e in enumerate(encoded):
        by_task.setdefault(e.record.task, []).append(i)
    calib_idx = [i for t in sorted(by_task) for i in by_task[t][:cfg.calib_per_task]]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(calib_idx) + len(encoded), desc="measuring layer importance", unit="prompt",
                   file=sys.stderr, dynamic_ncols=True)
    t0 = time.time()
    states: Dict[int, PromptState] = {}
    costs = []
    for i in calib_idx:
        ps = scorer.prepare(encoded[i].prompt_ids, n_new, eos, keep_hidden=True)
        states[i] = ps
        costs.append(single_skip_costs(scorer, ps))
        if bar is not None:
            bar.update(1)
    costs = np.array(costs)
    prior, pinned, order = prior_from_costs(costs, cfg.pin_nats)
    k = label_k(cfg, L, len(pinned))
    S = static_mask(order, k, L)
    log(f"[finetune] importance prior from {len(calib_idx)} prompts ({time.time() - t0:.0f} s); pinned {pinned}; "
        f"static mask skips {sorted(int(x) for x in np.flatnonzero(~S))}")
    us, k0s, kept_states = [], [], []
    for i, e in enumerate(encoded):
        ps = states.pop(i, None) or scorer.prepare(e.prompt_ids, n_new, eos, keep_hidden=True)
        u, k0 = toggle_labels(scorer, ps, S)
        ps.kv = None  # only the router inputs are kept
        us.append(u)
        k0s.append(k0)
        kept_states.append(ps)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"prior": prior, "costs": costs, "calib_tasks": [encoded[i].record.task for i in calib_idx],
            "pinned": pinned, "order": order, "static": S, "label_k": k,
            "u": np.array(us, dtype=np.float32), "k0": np.array(k0s, dtype=np.float32), "states": kept_states,
            "measure_s": time.time() - t0, "tasks": [e.record.task for e in encoded]}


def prior_from_costs(costs: np.ndarray, pin_nats: float):
    """Importance prior (mean single-skip KL), pinned layers (costing more than ``pin_nats`` on at
    least 90% of the prompts) and the importance order, from costs [prompts, L]."""
    costs = np.asarray(costs, dtype=np.float64)
    prior = costs.mean(0)
    pinned = [l for l in range(costs.shape[1]) if float(np.mean(costs[:, l] > pin_nats)) >= 0.9]
    return prior, pinned, importance_order(prior, pinned)


def label_k(cfg, L: int, n_pinned: int) -> int:
    k = cfg.label_k if cfg.label_k else int(round(L * (1.0 - (cfg.target_keep or 0.7))))
    return max(1, min(int(k), L - n_pinned - 1))


# ------------------------------------------------------------------ fit
def rank_loss(z: torch.Tensor, u: torch.Tensor, free: torch.Tensor, cap: float, temperature: float) -> torch.Tensor:
    """Pairwise ranking loss, averaged per prompt: z router logits [B, L], u labels [B, L], free [L]
    (False for pinned layers, which take no part)."""
    du = (u.unsqueeze(2) - u.unsqueeze(1)).clamp(min=0.0, max=cap)  # i more important than j
    pair = (free.view(1, -1, 1) & free.view(1, 1, -1)).float()
    w = du * pair
    dz = z.unsqueeze(2) - z.unsqueeze(1)
    per = (w * F.softplus(-dz / temperature)).sum((1, 2)) / w.sum((1, 2)).clamp_min(1e-8)
    return per.mean()


def predicted_delta(g: np.ndarray, u: np.ndarray, static: np.ndarray, pinned) -> np.ndarray:
    """First-order KL change, per prompt, of the budget mask the scores ``g`` [N, L] choose at the
    static mask's budget, relative to the static mask, from the toggle labels ``u`` [N, L]: each
    kept layer it drops costs ``u``, each skipped layer it adds back gains ``u``. 0 = the static mask."""
    static = np.asarray(static, dtype=bool)
    keep = int(static.sum())
    out = np.empty(len(g))
    for i in range(len(g)):
        m = budget_mask(g[i], keep, pinned)
        out[i] = u[i][static & ~m].sum() - u[i][~static & m].sum()
    return out


def fit(fm: FirstModel, labels: LabelSet, cfg, pinned, steps: int, progress: bool = True, log_path=None,
        subset: Optional[np.ndarray] = None, static: Optional[np.ndarray] = None) -> dict:
    """Ranking fit on the labels (all prompts, or the indices in ``subset``). With ``static`` (the mask
    the labels toggle around), ``cfg.holdout`` of the prompts are held out and the routers of the step
    (0 = the importance prior) with the lowest held-out ``predicted_delta`` are kept: training moves
    away from the prior only where that helps on prompts it did not fit."""
    params = list(fm.routers.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.rank_lr, weight_decay=cfg.weight_decay)
    free = torch.ones(fm.n_layers, dtype=torch.bool)
    free[list(pinned)] = False
    rng = np.random.default_rng(cfg.seed)
    pool = np.arange(len(labels)) if subset is None else np.asarray(subset)
    held = np.array([], dtype=np.int64)
    if static is not None and cfg.holdout > 0 and len(pool) >= 10:
        perm = rng.permutation(pool)
        nh = max(2, int(round(cfg.holdout * len(pool))))
        held, pool = np.sort(perm[:nh]), np.sort(perm[nh:])
    n = len(pool)
    if n == 0:
        raise FirstEdgeError("no labelled prompts to fit the routers on")
    hb = labels.batch(held) if len(held) else None

    def held_score() -> float:
        with torch.no_grad():
            g = pooled_scores(fm, hb["hidden"], hb["pmask"]).numpy()
        return float(predicted_delta(g, hb["u"].numpy(), static, pinned).mean())

    best = (held_score(), 0, {k: v.detach().clone() for k, v in fm.routers.state_dict().items()}) if hb else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="fitting routers", unit="step", file=sys.stderr, dynamic_ncols=True)
    last = {}
    order = rng.permutation(n)
    pos = 0
    for step in range(1, steps + 1):
        if pos + cfg.batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = pool[order[pos:pos + cfg.batch_size]]
        pos += cfg.batch_size
        b = labels.batch(idx)
        g = pooled_scores(fm, b["hidden"], b["pmask"]).clamp(1e-6, 1 - 1e-6)
        z = torch.log(g) - torch.log1p(-g)
        loss = rank_loss(z, b["u"], free, cfg.rank_cap, cfg.rank_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = {"step": step, "phase": "rank", "loss": float(loss.detach())}
        if hb is not None and (step % cfg.eval_every == 0 or step == steps):
            h = held_score()
            last["held_out_delta_kl"] = h
            if h < best[0]:
                best = (h, step, {k: v.detach().clone() for k, v in fm.routers.state_dict().items()})
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(last) + "\n")
        if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    if best is not None:
        fm.routers.load_state_dict(best[2])
        last = dict(last, kept_step=best[1], held_out_delta_kl=best[0], held_out_prompts=int(len(held)))
    for p in params:
        p.requires_grad_(False)
    return last


# ------------------------------------------------------------------ calibrate
def calibrate(fm: FirstModel, prompts: List[List[int]], eos, n_new: int, bf16, ks=CALIB_KS, progress=True) -> dict:
    """Thresholds at which the routers skip k layers on average over ``prompts`` (mean over prompts),
    with the measured mean KL and top-1 agreement there, and budget mode's KL at the same k."""
    scorer = Scorer(fm, bf16=None if bf16 else False)
    L = fm.n_layers
    states = []
    it = prompts
    if progress:
        from tqdm import tqdm

        it = tqdm(prompts, desc="calibrating thresholds", unit="prompt", file=sys.stderr, dynamic_ncols=True)
    for ids in it:
        states.append(scorer.prepare(ids, n_new, eos))
    all_scores = np.stack([s.scores for s in states])  # [N, L]

    def mean_skipped(t):
        return float(np.mean([L - threshold_mask(g, t, fm.pinned).sum() for g in all_scores]))

    cands = np.unique(np.concatenate([all_scores.ravel(), [0.0, 1.0]]).astype(np.float32))
    table = []
    for k in ks:
        if k > L - len(fm.pinned) - 1:
            continue
        # the largest candidate threshold whose mean skip is <= k: masks change only at score values
        best = None
        for t in cands:
            if mean_skipped(t) <= k + 1e-9:
                best = float(t)
        if best is None:
            continue
        kl, ag, kb = [], [], []
        for s in states:
            m = threshold_mask(s.scores, best, fm.pinned)
            mb = budget_mask(s.scores, L - k, fm.pinned)
            kk, aa = scorer.kl(s, np.stack([m, mb]))
            kl.append(kk[0])
            ag.append(aa[0])
            kb.append(kk[1])
        table.append({"threshold": best, "target_skipped": k, "mean_skipped": mean_skipped(best),
                      "kl": float(np.mean(kl)), "top1": float(np.mean(ag)), "budget_kl": float(np.mean(kb))})
    return {"points": table, "prompts": len(prompts), "continuation_tokens": n_new}


def choose_default(calib: dict, k: int, fallback: float) -> float:
    pts = calib.get("points") or []
    if not pts:
        return fallback
    return float(min(pts, key=lambda p: (abs(p["mean_skipped"] - k), -p["mean_skipped"]))["threshold"])


# ------------------------------------------------------------------ the driver
def labels_key(cfg, fm: FirstModel, data_dir, tasks) -> str:
    import hashlib

    keyed = {k: getattr(cfg, k) for k in ("per_task", "max_prompt_tokens", "max_completion_tokens", "seed", "bf16",
                                           "calib_per_task", "pin_nats", "label_k", "target_keep")}
    keyed.update(data=str(Path(data_dir).resolve()), tasks=list(tasks), base=fm.identity(), pool_start=fm.pool_start,
                 format=LABELS_FORMAT)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def train_rank(model, data_dir, out, cfg, tasks=None, resume: bool = False, progress: bool = True,
               verbose: bool = True, fm: Optional[FirstModel] = None, tok=None) -> dict:
    """The rank recipe end to end (module doc); returns the summary written into routers.json."""
    from dataclasses import asdict

    from .data import Encoder, end_of_turn_id, load_split, mix_tasks, resolve_tasks
    from .finetune import open_run
    from .reference import eos_ids

    t_start = time.time()
    log = (lambda s: print(s, file=sys.stderr)) if verbose else (lambda s: None)
    out = Path(out)
    tasks = resolve_tasks(data_dir, tasks)
    labels = LabelSet(out / "labels")
    # -- prepare
    fm, tok = open_run(out, resume, labels.folder / "meta.json", "measured labels", model, cfg.seed, fm, tok, verbose)
    fm.eval()
    end = end_of_turn_id(tok, fm.cfg)
    eos = eos_ids(tok, fm.cfg)
    encoder = Encoder(tok, end, cfg.max_prompt_tokens, cfg.max_completion_tokens)
    fm.pool_start = len(encoder.pre_ids)
    recs = mix_tasks(load_split(data_dir, "train", tasks), cfg.per_task or None, seed=cfg.seed)
    encoded = [encoder(r) for r in recs]
    if not encoded:
        raise FirstEdgeError(f"no usable training records in {data_dir}")
    key = labels_key(cfg, fm, data_dir, tasks)
    # -- measure (cached)
    if labels.complete(key):
        labels.open()
        meta = labels.meta
        log(f"[finetune] reusing the measured labels in {labels.folder} ({len(labels)} prompts)")
    else:
        if resume:
            raise FirstEdgeError(f"{labels.folder} was measured for other data or settings; start a new --out")
        fm.set_pinned([])
        m = measure(fm, encoded, tasks, cfg, eos, progress=progress, log=log)
        meta = {"prior": m["prior"].tolist(), "pinned": m["pinned"], "order": [int(x) for x in m["order"]],
                "label_k": m["label_k"], "static": [bool(x) for x in m["static"]], "measure_s": round(m["measure_s"], 1),
                "calib_prompts": int(len(m["costs"])), "costs": np.round(m["costs"], 4).tolist(),
                "calib_tasks": m["calib_tasks"], "pin_nats": cfg.pin_nats}
        labels.write(key, meta, m["states"], m["u"], m["k0"], m["tasks"])
        labels.open()
        meta = labels.meta
    measure_s = meta["measure_s"]
    fm.set_pinned(meta["pinned"])
    # -- init and fit
    init_from_importance(fm, meta["order"])
    log_path = out / "train_log.jsonl"
    if log_path.exists():
        log_path.unlink()
    t_fit = time.time()
    last = fit(fm, labels, cfg, meta["pinned"], cfg.rank_steps, progress=progress, log_path=log_path,
               static=np.array(meta["static"], dtype=bool))
    fit_s = time.time() - t_fit
    # -- calibrate thresholds on a spread sample of the val split
    t_cal = time.time()
    val = load_split(data_dir, "val", tasks)
    vprompts = [encoder.prompt(r.prompt) for t in sorted(val)
                for r in spread_sample(val[t], cfg.val_calib_per_task, seed=cfg.seed)]
    calib = calibrate(fm, vprompts, eos, cfg.max_completion_tokens, cfg.bf16, progress=progress)
    fm.threshold = choose_default(calib, meta["label_k"], fm.threshold)
    cal_s = time.time() - t_cal
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    summary = {"recipe": "rank", "steps": cfg.rank_steps, "final": last, "measure_s": measure_s,
               "fit_s": round(fit_s, 1), "calibrate_s": round(cal_s, 1), "total_s": round(time.time() - t_start, 1),
               "cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "threads": torch.get_num_threads(),
               "examples": len(labels), "tasks": tasks, "data": str(data_dir), "config": asdict(cfg)}
    extra = {"recipe": "rank", "lora": False, "model_dir": str(Path(model).resolve()) if model else None,
             "importance": {"kl_skip_one": [round(x, 5) for x in meta["prior"]], "order": meta["order"],
                            "prompts": meta["calib_prompts"], "label_k": meta["label_k"],
                            "static_mask_skips": [i for i, k in enumerate(meta["static"]) if not k]},
             "calibration": calib, "train": summary}
    fm.save_routers(out, extra=extra)
    pts = ", ".join(f"{p['threshold']:.4f}: {p['mean_skipped']:.1f} skipped, KL {p['kl']:.3f}" for p in calib["points"])
    log(f"[finetune] wrote {out}/routers.safetensors in {summary['total_s']:.0f} s (measure {measure_s:.0f} s, "
        f"fit {fit_s:.0f} s, calibrate {cal_s:.0f} s); default threshold {fm.threshold:.4f}; calibration: {pts}")
    return summary
