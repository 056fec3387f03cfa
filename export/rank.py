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
   - for every training prompt, with ``task_weight`` below 1 only, the **toggle labels** ``u[l]``
     (``export.importance.toggle_labels``):
     what removing kept layer l from S costs, or what adding skipped layer l gains, in KL nats
     per token on that prompt's continuation; and the routers' inputs (the pooled prompt hidden
     states entering each layer).
3. **init**: routers whose score is a constant ramp in importance order (``fc2.weight = 0``), so budget
   mode reproduces the static importance mask exactly before any training, and threshold 0.5 keeps
   every layer;
4. **fit**: a pairwise ranking loss per prompt on the router logits: for layers i, j with
   ``u_i > u_j``, ``min(u_i - u_j, cap) * softplus(-(z_i - z_j) / temperature)``, averaged per prompt;
   weight decay keeps the routers near the prior where the labels do not agree;
   With ``task_weight`` > 0 (``--task-weight``; default 1: task targets only) the fit ranks by **task
   targets**: per task, a greedy skip order measured on ``task_prompts`` training prompts of that task
   (``task_targets``); the routers must recognise the task from the prompt to follow them; with task
   targets, the **level term** (``--level-weight``, ``level_loss``) also fits each score to ``u / (u +
   level_budget)``, so a threshold is a per-token KL budget that follows each task's cost;
5. **calibrate**: on a spread sample of the val split, the thresholds at which the routers skip 3, 6,
   9 and 12 layers on average, with the measured KL; the default threshold is 0.5 with the level term
   (measured as one more point), else the point nearest ``label_k`` skipped layers. Stored in
   ``routers.json`` (and the bundle manifest).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from runtime.errors import FirstEdgeError
from runtime.masks import budget_mask, threshold_mask

from .importance import (PromptState, Scorer, greedy_order, importance_order, single_skip_costs, spread_sample,
                         static_mask, toggle_labels)
from .model import FirstModel

LABELS_FORMAT = 1
INIT_LO, INIT_HI = 2.0, 4.0   # router logits of the least and most important layer at initialisation
CALIB_KS = (3, 6, 9, 12)
TASK_TARGETS = "task_targets.json"
LEVEL_THRESHOLD = 0.5  # the default threshold of routers fitted with the level term: --level-budget nats a token


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
    inputs (memory-mapped [sum P, L, D] bf16 bits).

    Data parallel (``export.distributed``): rank r of W measures the prompts ``i % W == r`` and writes their
    router inputs in ``part-<r>-of-<W>/hidden.bin``; rank 0 writes the labels of every prompt
    (``labels.npz``, with the part and offset of each prompt's router inputs) and ``meta.json``. Any number
    of processes reads them back; a part's file is memory-mapped when a prompt of it is read."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._arrs = {}

    def complete(self, key: str) -> bool:
        m = self.folder / "meta.json"
        try:
            meta = json.loads(m.read_text())
        except (OSError, ValueError):
            return False
        return (meta.get("key") == key and meta.get("complete") is True and meta.get("format") == LABELS_FORMAT
                and all((self.folder / p / "hidden.bin").exists() for p in meta.get("parts", [])))

    def write(self, key: str, meta: dict, states: List[PromptState], u: np.ndarray, k0: np.ndarray, tasks: List[str],
              indices: Optional[List[int]] = None, L: Optional[int] = None, D: Optional[int] = None, dist=None):
        """Write this process's prompts (``indices``: their places in the run's prompt list, default 0..n-1);
        with several processes every rank calls this and rank 0 gathers the labels."""
        from .distributed import current

        dist = dist or current()
        indices = list(range(len(states))) if indices is None else [int(i) for i in indices]
        L = L or len(states[0].hidden)
        D = D or states[0].hidden[0].shape[-1]
        part = f"part-{dist.rank}-of-{dist.world}"
        pdir = self.folder / part
        pdir.mkdir(parents=True, exist_ok=True)
        lens = [int(s.hidden[0].shape[0]) for s in states]
        arr = np.memmap(pdir / "hidden.bin", dtype=np.int16, mode="w+", shape=(max(sum(lens), 1), L, D))
        off = 0
        mine = {}
        for j, (s, n) in enumerate(zip(states, lens)):
            blk = torch.stack([h.to(torch.bfloat16) for h in s.hidden], 1)  # [P, L, D]
            arr[off:off + n] = blk.view(torch.int16).numpy()
            mine[indices[j]] = (np.asarray(u[j], dtype=np.float32), float(k0[j]), n, str(tasks[j]), part, off)
            off += n
        arr.flush()
        del arr
        (pdir / "tokens.json").write_text(json.dumps({"tokens": max(sum(lens), 1)}))
        allp = dist.merge(mine)
        parts = dist.gather(part)
        if dist.main:
            rec = list(allp.values())
            np.savez(self.folder / "labels.npz", u=np.stack([r[0] for r in rec]), k0=np.array([r[1] for r in rec]),
                     lens=np.array([r[2] for r in rec]), tasks=np.array([r[3] for r in rec]),
                     parts=np.array([r[4] for r in rec]), offs=np.array([r[5] for r in rec], dtype=np.int64))
            meta = dict(meta, format=LABELS_FORMAT, key=key, tokens=int(sum(r[2] for r in rec)), L=L, D=D,
                        parts=parts, world_size=dist.world, complete=True)
            tmp = self.folder / "meta.json.tmp"
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, self.folder / "meta.json")
            from .finetune import _remove_stale_parts

            _remove_stale_parts(self.folder, parts)
        dist.barrier()

    def open(self):
        self.meta = json.loads((self.folder / "meta.json").read_text())
        z = np.load(self.folder / "labels.npz")
        self.u, self.k0, self.lens, self.tasks = z["u"], z["k0"], z["lens"], list(z["tasks"])
        if "parts" in z:
            self.parts, self.offs = [str(p) for p in z["parts"]], z["offs"].astype(np.int64)
        else:  # one hidden.bin beside labels.npz (written before the parts)
            self.parts = [""] * len(self.lens)
            self.offs = np.concatenate([[0], np.cumsum(self.lens)[:-1]]).astype(np.int64)
        self._arrs = {}
        return self

    def _arr(self, part: str) -> np.memmap:
        if part not in self._arrs:
            L, D = self.meta["L"], self.meta["D"]
            f = self.folder / part / "hidden.bin"
            if part:
                tokens = json.loads((self.folder / part / "tokens.json").read_text())["tokens"]
            else:
                tokens = self.meta["tokens"]
            self._arrs[part] = np.memmap(f, dtype=np.int16, mode="r", shape=(tokens, L, D))
        return self._arrs[part]

    def __len__(self):
        return len(self.u)

    def batch(self, idx, device=None) -> dict:
        P = int(max(self.lens[i] for i in idx))
        L, D = self.meta["L"], self.meta["D"]
        h = torch.zeros(len(idx), P, L, D, dtype=torch.float32)
        pm = torch.zeros(len(idx), P, dtype=torch.bool)
        for j, i in enumerate(idx):
            n, o = int(self.lens[i]), int(self.offs[i])
            h[j, :n] = torch.from_numpy(np.array(self._arr(self.parts[i])[o:o + n])).view(torch.bfloat16).float()
            pm[j, :n] = True
        out = {"hidden": h, "pmask": pm, "u": torch.from_numpy(self.u[list(idx)]).float()}
        if device is not None and torch.device(device).type != "cpu":
            out = {k: v.to(device) for k, v in out.items()}
        return out


def pooled_scores(fm: FirstModel, hidden: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
    """g [B, L] from pooled router inputs hidden [B, P, L, D] (pmask marks the pooled positions)."""
    w = pmask.float()
    den = w.sum(1).clamp_min(1.0)
    return torch.stack([(fm.router_probs(l, hidden[:, :, l]) * w).sum(1) / den for l in range(fm.n_layers)], 1)


def measure(fm: FirstModel, encoded, tasks: List[str], cfg, eos, progress: bool = True, log=print, dist=None,
            scorer: Optional[Scorer] = None, toggles: bool = True) -> dict:
    """Importance prior, pinned layers, static mask, and per-prompt labels with router inputs.
    Data parallel: each rank measures its share of the calibration prompts (the costs are gathered, so
    every rank derives the same prior, pins and static mask) and the labels of its share of the
    prompts (``indices``); one process measures everything. ``toggles=False`` (``--task-weight 1``, whose
    fit reads only the task targets): the router inputs alone (one prefill a prompt), the labels zero."""
    from .distributed import current

    dist = dist or current()
    scorer = scorer or Scorer(fm, bf16=None if cfg.bf16 else False)
    L = fm.n_layers
    n_new = cfg.max_completion_tokens
    by_task: Dict[str, List[int]] = {}
    for i, e in enumerate(encoded):
        by_task.setdefault(e.record.task, []).append(i)
    calib_idx = [i for t in sorted(by_task) for i in by_task[t][:cfg.calib_per_task]]
    my_calib = dist.mine(calib_idx)
    mine = dist.mine(range(len(encoded)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(my_calib) + len(mine), desc="measuring layer importance", unit="prompt",
                   file=sys.stderr, dynamic_ncols=True)
    t0 = time.time()
    states: Dict[int, PromptState] = {}
    my_costs = {}
    for i in my_calib:
        ps = scorer.prepare(encoded[i].prompt_ids, n_new, eos, keep_hidden=True)
        states[i] = ps
        my_costs[i] = single_skip_costs(scorer, ps)
        if bar is not None:
            bar.update(1)
    all_costs = dist.merge(my_costs)
    costs = np.array([all_costs[i] for i in calib_idx])
    prior, pinned, order = prior_from_costs(costs, cfg.pin_nats)
    k = label_k(cfg, L, len(pinned))
    S = static_mask(order, k, L)
    log(f"[finetune] importance prior from {len(calib_idx)} prompts ({time.time() - t0:.0f} s); pinned {pinned}; "
        f"static mask skips {sorted(int(x) for x in np.flatnonzero(~S))}")
    us, k0s, kept_states = [], [], []
    for i in mine:
        ps = states.get(i) or scorer.prepare(encoded[i].prompt_ids, n_new if toggles else 1, eos, keep_hidden=True)
        u, k0 = toggle_labels(scorer, ps, S) if toggles else (np.zeros(L, dtype=np.float32), 0.0)
        if i not in states:
            ps.kv = None  # only the router inputs are kept (the calibration prompts' states go to the task targets)
        us.append(u)
        k0s.append(k0)
        kept_states.append(ps)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"prior": prior, "costs": costs, "calib_tasks": [encoded[i].record.task for i in calib_idx],
            "pinned": pinned, "order": order, "static": S, "label_k": k,
            "u": np.array(us, dtype=np.float32).reshape(len(mine), L), "k0": np.array(k0s, dtype=np.float32),
            "states": kept_states, "indices": mine, "measure_s": time.time() - t0, "calib_states": states,
            "tasks": [encoded[i].record.task for i in mine]}


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


# ------------------------------------------------------------------ task targets
def task_targets(scorer: Scorer, states: Dict[str, List[PromptState]], k_max: int, pinned, dist=None,
                 prune: Optional[int] = None, tokens: Optional[int] = None) -> dict:
    """Per task, the greedy skip order on that task's calibration prompts (each step skips the layer that
    raises the task's mean KL least; after the first step only the ``prune`` cheapest single skips stay
    candidates) and ranking labels from it [L]: the layer skipped at step s gets the mean KL after step s
    (made non-decreasing along the order); a candidate never skipped, the KL of skipping it at the last
    step (at least the last step's); a pruned layer, the last step's KL plus its single-skip KL; a pinned
    layer more than any. Higher = more important. ``tokens``: score only the first ``tokens`` positions of
    each continuation (the greedy runs one batch of masks per prompt and step; half the positions, half the
    time).
    ``states``: {task: this process's prompt states of it}; with several processes each rank scores its
    own and the sums are gathered, so every rank follows the same greedy path."""
    from .distributed import current

    dist = dist or current()
    L = scorer.L
    out = {}
    for task in sorted(states):
        mine = states[task]

        def score(masks, mine=mine):
            local = (np.zeros(len(masks)) if not mine
                     else np.sum([scorer.kl(ps, masks, upto=tokens)[0] for ps in mine], 0))
            parts = dist.merge({dist.rank: (local, len(mine))})
            n = sum(c for _, c in parts.values())
            return sum(v for v, _ in parts.values()) / max(n, 1)

        g = greedy_order(score, L, k_max, pinned, prune=prune)
        u = np.full(L, np.nan)
        along = np.maximum.accumulate(np.asarray(g["score"], dtype=np.float64)) if g["order"] else np.zeros(0)
        u[g["order"]] = along
        floor = float(along[-1]) if len(along) else 0.0
        for l, v in g["first"].items():
            if l not in g["order"]:
                u[l] = floor + v
        for l, v in g["last"].items():
            u[l] = max(v, floor)
        top = float(np.nanmax(u)) if np.isfinite(u).any() else 0.0
        u[np.isnan(u)] = top + 1.0
        u[list(pinned)] = top + 1.0
        out[task] = {"order": g["order"], "kl": [round(x, 5) for x in g["score"]], "u": [round(float(x), 5) for x in u]}
    return out


# ------------------------------------------------------------------ fit
def rank_loss(z: torch.Tensor, u: torch.Tensor, free: torch.Tensor, cap: float, temperature: float,
              per_prompt: bool = False) -> torch.Tensor:
    """Pairwise ranking loss, averaged per prompt: z router logits [B, L], u labels [B, L], free [L]
    (False for pinned layers, which take no part). ``per_prompt``: the loss of each prompt [B]."""
    du = (u.unsqueeze(2) - u.unsqueeze(1)).clamp(min=0.0, max=cap)  # i more important than j
    pair = (free.view(1, -1, 1) & free.view(1, 1, -1)).float()
    w = du * pair
    dz = z.unsqueeze(2) - z.unsqueeze(1)
    per = (w * F.softplus(-dz / temperature)).sum((1, 2)) / w.sum((1, 2)).clamp_min(1e-8)
    return per if per_prompt else per.mean()


def level_targets(u: torch.Tensor, budget: float) -> torch.Tensor:
    """Router logits the level term aims at for task labels ``u`` (a task's mean KL per token after its
    greedy order has skipped up to that layer): ``log(u / budget)``, so the score ``sigmoid(z) = u / (u +
    budget)`` and threshold t skips exactly the layers whose ``u`` is below ``budget * t / (1 - t)``: a
    per-token KL budget that follows each task's cost (t = 0.5: ``budget`` nats)."""
    return torch.log(u.clamp_min(1e-3) / budget).clamp(-8.0, 8.0)


def level_loss(z: torch.Tensor, u: torch.Tensor, free: torch.Tensor, budget: float,
               per_prompt: bool = False) -> torch.Tensor:
    """Huber distance of the router logits z [B, L] from ``level_targets(u)`` over the free layers,
    averaged per prompt (``per_prompt``: [B])."""
    d = F.smooth_l1_loss(z, level_targets(u, budget), reduction="none", beta=1.0)
    per = (d * free.float().view(1, -1)).sum(1) / free.float().sum().clamp_min(1.0)
    return per if per_prompt else per.mean()


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
        subset: Optional[np.ndarray] = None, static: Optional[np.ndarray] = None, dist=None,
        task_u: Optional[Dict[str, np.ndarray]] = None, task_weight: float = 0.0, level_weight: float = 0.0,
        level_budget: float = 0.5) -> dict:
    """Ranking fit on the labels (all prompts, or the indices in ``subset``). With ``static`` (the mask
    the labels toggle around), ``cfg.holdout`` of the prompts are held out and the routers of the step
    (0 = the importance prior) with the lowest held-out ``predicted_delta`` are kept: training moves
    away from the prior only where that helps on prompts it did not fit.

    Data parallel: the batches and the held-out set are those of one process; each rank computes the
    prompts of them it owns (``i % world == rank``), the loss is the global mean (``Dist.globalize``) and
    the gradients are summed over ranks; rank 0 writes ``log_path``.

    ``task_u`` {task: labels [L]} (``task_targets``) with ``task_weight`` w > 0: the loss is
    ``(1 - w) * rank_loss(toggle labels) + w * rank_loss(the prompt's task labels)``, and the kept step is
    the one with the lowest held-out value of that loss (the toggle labels' first-order ``predicted_delta``
    does not score moves towards the task orders, which are far from the static mask).

    ``level_weight`` > 0 (with task targets) adds ``level_weight * level_loss``: the routers' score level,
    not only their order, follows the task labels, so a threshold skips more layers on cheap tasks and
    fewer on costly ones (``level_targets``)."""
    from .distributed import current

    dist = dist or current()
    params = list(fm.routers.parameters())
    dev = params[0].device
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.rank_lr, weight_decay=cfg.weight_decay)
    free = torch.ones(fm.n_layers, dtype=torch.bool)
    free[list(pinned)] = False
    free = free.to(dev)
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
    w_task = float(task_weight) if task_u else 0.0
    if not 0.0 <= w_task <= 1.0:
        raise FirstEdgeError(f"task weight {task_weight} must be in [0, 1]")
    w_level = float(level_weight) if task_u else 0.0
    if w_level < 0 or not level_budget > 0:
        raise FirstEdgeError(f"level weight {level_weight} must be >= 0 and level budget {level_budget} > 0")

    def task_labels(idx) -> torch.Tensor:
        missing = sorted({str(labels.tasks[i]) for i in idx} - set(task_u))
        if missing:
            raise FirstEdgeError(f"no task targets for task(s) {', '.join(missing)}")
        return torch.from_numpy(np.stack([np.asarray(task_u[str(labels.tasks[i])], dtype=np.float32)
                                          for i in idx])).to(dev)

    def objective(b, ut, per_prompt):
        g = pooled_scores(fm, b["hidden"], b["pmask"]).clamp(1e-6, 1 - 1e-6)
        z = torch.log(g) - torch.log1p(-g)
        loss = 0.0
        if w_task < 1.0:
            loss = (1.0 - w_task) * rank_loss(z, b["u"], free, cfg.rank_cap, cfg.rank_temperature, per_prompt)
        if w_task > 0.0:
            loss = loss + w_task * rank_loss(z, ut, free, cfg.rank_cap, cfg.rank_temperature, per_prompt)
        if w_level > 0.0:
            loss = loss + w_level * level_loss(z, ut, free, level_budget, per_prompt)
        return loss

    my_held = dist.mine(held)
    hb = labels.batch(my_held, device=dev) if my_held else None
    uses_task = w_task > 0 or w_level > 0
    hu = task_labels(my_held) if (my_held and uses_task) else None

    def held_score() -> float:
        part = {}
        if hb is not None:
            with torch.no_grad():
                if uses_task:
                    vals = objective(hb, hu, True).cpu().numpy()
                else:
                    g = pooled_scores(fm, hb["hidden"], hb["pmask"]).cpu().numpy()
                    vals = predicted_delta(g, hb["u"].cpu().numpy(), static, pinned)
            part = dict(zip(my_held, vals))
        return float(np.mean(list(dist.merge(part).values())))

    def snapshot():
        return {k: v.detach().clone() for k, v in fm.routers.state_dict().items()}

    best = (held_score(), 0, snapshot()) if len(held) else None
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
        mine = dist.mine(idx)
        opt.zero_grad(set_to_none=True)
        if mine:
            b = labels.batch(mine, device=dev)
            local = objective(b, task_labels(mine) if uses_task else None, True).sum()
        else:
            local = torch.zeros((), device=dev)
        loss = dist.globalize(local) / len(idx)
        if loss.requires_grad:
            loss.backward()
        dist.reduce_grads(params)
        opt.step()
        last = {"step": step, "phase": "rank", "loss": float(loss.detach())}
        if best is not None and (step % cfg.eval_every == 0 or step == steps):
            h = held_score()
            last["held_out_loss" if uses_task else "held_out_delta_kl"] = h
            if h < best[0]:
                best = (h, step, snapshot())
        if log_path is not None and dist.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(last) + "\n")
        if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    if best is not None:
        fm.routers.load_state_dict(best[2])
        key = "held_out_loss" if uses_task else "held_out_delta_kl"
        last = dict(last, kept_step=best[1], held_out_prompts=int(len(held)))
        last[key] = best[0]
    for p in params:
        p.requires_grad_(False)
    return last


# ------------------------------------------------------------------ calibrate
def calibrate(fm: FirstModel, prompts: List[List[int]], eos, n_new: int, bf16, ks=CALIB_KS, progress=True,
              dist=None, work: Optional[FirstModel] = None, thresholds=()) -> dict:
    """Thresholds at which the routers skip k layers on average over ``prompts`` (mean over prompts),
    with the measured mean KL and top-1 agreement there, and budget mode's KL at the same k; also the
    points of the given ``thresholds`` (``target_skipped`` None; budget mode at their rounded mean skip).
    Data parallel: each rank scores its share of the prompts; scores and KLs are gathered."""
    from .distributed import current

    dist = dist or current()
    scorer = Scorer(fm, bf16=None if bf16 else False) if work is None else Scorer(fm, work=work)
    L = fm.n_layers
    mine = dist.mine(range(len(prompts)))
    it = mine
    if progress:
        from tqdm import tqdm

        it = tqdm(mine, desc="calibrating thresholds", unit="prompt", file=sys.stderr, dynamic_ncols=True)
    states = {j: scorer.prepare(prompts[j], n_new, eos) for j in it}
    all_scores = np.stack(list(dist.merge({j: s.scores for j, s in states.items()}).values()))  # [N, L]

    def mean_skipped(t):
        return float(np.mean([L - threshold_mask(g, t, fm.pinned).sum() for g in all_scores]))

    cands = np.unique(np.concatenate([all_scores.ravel(), [0.0, 1.0]]).astype(np.float32))
    chosen = []
    for k in ks:
        if k > L - len(fm.pinned) - 1:
            continue
        # the largest candidate threshold whose mean skip is <= k: masks change only at score values
        best = None
        for t in cands:
            if mean_skipped(t) <= k + 1e-9:
                best = float(t)
        if best is not None:
            chosen.append((k, best))
    chosen += [(None, float(t)) for t in thresholds if all(abs(float(t) - c) > 1e-9 for _, c in chosen)]
    chosen.sort(key=lambda kt: kt[1])
    budget_k = [k if k is not None else min(int(round(mean_skipped(t))), L - len(fm.pinned) - 1) for k, t in chosen]
    part = {}
    for j, s in states.items():
        rows = [m for (k, t), bk in zip(chosen, budget_k)
                for m in (threshold_mask(s.scores, t, fm.pinned), budget_mask(s.scores, L - bk, fm.pinned))]
        part[j] = scorer.kl(s, np.stack(rows)) if rows else (np.zeros(0), np.zeros(0))
    res = list(dist.merge(part).values())
    table = []
    for c, (k, best) in enumerate(chosen):
        table.append({"threshold": best, "target_skipped": k, "mean_skipped": mean_skipped(best), "budget_k": budget_k[c],
                      "kl": float(np.mean([r[0][2 * c] for r in res])),
                      "top1": float(np.mean([r[1][2 * c] for r in res])),
                      "budget_kl": float(np.mean([r[0][2 * c + 1] for r in res]))})
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
    if getattr(cfg, "dtype", None) == "fp16":
        keyed["dtype"] = "fp16"
    keyed.update(data=str(Path(data_dir).resolve()), tasks=list(tasks), base=fm.identity(), pool_start=fm.pool_start,
                 format=LABELS_FORMAT)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def load_task_targets(folder: Path, key: str, cfg, fm: FirstModel, encoded, eos, pinned, work, log, dist,
                      reuse: Optional[Dict[int, PromptState]] = None) -> dict:
    """``task_targets`` on the first ``task_prompts`` (default ``calib_per_task``: the importance prior's)
    training prompts of each task, cached in ``<labels>/task_targets.json`` for the labels' key, ``task_k``,
    the prompt count and the scored tokens. ``reuse`` {prompt index: state}: prompt states this process
    already prepared (the measure phase's calibration prompts), not prepared again."""
    L = fm.n_layers
    n_prompts = int(cfg.task_prompts or cfg.calib_per_task)
    k_max = int(cfg.task_k or label_k(cfg, L, len(pinned)))
    k_max = max(1, min(k_max, L - len(pinned) - 1))
    prune = 2 * k_max
    tokens = int(cfg.task_tokens or cfg.max_completion_tokens)
    f = Path(folder) / TASK_TARGETS
    try:
        got = json.loads(f.read_text())
        if (got.get("key") == key and got.get("k_max") == k_max and got.get("prune") == prune
                and got.get("tokens") == tokens and got.get("pinned") == list(pinned)
                and got.get("prompts_per_task") == n_prompts):
            log(f"[finetune] reusing the task targets in {f}")
            return got
    except (OSError, ValueError):
        pass
    by_task: Dict[str, List[int]] = {}
    for i, e in enumerate(encoded):
        by_task.setdefault(e.record.task, []).append(i)
    calib = [(t, i) for t in sorted(by_task) for i in by_task[t][:n_prompts]]
    scorer = Scorer(fm, work=work)
    t0 = time.time()
    states: Dict[str, List[PromptState]] = {t: [] for t in by_task}
    for g in dist.mine(range(len(calib))):
        t, i = calib[g]
        states[t].append((reuse or {}).get(i) or scorer.prepare(encoded[i].prompt_ids, cfg.max_completion_tokens, eos))
    tasks = task_targets(scorer, states, k_max, pinned, dist=dist, prune=prune, tokens=tokens)
    got = {"key": key, "k_max": k_max, "prune": prune, "tokens": tokens, "pinned": list(pinned),
           "prompts_per_task": n_prompts, "seconds": round(time.time() - t0, 1), "tasks": tasks}
    if dist.main:
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(got, indent=1))
        os.replace(tmp, f)
    dist.barrier()
    log(f"[finetune] task targets: greedy orders up to {k_max} skipped layers on {n_prompts} prompts a task "
        f"({got['seconds']:.0f} s): " + "; ".join(f"{t} {v['order'][:6]}" for t, v in tasks.items()))
    return got


def train_rank(model, data_dir, out, cfg, tasks=None, resume: bool = False, progress: bool = True,
               verbose: bool = True, fm: Optional[FirstModel] = None, tok=None) -> dict:
    """The rank recipe end to end (module doc); returns the summary written into routers.json.
    Under torchrun every process runs it: measuring, fitting and calibrating are split over the
    processes by prompt (``export.distributed``); rank 0 writes the run folder."""
    from dataclasses import asdict

    from . import distributed
    from .data import Encoder, end_of_turn_id, load_split, mix_tasks, resolve_tasks
    from .finetune import _cpu_seconds, distributed_record, open_run
    from .reference import eos_ids

    dist = distributed.current()
    t_start = time.time()
    log = (lambda s: print(s, file=sys.stderr)) if verbose else (lambda s: None)
    out = Path(out)
    w_task = float(cfg.task_weight)
    if not 0.0 <= w_task <= 1.0:
        raise FirstEdgeError(f"--task-weight {w_task:g} must be between 0 and 1")
    if cfg.level_weight < 0 or not cfg.level_budget > 0:
        raise FirstEdgeError(f"--level-weight {cfg.level_weight:g} must be >= 0 and --level-budget "
                             f"{cfg.level_budget:g} above 0")
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
    dtype = getattr(cfg, "dtype", None)
    if dtype not in distributed.DTYPES:
        dtype = "bf16" if cfg.bf16 else "fp32"
    work = distributed.working_copy(fm, dtype, dist.device)  # routers shared with fm, on the device
    # -- measure (cached); with --task-weight 1 the fit reads no toggle labels, so they are not measured
    toggles = w_task < 1.0
    calib_states: Dict[int, PromptState] = {}
    measured = labels.complete(key)
    if measured:
        labels.open()
    # labels measured for --task-weight 1 hold no toggle labels ("toggles": false in their meta.json)
    if measured and (not toggles or labels.meta.get("toggles", True)):
        meta = labels.meta
        log(f"[finetune] reusing the measured labels in {labels.folder} ({len(labels)} prompts)")
    else:
        if resume:
            if measured:
                raise FirstEdgeError(f"{labels.folder} holds no toggle labels (measured for --task-weight 1); "
                                     f"--task-weight {w_task:g} needs them: start a new --out")
            raise FirstEdgeError(f"{labels.folder} was measured for other data or settings; start a new --out")
        fm.set_pinned([])
        m = measure(fm, encoded, tasks, cfg, eos, progress=progress, log=log, dist=dist, scorer=Scorer(fm, work=work),
                    toggles=toggles)
        meta = {"toggles": toggles, "prior": m["prior"].tolist(), "pinned": m["pinned"],
                "order": [int(x) for x in m["order"]],
                "label_k": m["label_k"], "static": [bool(x) for x in m["static"]], "measure_s": round(m["measure_s"], 1),
                "calib_prompts": int(len(m["costs"])), "costs": np.round(m["costs"], 4).tolist(),
                "calib_tasks": m["calib_tasks"], "pin_nats": cfg.pin_nats}
        dist.barrier()  # no rank reads an old meta.json while rank 0 replaces it
        calib_states = m["calib_states"]
        labels.write(key, meta, m["states"], m["u"], m["k0"], m["tasks"], indices=m["indices"], L=fm.n_layers,
                     D=fm.hidden_size, dist=dist)
        del m  # the router inputs are on disk now
        labels.open()
        meta = labels.meta
    measure_s = meta["measure_s"]
    fm.set_pinned(meta["pinned"])
    # -- task targets (cached beside the labels)
    targets, targets_s = None, 0.0
    if w_task > 0:
        t_tt = time.time()
        targets = load_task_targets(labels.folder, key, cfg, fm, encoded, eos, meta["pinned"], work, log, dist,
                                    reuse=calib_states)
        targets_s = time.time() - t_tt
    calib_states = {}
    # -- init and fit
    init_from_importance(fm, meta["order"])
    log_path = out / "train_log.jsonl"
    if log_path.exists() and dist.main:
        log_path.unlink()
    t_fit = time.time()
    last = fit(fm, labels, cfg, meta["pinned"], cfg.rank_steps, progress=progress, log_path=log_path,
               static=np.array(meta["static"], dtype=bool), dist=dist,
               task_u={t: np.array(v["u"]) for t, v in targets["tasks"].items()} if targets else None,
               task_weight=w_task, level_weight=cfg.level_weight, level_budget=cfg.level_budget)
    fit_s = time.time() - t_fit
    # -- calibrate thresholds on a spread sample of the val split
    t_cal = time.time()
    val = load_split(data_dir, "val", tasks)
    vprompts = [encoder.prompt(r.prompt) for t in sorted(val)
                for r in spread_sample(val[t], cfg.val_calib_per_task, seed=cfg.seed)]
    level = bool(targets) and cfg.level_weight > 0
    calib = calibrate(fm, vprompts, eos, cfg.max_completion_tokens, cfg.bf16, progress=progress, dist=dist, work=work,
                      thresholds=[LEVEL_THRESHOLD] if level else ())
    # with the level term, score 0.5 stands for a per-token KL of --level-budget on every task (level_targets);
    # without it the scores carry only an order, and the default is the calibrated point nearest label_k
    fm.threshold = LEVEL_THRESHOLD if level else choose_default(calib, meta["label_k"], fm.threshold)
    cal_s = time.time() - t_cal
    cpu = dist.gather(round(_cpu_seconds(), 1))
    summary = {"recipe": "rank", "steps": cfg.rank_steps, "final": last, "measure_s": measure_s,
               "task_weight": w_task, "level_weight": cfg.level_weight if level else 0.0,
               "level_budget": cfg.level_budget, "task_targets_s": round(targets_s, 1),
               "fit_s": round(fit_s, 1), "calibrate_s": round(cal_s, 1), "total_s": round(time.time() - t_start, 1),
               "cpu_s": round(sum(cpu), 1), "cpu_s_per_rank": cpu, "threads": torch.get_num_threads(),
               "examples": len(labels), "tasks": tasks, "data": str(data_dir), "config": asdict(cfg),
               "distributed": distributed_record(dist, cfg, len(labels), cfg.batch_size)}
    extra = {"recipe": "rank", "lora": False, "model_dir": str(Path(model).resolve()) if model else None,
             "importance": {"kl_skip_one": [round(x, 5) for x in meta["prior"]], "order": meta["order"],
                            "prompts": meta["calib_prompts"], "label_k": meta["label_k"],
                            "static_mask_skips": [i for i, k in enumerate(meta["static"]) if not k],
                            "task_orders": {t: v["order"] for t, v in targets["tasks"].items()} if targets else None},
             "calibration": calib, "train": summary}
    fm.routers.to("cpu")
    if dist.main:
        fm.save_routers(out, extra=extra)
    dist.barrier()
    pts = ", ".join(f"{p['threshold']:.4f}: {p['mean_skipped']:.1f} skipped, KL {p['kl']:.3f}" for p in calib["points"])
    log(f"[finetune] wrote {out}/routers.safetensors in {summary['total_s']:.0f} s (measure {measure_s:.0f} s, "
        f"fit {fit_s:.0f} s, calibrate {cal_s:.0f} s); default threshold {fm.threshold:.4f}; calibration: {pts}")
    return summary
