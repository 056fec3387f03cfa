"""Router finetuning (FiRST): frozen base model, routers trained through the mixed forward.

    python -m export.finetune --data DIR --out runs/NAME [--model DIR] [--preset quick|full] [--lora]
                              [--tasks qa,translate,...] [--resume]

Recipe (DESIGN.md section 1; docs/finetuning.md):
- loss = ce * cross-entropy of the completion tokens
       + kd * distillation toward the base model's own next-token distribution (top-k, cached)
       + latency: lam * relu(mean gate - target_keep)  (or lam * mean gate with --no-target-keep);
- phase "soft": gate[l] = g[l] (the prompt-mean router score); phase "hard": gate[l] = 1[g[l] >= tau]
  with a straight-through estimator, so training sees what inference does;
- optional phase "lora" (--lora): peft LoRA adapters on the attention/MLP projections trained
  together with the routers (full mixed forward, since LoRA changes the prompt path too).

Speed on CPU: the base is frozen, so the prompt's hidden states and K/V at every layer do not depend
on the routers. They are computed once per example (bf16, memory-mapped under ``<out>/cache``) with
the base model's top-k next-token distribution at the completion positions; the router phases then
run only the completion tokens, which attend to the cached prompt K/V at every layer, exactly as in
the generator's decode. Output: ``routers.safetensors`` + ``routers.json`` (config, base-model
identity, training summary) and, with --lora, ``lora/`` in peft format; ``train_log.jsonl``;
``checkpoint.pt`` for --resume.

Data parallel (``export.distributed``, docs/scale-out.md): under ``torchrun --nproc_per_node N -m
export.finetune ...`` or ``accelerate launch -m export.finetune ...`` every process runs this command;
record i is cached (or measured) by rank i % N, each step's global batch is the single-process batch,
losses are formed from sums over the ranks and gradients summed with ``all_reduce``; rank 0 writes the
run folder. ``--device cpu|cuda`` and ``--dtype bf16|fp16|fp32`` place the frozen model.

FSDP (docs/scale-out.md "FSDP"): ``accelerate launch --config_file configs/accelerate_fsdp.yaml -m
export.finetune --recipe e2e [--lora] ...`` shards the working model (frozen weights and LoRA adapters) over
the processes with PyTorch FSDP2 (``export.distributed.fsdp_working_copy``); the steps, the loss and the
run folder are the same as without it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from runtime.errors import FirstEdgeError, cli_main

from . import distributed
from .data import Encoder, end_of_turn_id, load_split, mix_tasks, resolve_tasks
from .distributed import DTYPES, Dist, working_copy
from .model import FirstModel, build_first_model

CACHE_FORMAT = 2  # 2: one part per rank that built it (part-<r>-of-<world>/), any world size reads them


@dataclass
class TrainConfig:
    recipe: str = "rank"             # "rank" (default, export/rank.py) or "e2e" (straight-through, below)
    per_task: int = 32               # training records per task (0 = all)
    max_prompt_tokens: int = 192
    max_completion_tokens: int = 32
    batch_size: int = 8
    soft_steps: int = 25
    hard_steps: int = 45
    lora_steps: int = 0              # only with --lora
    lr: float = 1e-2                 # routers
    lora_lr: float = 5e-4
    lora_r: int = 8
    ce: float = 0.5                  # weight of the completion cross-entropy
    kd: float = 1.0                  # weight of the distillation term
    kd_topk: int = 32
    lam: float = 2.0                 # latency weight
    target_keep: Optional[float] = 0.7   # fraction of layers kept the latency term aims at (None, --no-target-keep: lam * mean gate)
    tau: float = 0.5                 # hard-gate threshold (= the runtime default threshold)
    bf16: bool = True                # bf16 for the frozen model where it is fast (CPUs with AMX, CUDA), else fp32
    dtype: str = "auto"              # the frozen model's precision: bf16, fp16, fp32; auto: bf16 where fast (above)
    device: str = "auto"             # cpu or cuda; auto: cuda where there is one
    seed: int = 0
    save_every: int = 25
    # rank recipe (export/rank.py); max_completion_tokens is the length of the base continuation
    calib_per_task: int = 4          # prompts per task for the importance prior and pinning
    pin_nats: float = 1.0            # pin a layer when skipping it alone costs more on >= 90% of those
    label_k: int = 0                 # skipped layers of the static mask the labels toggle around (0: from target_keep)
    rank_steps: int = 150
    rank_lr: float = 1e-3
    weight_decay: float = 0.05
    rank_cap: float = 1.0            # label differences above this (nats) weigh the same
    rank_temperature: float = 0.25
    holdout: float = 0.2             # labelled prompts held out to choose the step (0 = keep the last)
    eval_every: int = 10
    val_calib_per_task: int = 4      # val prompts per task for the threshold calibration
    task_weight: float = 1.0         # weight of the per-task greedy skip orders in the rank fit (0: toggle labels
                                     # only; 1, the default: task targets only, and the toggle labels are not measured)
    task_k: int = 0                  # greedy steps of those orders (0: label_k)
    task_tokens: int = 12            # continuation tokens the greedy scores (0: all max_completion_tokens)
    task_prompts: int = 0            # training prompts a task the greedy orders are measured on (0: calib_per_task)
    level_weight: float = 1.0        # weight of the score-level term (export/rank.py level_loss; needs task targets)
    level_budget: float = 0.5        # per-token KL (nats) that router score 0.5 stands for under the level term

    @property
    def total_steps(self) -> int:
        if self.recipe == "rank":
            return self.rank_steps
        return self.soft_steps + self.hard_steps + self.lora_steps


PRESETS: Dict[str, dict] = {
    # rank recipe sizes: measured times in docs/finetuning.md (quick <= 8 min, full <= 45 min on 2 cores);
    # the e2e recipe (--recipe e2e) reads the same presets' e2e fields
    "quick": dict(per_task=16, max_prompt_tokens=192, max_completion_tokens=16, batch_size=8,
                  soft_steps=25, hard_steps=45, lora_steps=20, rank_steps=150,
                  calib_per_task=3, val_calib_per_task=3),
    "full": dict(per_task=48, max_prompt_tokens=256, max_completion_tokens=24, batch_size=16,
                 soft_steps=100, hard_steps=200, lora_steps=60, lr=3e-3, rank_steps=300,
                 calib_per_task=6, val_calib_per_task=6, task_prompts=12),
    # for tests
    "tiny": dict(per_task=4, max_prompt_tokens=64, max_completion_tokens=8, batch_size=4,
                 soft_steps=3, hard_steps=3, lora_steps=2, save_every=2, kd_topk=8, rank_steps=6,
                 calib_per_task=2, val_calib_per_task=2, rank_lr=1e-2),
}


def _dtype_name(cfg: TrainConfig) -> str:
    return cfg.dtype if cfg.dtype in DTYPES else ("bf16" if cfg.bf16 else "fp32")


def autocast(cfg: TrainConfig, device: str = "cpu"):
    dt = _dtype_name(cfg)
    if dt != "fp32":
        return torch.autocast(torch.device(device).type, dtype=DTYPES[dt])
    import contextlib

    return contextlib.nullcontext()


# ------------------------------------------------------------------ prompt cache
def _remove_stale_parts(folder: Path, parts: List[str]):
    """Remove ``part-*`` folders of an earlier build (another world size, another key) not in ``parts``."""
    import shutil

    for p in folder.glob("part-*"):
        if p.is_dir() and p.name not in parts:
            shutil.rmtree(p, ignore_errors=True)


class PromptCache:
    """Per example: prompt hidden states entering each layer and the prompt K/V of each layer
    ([Tp, L, D + 2*kv*hd] in the working precision, bf16 as int16 bits, in a memory-mapped file), the
    completion ids, and the base model's top-k log-probabilities at the completion positions.

    Data parallel (``export.distributed``): rank r of W builds only the examples ``i % W == r``, in
    ``part-<r>-of-<W>/``; rank 0 then writes ``meta.json`` naming the parts. Any process (any world size,
    e.g. a resumed run) opens every part and memory-maps a part's file only when it reads from it."""

    def __init__(self, folder: Path, fm: FirstModel, dist: Optional[Dist] = None):
        self.folder = Path(folder)
        self.L, self.D = fm.n_layers, fm.hidden_size
        self.kvd = fm.n_kv_heads * fm.head_dim
        self.width = self.D + 2 * self.kvd  # per token and layer: hidden, K, V
        self.meta = None
        self.dist = dist or distributed.current()
        self.dtype = torch.bfloat16
        self.examples = []
        self._arrs: Dict[str, np.memmap] = {}

    _NP = {"bf16": np.int16, "fp16": np.float16, "fp32": np.float32}
    _TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

    def exists(self, key: str) -> bool:
        m = self.folder / "meta.json"
        if not m.exists():
            return False
        try:
            meta = json.loads(m.read_text())
        except ValueError:
            return False
        if meta.get("key") != key or meta.get("complete") is not True or meta.get("format") != CACHE_FORMAT:
            return False
        return all((self.folder / p / "states.bin").exists() and (self.folder / p / "examples.pt").exists()
                   for p in meta.get("parts", []))

    def open(self):
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.dtype_name = self.meta.get("dtype", "bf16")
        self.dtype = self._TORCH[self.dtype_name]
        exs = {}
        for part in self.meta["parts"]:
            for e in torch.load(self.folder / part / "examples.pt", weights_only=True):
                e["part"] = part
                exs[int(e["index"])] = e
        self.examples = [exs[i] for i in sorted(exs)]
        self._arrs = {}
        return self

    def _arr(self, part: str) -> np.memmap:
        if part not in self._arrs:
            pm = json.loads((self.folder / part / "meta.json").read_text())
            self._arrs[part] = np.memmap(self.folder / part / "states.bin", dtype=self._NP[self.dtype_name], mode="r",
                                         shape=(pm["tokens"], self.L, self.width))
        return self._arrs[part]

    @property
    def arr(self):
        """The memory-mapped states of a cache with one part (tests, tools)."""
        return self._arr(self.meta["parts"][0])

    @torch.no_grad()
    def build(self, fm: FirstModel, encoded, key: str, cfg: TrainConfig, progress=True, forward=None):
        """Cache this rank's share of ``encoded`` (``fm``: the working model, on its device), then open the
        whole cache once every rank has written its part. ``forward``: the FSDP root (``E2ERun.forward``)
        that runs each example's forward; every rank then runs as many forwards as the rank with the most
        records (the surplus ones are discarded), since FSDP gathers each layer's weights from all ranks."""
        dist = self.dist
        self.folder.mkdir(parents=True, exist_ok=True)
        name = _dtype_name(cfg)
        dt = self._TORCH[name]
        dev = next(fm.hf.parameters()).device if forward is None else dist.dev  # FSDP: shards may be offloaded
        mine = [i for i in range(len(encoded)) if dist.owns(i)]
        part = f"part-{dist.rank}-of-{dist.world}"
        pdir = self.folder / part
        pdir.mkdir(parents=True, exist_ok=True)
        (pdir / "meta.json").unlink(missing_ok=True)
        total = sum(len(encoded[i].prompt_ids) for i in mine)
        arr = np.memmap(pdir / "states.bin", dtype=self._NP[name], mode="w+", shape=(max(total, 1), self.L, self.width))
        examples = []
        off = 0
        it = mine
        if progress:
            from tqdm import tqdm

            it = tqdm(mine, desc="caching prompt states", unit="ex", file=sys.stderr, dynamic_ncols=True)
        def states_of(P, C):
            Tp = len(P)
            ids = torch.tensor([P + C[:-1]], dtype=torch.int64, device=dev)
            pos = torch.arange(ids.shape[1], dtype=torch.int64, device=dev).unsqueeze(0)
            with autocast(cfg, dev.type):
                cos, sin = fm.rope(pos)
                h = fm.embed(ids)
                rows = torch.empty(Tp, self.L, self.width, dtype=dt, device=dev)
                for l in range(self.L):
                    rows[:, l, :self.D] = h[0, :Tp].to(dt)
                    h, k, v = fm.layer(l, h, cos, sin)
                    rows[:, l, self.D:self.D + self.kvd] = k[0, :, :Tp].transpose(0, 1).reshape(Tp, -1).to(dt)
                    rows[:, l, self.D + self.kvd:] = v[0, :, :Tp].transpose(0, 1).reshape(Tp, -1).to(dt)
                logits = fm.head(h[0, Tp:]).float()  # predicts C[1:]
            return rows, logits

        for i in it:
            e = encoded[i]
            P, C = e.prompt_ids, e.completion_ids
            Tp = len(P)
            rows, logits = states_of(P, C) if forward is None else forward(states_of, P, C)
            lp = torch.log_softmax(logits, -1)
            top = lp.topk(cfg.kd_topk, dim=-1)
            rows = rows.cpu()
            arr[off:off + Tp] = (rows.view(torch.int16) if dt == torch.bfloat16 else rows).numpy()
            examples.append({"index": i, "off": off, "tp": Tp, "comp": torch.tensor(C, dtype=torch.int64),
                             "prompt": torch.tensor(P, dtype=torch.int64),
                             "tidx": top.indices.to(torch.int32).cpu(), "tlp": top.values.to(torch.float16).cpu(),
                             "task": e.record.task})
            off += Tp
        if forward is not None:  # FSDP: as many forwards as the rank with the most records
            most = max(len(range(r, len(encoded), dist.world)) for r in range(dist.world))
            for _ in range(most - len(mine)):
                e = encoded[mine[0] if mine else 0]
                forward(states_of, e.prompt_ids, e.completion_ids)
        arr.flush()
        del arr
        torch.save(examples, pdir / "examples.pt")
        (pdir / "meta.json").write_text(json.dumps({"tokens": max(total, 1), "n": len(examples), "complete": True}))
        parts = dist.gather(part)
        if dist.main:
            meta = {"format": CACHE_FORMAT, "key": key, "n": len(encoded), "complete": True, "dtype": name,
                    "world_size": dist.world, "parts": parts}
            tmp = self.folder / "meta.json.tmp"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, self.folder / "meta.json")
            _remove_stale_parts(self.folder, parts)
        dist.barrier()
        return self.open()

    def __len__(self):
        return len(self.examples)

    def batch(self, idx: List[int], device=None):
        """Padded tensors for the cached router phases (on ``device``, default the CPU)."""
        exs = [self.examples[i] for i in idx]
        B = len(exs)
        Tp = max(e["tp"] for e in exs)
        Tc = max(len(e["comp"]) - 1 for e in exs)
        K = exs[0]["tidx"].shape[1]
        states = torch.zeros(B, Tp, self.L, self.width, dtype=self.dtype)
        pmask = torch.zeros(B, Tp, dtype=torch.bool)
        cin = torch.zeros(B, Tc, dtype=torch.int64)
        tgt = torch.zeros(B, Tc, dtype=torch.int64)
        tmask = torch.zeros(B, Tc, dtype=torch.bool)
        tidx = torch.zeros(B, Tc, K, dtype=torch.int64)
        tlp = torch.full((B, Tc, K), -1e4, dtype=torch.float32)
        tps = torch.zeros(B, dtype=torch.int64)
        for i, e in enumerate(exs):
            tp, c = e["tp"], e["comp"]
            n = len(c) - 1
            blk = torch.from_numpy(np.array(self._arr(e["part"])[e["off"]:e["off"] + tp]))
            states[i, :tp] = blk.view(torch.bfloat16) if self.dtype == torch.bfloat16 else blk
            pmask[i, :tp] = True
            cin[i, :n] = c[:-1]
            tgt[i, :n] = c[1:]
            tmask[i, :n] = True
            tidx[i, :n] = e["tidx"].long()
            tlp[i, :n] = e["tlp"].float()
            tps[i] = tp
        out = dict(states=states, pmask=pmask, cin=cin, tgt=tgt, tmask=tmask, tidx=tidx, tlp=tlp, tps=tps)
        if device is not None and torch.device(device).type != "cpu":
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out


# ------------------------------------------------------------------ forward passes
def router_scores_cached(fm: FirstModel, states: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
    """g [B, L]: prompt-mean router score of every layer from the cached hidden states (fp32)."""
    D = fm.hidden_size
    pm = fm.pool_weights(pmask).float()  # DESIGN.md section 1: the shared chat prefix is not pooled
    denom = pm.sum(1).clamp_min(1.0)
    gs = []
    for l in range(fm.n_layers):
        p = fm.router_probs(l, states[:, :, l, :D].float())
        gs.append((p * pm).sum(1) / denom)
    return torch.stack(gs, 1)


def make_gate_fn(phase: str, tau: float):
    def gate(g: torch.Tensor) -> torch.Tensor:
        if phase == "soft":
            return g
        hard = (g >= tau).to(g.dtype)
        return hard + g - g.detach()  # straight-through: forward hard, gradient of g

    return gate


def cached_forward(fm: FirstModel, b: dict, gate_fn, pinned: Optional[torch.Tensor] = None):
    """Completion-only forward of the router phases. Returns (logits [B, Tc, V], g [B, L], gates [B, L])."""
    states, pmask = b["states"], b["pmask"]
    B, Tp = pmask.shape
    Tc = b["cin"].shape[1]
    L, D, kvd = fm.n_layers, fm.hidden_size, fm.n_kv_heads * fm.head_dim
    g = router_scores_cached(fm, states, pmask)
    gates = gate_fn(g)
    if pinned is not None and bool(pinned.any()):
        gates = torch.where(pinned.view(1, L), torch.ones_like(gates), gates)
    dev = b["cin"].device
    pos = b["tps"].view(B, 1) + torch.arange(Tc, device=dev).view(1, Tc)
    h = fm.embed(b["cin"])
    cos, sin = (x.to(h.dtype) for x in fm.rope(pos))  # the rotation in the working precision (bf16 copy)
    # each completion position attends to its own (unpadded) prompt and causally to the completion
    allowed = torch.cat([pmask.view(B, 1, Tp).expand(B, Tc, Tp),
                         torch.ones(Tc, Tc, dtype=torch.bool, device=dev).tril().view(1, Tc, Tc).expand(B, Tc, Tc)], 2)
    allowed = allowed.unsqueeze(1)
    for l in range(L):
        pk = states[:, :, l, D:D + kvd].view(B, Tp, fm.n_kv_heads, fm.head_dim).transpose(1, 2)
        pv = states[:, :, l, D + kvd:].view(B, Tp, fm.n_kv_heads, fm.head_dim).transpose(1, 2)
        out, _, _ = fm.layer(l, h, cos, sin, past_k=pk, past_v=pv, attn_mask=allowed)
        gl = gates[:, l].to(out.dtype).view(B, 1, 1)
        h = h + gl * (out - h)
    return fm.head(h), g, gates


N_SUMS = 6  # loss_sums: CE sum, KL sum, completion tokens, gate sum, examples, layers kept at tau (sum)


def loss_sums(logits, b, gates, g, tau: float) -> torch.Tensor:
    """The sums the loss is made of, over this process's examples: [N_SUMS] (differentiable in the CE,
    KL and gate sums). Data parallel: summed over ranks (``Dist.globalize``) before the loss is formed,
    so every rank's loss has the value of the single-process loss of the whole batch."""
    lp = torch.log_softmax(logits.float(), -1)
    m = b["tmask"]
    ce = -(lp.gather(-1, b["tgt"].unsqueeze(-1)).squeeze(-1) * m).sum()
    tp = torch.softmax(b["tlp"], -1)  # teacher top-k, renormalised
    kd_ce = -(tp * lp.gather(-1, b["tidx"])).sum(-1)
    t_ent = -(tp * torch.log(tp.clamp_min(1e-12))).sum(-1)
    kd = ((kd_ce - t_ent) * m).sum()  # KL(teacher_topk || student), summed over tokens
    one = torch.ones((), device=logits.device)
    return torch.stack([ce, kd, m.sum().float() * one, gates.float().sum(), gates.shape[0] * one,
                        (g.detach() >= tau).float().sum()])


def loss_from_sums(s: torch.Tensor, cfg: TrainConfig, n_layers: int):
    """(total loss, log record) from (global) ``loss_sums``."""
    n = s[2].clamp_min(1)
    ce, kd = s[0] / n, s[1] / n
    keep = s[3] / (s[4] * n_layers).clamp_min(1)
    if cfg.target_keep is None:
        lat = cfg.lam * keep
    else:
        lat = cfg.lam * F.relu(keep - cfg.target_keep)
    total = cfg.ce * ce + cfg.kd * kd + lat
    sd = s.detach()
    rows = float(sd[4].clamp_min(1))
    lat_v = float(torch.as_tensor(lat).detach())
    return total, {"loss": total.item(), "ce": ce.item(), "kd": kd.item(), "lat": lat_v,
                   "gate": float(keep.detach()), "skipped": round(n_layers - float(sd[3]) / rows, 3),
                   "skipped_at_tau": round(n_layers - float(sd[5]) / rows, 3)}


def losses(logits, b, gates, cfg: TrainConfig, g=None):
    """The loss of one batch in one process: (total, log record)."""
    g = gates if g is None else g
    return loss_from_sums(loss_sums(logits, b, gates, g, cfg.tau), cfg, gates.shape[1])


# ------------------------------------------------------------------ LoRA phase (full mixed forward)
def lora_batch(cache: PromptCache, idx: List[int]):
    b = cache.batch(idx)
    exs = [cache.examples[i] for i in idx]
    B = len(exs)
    S = max(e["tp"] + len(e["comp"]) - 1 for e in exs)
    ids = torch.zeros(B, S, dtype=torch.int64)
    pmask = torch.zeros(B, S, dtype=torch.bool)
    sel = torch.zeros(B, b["cin"].shape[1], dtype=torch.int64)
    for i, e in enumerate(exs):
        tp = e["tp"]
        c = e["comp"]
        ids[i, :tp] = e["prompt"]
        ids[i, tp:tp + len(c) - 1] = c[:-1]
        pmask[i, :tp] = True
        sel[i] = (tp + torch.arange(b["cin"].shape[1])).clamp_max(S - 1)
    b.update(full_ids=ids, full_pmask=pmask, sel=sel)
    return b


def attach_trainable_lora(fm: FirstModel, r: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover
        raise FirstEdgeError("--lora needs the 'peft' package") from e
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    conf = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, bias="none")
    fm.hf = get_peft_model(fm.hf, conf)
    return [p for n, p in fm.hf.named_parameters() if "lora_" in n and p.requires_grad]


# ------------------------------------------------------------------ training loop
def _batch_indices(n: int, bs: int, seed: int, step: int) -> List[int]:
    """Deterministic per step (so a resumed run sees the same batches as an uninterrupted one)."""
    epoch, k = divmod((step - 1) * bs, max(n, 1))
    order = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    order = order + order  # wrap around at the epoch end
    return order[k:k + min(bs, n)]


def phase_of(step: int, cfg: TrainConfig) -> str:
    if step <= cfg.soft_steps:
        return "soft"
    if step <= cfg.soft_steps + cfg.hard_steps:
        return "hard"
    return "lora"


def config_key(cfg: TrainConfig, fm: FirstModel, data_dir: str, tasks: List[str]) -> str:
    keyed = {k: getattr(cfg, k) for k in ("per_task", "max_prompt_tokens", "max_completion_tokens", "kd_topk", "seed", "bf16")}
    if _dtype_name(cfg) == "fp16":
        keyed["dtype"] = "fp16"
    keyed.update(data=str(Path(data_dir).resolve()), tasks=tasks, base=fm.identity())
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def open_run(out: Path, resume: bool, resume_file: Path, what: str, model, seed: int, fm=None, tok=None,
             verbose: bool = True):
    """Check the run folder (a finished run is not overwritten; --resume needs ``resume_file``), create it,
    seed torch, and load the frozen base model (unless given). Returns (fm, tok)."""
    if (out / "routers.json").exists() and not resume:
        raise FirstEdgeError(f"{out} already holds a trained run; use --resume to continue it or choose another --out")
    if resume and not resume_file.exists():
        raise FirstEdgeError(f"nothing to resume in {out} (no {what})")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if fm is None:
        fm, tok = build_first_model(model, None, verbose=verbose)
    for p in fm.hf.parameters():
        p.requires_grad_(False)
    return fm, tok


def resolve_placement(cfg: TrainConfig) -> Dist:
    """Join the process group when launched by torchrun / accelerate (``export.distributed.setup``) and fix
    ``cfg.device`` and ``cfg.dtype`` (``cfg.bf16`` follows the dtype). Returns this process's Dist."""
    fsdp = distributed.fsdp_config()  # accelerate's FSDP config (one-line errors for what is not supported)
    if fsdp is not None and cfg.recipe != "e2e":
        raise FirstEdgeError("accelerate's FSDP config shards the model of the e2e recipe (--recipe e2e [--lora]); "
                             "the rank recipe keeps the whole model in every process: launch it with "
                             "configs/accelerate_multi.yaml or torchrun")
    dist = distributed.setup(None if cfg.device == "auto" else cfg.device, fsdp=fsdp)
    if fsdp is not None and not dist.active:
        print("[finetune] accelerate's FSDP config with 1 process: nothing to shard (the model is whole, as "
              "without FSDP)", file=sys.stderr)
    cfg.device = dist.dev.type
    cfg.dtype = distributed.resolve_dtype(None if cfg.dtype == "auto" else cfg.dtype, cfg.device, prefer_bf16=cfg.bf16)
    cfg.bf16 = cfg.dtype == "bf16"
    return dist


def distributed_record(dist: Dist, cfg: TrainConfig, n_records: int, batch: int) -> dict:
    """What routers.json records about the processes: world size, per-rank and global batch, and the
    records each rank cached or measured (record i of the run's list belongs to rank i % world)."""
    recs = dist.records_of(n_records)
    return dict(dist.summary(), dtype=cfg.dtype, global_batch=batch, per_rank_batch=round(batch / dist.world, 3),
                split="record i belongs to rank i % world_size; a global batch is the single-process batch, each "
                      "rank computing the records of it that it owns, gradients summed with all_reduce",
                records_per_rank=[len(recs[r]) for r in range(dist.world)],
                records={str(r): recs[r] for r in range(dist.world)})


def train(model: Optional[str], data_dir: str, out: str, cfg: TrainConfig, tasks=None, lora: bool = False,
          resume: bool = False, stop_after: Optional[int] = None, progress: bool = True, verbose: bool = True,
          fm: Optional[FirstModel] = None, tok=None) -> dict:
    """Train routers (and LoRA) with ``cfg.recipe``; returns the summary also written into routers.json.
    Under torchrun / accelerate launch every process calls this; rank 0 writes the run folder."""
    dist = resolve_placement(cfg)
    if not dist.main:
        progress, verbose = False, False
    if cfg.recipe == "rank":
        if lora:
            raise FirstEdgeError("--lora needs the end-to-end recipe (--recipe e2e)")
        from .rank import train_rank

        return train_rank(model, data_dir, out, cfg, tasks=tasks, resume=resume, progress=progress,
                          verbose=verbose, fm=fm, tok=tok)
    if cfg.recipe != "e2e":
        raise FirstEdgeError(f"unknown recipe '{cfg.recipe}' (use rank or e2e)")
    return train_e2e(model, data_dir, out, cfg, tasks=tasks, lora=lora, resume=resume, stop_after=stop_after,
                     progress=progress, verbose=verbose, fm=fm, tok=tok)


@dataclass
class E2ERun:
    """What the phases of an end-to-end run share (``prepare`` fills it, the later phases add to it)."""
    out: Path
    cfg: TrainConfig
    fm: FirstModel                   # fp32 on the CPU; its routers are the ones trained and saved
    work: FirstModel                 # what the steps run: fm, or a copy in the working dtype on the device
                                     # sharing fm's routers
    key: str                         # data and settings the prompt cache and the checkpoint belong to
    tasks: List[str]
    dist: Dist = field(default_factory=Dist)
    cache: Optional[PromptCache] = None
    router_params: List[torch.nn.Parameter] = field(default_factory=list)
    opt: Optional[torch.optim.Optimizer] = None
    lora_params: List[torch.nn.Parameter] = field(default_factory=list)
    lora_opt: Optional[torch.optim.Optimizer] = None
    resumed: Optional[dict] = None   # the checkpoint this run continues
    root: Optional[torch.nn.Module] = None  # FSDP: the root every forward runs in (export.distributed.FsdpRoot)
    shards: Optional[dict] = None    # FSDP: what each rank holds (export.distributed.shard_report)

    def forward(self, fn, *args):
        """``fn(*args)``: a forward through ``work``, inside the FSDP root when the model is sharded."""
        return fn(*args) if self.root is None else self.root(fn, *args)

    def lora_named(self) -> Dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.work.hf.named_parameters() if "lora_" in n}

    @property
    def ckpt_file(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "train_log.jsonl"


def prepare(model: Optional[str], data_dir: str, out: str, cfg: TrainConfig, tasks, lora: bool, resume: bool,
            fm: Optional[FirstModel], tok, verbose: bool):
    """Phase 1: open the run folder, load the frozen model, encode the training records and make the
    working copy. Returns (run, encoded examples)."""
    out = Path(out)
    dist = distributed.current()
    if not lora:
        cfg.lora_steps = 0
    tasks = resolve_tasks(data_dir, tasks)
    fm, tok = open_run(out, resume, out / "checkpoint.pt", "checkpoint.pt", model, cfg.seed, fm, tok, verbose)
    encoder = Encoder(tok, end_of_turn_id(tok, fm.cfg), cfg.max_prompt_tokens, cfg.max_completion_tokens)
    fm.pool_start = len(encoder.pre_ids)
    recs = mix_tasks(load_split(data_dir, "train", tasks), cfg.per_task or None, seed=cfg.seed)
    encoded = [e for e in (encoder(r) for r in recs) if len(e.completion_ids) >= 2]
    if not encoded:
        raise FirstEdgeError(f"no usable training records in {data_dir} (completions are empty)")
    key = config_key(cfg, fm, data_dir, tasks)
    fm.eval()
    if dist.fsdp is None:
        work = working_copy(fm, cfg.dtype, dist.device)
        return E2ERun(out=out, cfg=cfg, fm=fm, work=work, key=key, tasks=tasks, dist=dist), encoded
    # FSDP: the adapters are attached before sharding (lora_B = 0: the model's outputs are unchanged until
    # the LoRA phase trains them; attached on the CPU in fp32 from the same random state as the unsharded
    # path attaches them at its first LoRA step, so they start from the same values)
    attach = (lambda w: attach_trainable_lora(w, cfg.lora_r)) if lora else None
    work, root = distributed.fsdp_working_copy(fm, cfg.dtype, dist.device, dist, before_shard=attach)
    run = E2ERun(out=out, cfg=cfg, fm=fm, work=work, key=key, tasks=tasks, dist=dist, root=root)
    run.lora_params = [p for p in run.lora_named().values() if p.requires_grad]
    run.shards = distributed.shard_report(work.hf, dist)
    if verbose:
        sh = run.shards
        n_frozen = sh["total_params"] - sum(sh["trainable"])
        extra = f" and {sh['trainable'][0]:,} of {sum(sh['trainable']):,} LoRA parameters" if lora else ""
        print(f"[finetune] FSDP over {dist.world} processes: rank 0 holds {sh['frozen'][0]:,} of {n_frozen:,} frozen "
              f"parameters ({sh['frozen_bytes'][0] / 2**20:.1f} MiB){extra}", file=sys.stderr)
    return run, encoded


def cache_prompts(run: E2ERun, encoded, progress: bool, verbose: bool) -> float:
    """Phase 2: the prompt cache of ``run.key``, reused when complete (whatever world size built it), else
    built, each rank its share. Returns its seconds."""
    t0 = time.time()
    run.cache = PromptCache(run.out / "cache", run.work, run.dist)
    if run.cache.exists(run.key):
        run.cache.open()
        if verbose:
            print(f"[finetune] reusing the prompt cache in {run.cache.folder} ({len(run.cache)} examples)",
                  file=sys.stderr)
    else:
        if verbose:
            share = ""
            if run.dist.active:
                share = f", {len(run.dist.mine(range(len(encoded))))} on each of {run.dist.world} ranks"
            print(f"[finetune] {len(encoded)} examples from {', '.join(run.tasks)}; caching prompt states once{share}",
                  file=sys.stderr)
        run.dist.barrier()  # no rank reads an old meta.json while rank 0 replaces it
        run.cache.build(run.work, encoded, run.key, run.cfg, progress=progress,
                        forward=run.forward if run.root is not None else None)
    return time.time() - t0


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        from runtime.errors import first_line

        raise FirstEdgeError(f"cannot read the checkpoint {path}: {first_line(e, 200)}") from None


def init_optimizer(run: E2ERun, resume: bool, verbose: bool) -> int:
    """Phase 3: the router optimiser, restored from the checkpoint with --resume. Returns the first step."""
    cfg = run.cfg
    run.router_params = list(run.fm.routers.parameters())
    for p in run.router_params:
        p.requires_grad_(True)
    run.opt = torch.optim.Adam(run.router_params, lr=cfg.lr)
    start = 1
    if resume:
        state = load_checkpoint(run.ckpt_file)
        if state.get("key") != run.key:
            raise FirstEdgeError(f"{run.ckpt_file} was written for other data or settings; start a new --out")
        run.resumed = state
        run.fm.routers.load_state_dict(state["routers"])
        run.opt.load_state_dict(state["opt"])
        for grp in run.opt.param_groups:  # settings given now apply from the resume point on
            grp["lr"] = cfg.lr
        start = int(state["step"]) + 1
        if verbose:
            was = state.get("world_size", 1)
            note = f" (checkpoint written by {was} processes, now {run.dist.world})" if was != run.dist.world else ""
            print(f"[finetune] resuming {run.out} at step {start}{note}", file=sys.stderr)
    if run.dist.main:
        if not resume and run.log_path.exists():
            run.log_path.unlink()
        elif resume and run.log_path.exists():
            # a run killed after its last checkpoint logged steps that will run again: keep those before it
            kept = [x for x in run.log_path.read_text().splitlines() if _log_step(x) < start]
            tmp = run.log_path.with_suffix(".tmp")
            tmp.write_text("".join(x + "\n" for x in kept))
            os.replace(tmp, run.log_path)
    return start


def _log_step(line: str) -> float:
    """The step of a train_log.jsonl line (inf for a line cut short by a kill)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def ensure_lora(run: E2ERun):
    """At the first LoRA step: trainable adapters on the working model and their optimiser (restored
    from the checkpoint when it has them)."""
    if run.lora_opt is not None:
        return
    cfg = run.cfg
    if run.root is None:
        run.lora_params = attach_trainable_lora(run.work, cfg.lora_r)
        run.lora_opt = torch.optim.Adam([{"params": run.lora_params, "lr": cfg.lora_lr},
                                         {"params": run.router_params, "lr": cfg.lr * 0.1}])
    else:  # FSDP: attached (and sharded) by prepare; foreach=False: sharded (DTensor) and whole parameters
        for p in run.lora_params:
            p.grad = None
        run.lora_opt = torch.optim.Adam([{"params": run.lora_params, "lr": cfg.lora_lr},
                                         {"params": run.router_params, "lr": cfg.lr * 0.1}], foreach=False)
    state = run.resumed
    if state is not None and state.get("lora") is not None:
        sd = dict(run.work.hf.named_parameters())
        if run.root is None:
            for n, v in state["lora"].items():
                sd[n].data.copy_(v)
            run.lora_opt.load_state_dict(state["lora_opt"])
        else:
            for n, v in state["lora"].items():
                distributed.load_full(sd[n], v)
            distributed.load_optimizer_state(run.lora_opt, state["lora_opt"])


def train_step(run: E2ERun, step: int) -> dict:
    """Phase 4, one step: the global batch of ``step`` (the same for any number of processes), this
    process's part of it, the forward of its phase (cached for soft/hard, the full mixed forward for
    lora), the loss from globally summed parts, gradients summed over processes, and the update.
    Returns the log record."""
    cfg, work, dist = run.cfg, run.work, run.dist
    phase = phase_of(step, cfg)
    idx = _batch_indices(len(run.cache), cfg.batch_size, cfg.seed, step)
    mine = dist.mine(idx)
    gate_fn = make_gate_fn(phase, cfg.tau)
    dev = dist.dev
    if phase == "lora":
        ensure_lora(run)
        opt, params = run.lora_opt, run.lora_params + run.router_params
    else:
        opt, params = run.opt, run.router_params
    opt.zero_grad(set_to_none=True)
    if run.root is not None and phase != "lora":
        for p in run.lora_params:  # FSDP: the adapters (lora_B = 0 until the LoRA phase) get gradients too
            p.grad = None
    # FSDP: a process with no record of this batch still runs a forward and backward (of one record, its
    # sums multiplied by 0), since every rank takes part in gathering each layer's weights
    rows = mine if mine or run.root is None else idx[:1]
    if rows:
        if phase == "lora":
            b = lora_batch(run.cache, rows)
            b = {k: v.to(dev) for k, v in b.items()}

            def fwd():
                with torch.device(dev), autocast(cfg, dev.type):
                    return work.mixed_forward(b["full_ids"], b["full_pmask"], gate_fn=lambda l, gl: gate_fn(gl))

            logits, g, gates = run.forward(fwd)
            logits = logits.gather(1, b["sel"].unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        else:
            b = run.cache.batch(rows, device=dev)

            def fwd():
                with autocast(cfg, dev.type):
                    return cached_forward(work, b, gate_fn, work.pinned_mask)

            logits, g, gates = run.forward(fwd)
        sums = loss_sums(logits, b, gates, g, cfg.tau)
        if not mine:
            sums = sums * 0.0
    else:  # none of this batch's records is this process's: it only takes part in the sums
        sums = torch.zeros(N_SUMS, device=dev)
    loss, parts = loss_from_sums(dist.globalize(sums), cfg, run.fm.n_layers)
    if loss.requires_grad:
        loss.backward()
    # FSDP sums the (sharded) adapters' gradients itself; the routers are whole on every rank
    dist.reduce_grads(params if run.root is None else run.router_params)
    opt.step()
    parts.update(step=step, phase=phase)
    return parts


def save_checkpoint(run: E2ERun, step: int):
    """Phase 5a: ``checkpoint.pt`` (routers, optimisers, LoRA weights) for --resume, written atomically by
    rank 0 (every rank holds the same state; with FSDP the adapters and their optimiser state are gathered
    first, by every rank, into the format of an unsharded run)."""
    lora = lora_opt = None
    if run.lora_opt is not None and run.root is not None:
        lora = distributed.full_tensors(run.lora_named())
        lora_opt = distributed.full_optimizer_state(run.lora_opt)
    if not run.dist.main:
        return
    st = {"step": step, "key": run.key, "routers": run.fm.routers.state_dict(), "opt": run.opt.state_dict(),
          "cfg": asdict(run.cfg), "lora": None, "world_size": run.dist.world}
    if run.root is not None:
        st["fsdp"] = True
    if run.lora_opt is not None:
        if run.root is not None:
            st["lora"], st["lora_opt"] = lora, lora_opt
        else:
            st["lora"] = {n: p.detach().clone() for n, p in run.work.hf.named_parameters() if "lora_" in n}
            st["lora_opt"] = run.lora_opt.state_dict()
    tmp = run.ckpt_file.with_suffix(".tmp")
    torch.save(st, tmp)
    os.replace(tmp, run.ckpt_file)


def save_run(run: E2ERun, model: Optional[str], summary: dict):
    """Phase 5b (rank 0): routers.safetensors + routers.json (with the summary) and, after a LoRA phase,
    ``lora/``; ``run.fm`` is left on the CPU with the trained adapters merged and its routers frozen."""
    fm, out = run.fm, run.out
    with_lora = run.lora_opt is not None
    extra = {"lora": with_lora, "model_dir": str(Path(model).resolve()) if model else None, "train": summary}
    fm.routers.to("cpu")
    full = distributed.full_tensors(run.lora_named()) if with_lora and run.root is not None else None
    if run.dist.main:
        if with_lora:
            if full is None:
                run.work.hf.save_pretrained(str(out / "lora"))
            else:  # FSDP: the gathered adapters, in peft's format
                run.work.hf.save_pretrained(str(out / "lora"), state_dict=full)
            fm.save_routers(out, extra=extra)
            from .model import attach_lora

            fm.hf = attach_lora(fm.hf, out / "lora") if run.work is not fm else run.work.hf.merge_and_unload()
        else:
            fm.save_routers(out, extra=extra)
    run.work = run.root = None
    for p in fm.routers.parameters():
        p.requires_grad_(False)


def _cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def train_e2e(model: Optional[str], data_dir: str, out: str, cfg: TrainConfig, tasks=None, lora: bool = False,
              resume: bool = False, stop_after: Optional[int] = None, progress: bool = True, verbose: bool = True,
              fm: Optional[FirstModel] = None, tok=None) -> dict:
    """The end-to-end recipe: prepare, cache, then the steps (checkpointed), then save."""
    t_start = time.time()
    run, encoded = prepare(model, data_dir, out, cfg, tasks, lora, resume, fm, tok, verbose)
    dist = run.dist
    cache_s = cache_prompts(run, encoded, progress, verbose)
    start = init_optimizer(run, resume, verbose)
    total = cfg.total_steps
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start - 1, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)
    last = {}
    t_train = time.time()
    run.work.train(False)
    delay = float(os.environ.get("FIRST_EDGE_TEST_STEP_DELAY", "0") or 0)  # tests: time to kill a run mid-training
    for step in range(start, total + 1):
        parts = last = train_step(run, step)
        if delay:
            time.sleep(delay)
        if dist.main:
            with open(run.log_path, "a") as f:
                f.write(json.dumps(parts) + "\n")
        if bar is not None:
            bar.set_postfix(phase=parts["phase"], loss=f"{parts['loss']:.3f}", gate=f"{parts['gate']:.3f}",
                            skipped=f"{parts['skipped']:.1f}")
            bar.update(1)
        if step % cfg.save_every == 0 or step == total or step == cfg.soft_steps + cfg.hard_steps:
            save_checkpoint(run, step)
        if stop_after is not None and step >= stop_after:
            save_checkpoint(run, step)
            if bar is not None:
                bar.close()
            dist.barrier()
            return {"stopped_at": step}
    if bar is not None:
        bar.close()
    train_s = time.time() - t_train
    cpu = dist.gather(round(_cpu_seconds(), 1))
    summary = {"steps": total, "final": last, "cache_s": round(cache_s, 1), "train_s": round(train_s, 1),
               "cpu_s": round(sum(cpu), 1), "cpu_s_per_rank": cpu, "threads": torch.get_num_threads(),
               "total_s": round(time.time() - t_start, 1), "examples": len(run.cache), "tasks": run.tasks,
               "data": str(data_dir), "config": asdict(cfg),
               "distributed": distributed_record(dist, cfg, len(run.cache), cfg.batch_size)}
    if run.shards is not None:
        summary["distributed"]["fsdp_shards"] = run.shards
    with_lora = run.lora_opt is not None
    save_run(run, model, summary)
    dist.barrier()
    if verbose:
        print(f"[finetune] wrote {run.out}/routers.safetensors{' and lora/' if with_lora else ''} "
              f"in {summary['total_s']:.0f} s (cache {cache_s:.0f} s, training {train_s:.0f} s; CPU time "
              f"{summary['cpu_s']:.0f} s{f' over {dist.world} processes' if dist.active else ''}); final: "
              f"loss {last.get('loss', float('nan')):.3f}, layers skipped at tau={cfg.tau}: "
              f"{last.get('skipped_at_tau', 0):.1f}/{run.fm.n_layers}", file=sys.stderr)
    return summary


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m export.finetune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="task data folder (one sub-folder per task with train.jsonl)")
    ap.add_argument("--out", required=True, help="run folder to write (e.g. runs/quick)")
    ap.add_argument("--model", help="local Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--tasks", default="all", help="comma-separated task folders, or 'all'")
    ap.add_argument("--lora", action="store_true", help="add a LoRA phase (peft adapters trained with the routers)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt (any number of processes)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--keep-cache", action="store_true", help="keep <out>/cache (prompt states) after training")
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--recipe", choices=["rank", "e2e"], default=None,
                    help="rank: routers learn measured per-prompt layer importance (default); "
                         "e2e: end-to-end straight-through training")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one); under torchrun "
                                                   "each process takes the GPU of its local rank")
    ap.add_argument("--dtype", default=None, help="the frozen model's precision: bf16, fp16 or fp32 (default: bf16 on "
                                                  "CUDA and on CPUs with AMX, else fp32)")
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name in ("bf16", "recipe", "dtype", "device"):
            continue
        typ = int if isinstance(f.default, int) and not isinstance(f.default, bool) else float
        ap.add_argument("--" + f.name.replace("_", "-"), type=typ, default=None,
                        help=f"override the preset's {f.name}")
    ap.add_argument("--no-target-keep", action="store_true",
                    help="e2e latency term lam * mean gate, without a target fraction of kept layers")
    ap.add_argument("--fp32", action="store_true", help="the same as --dtype fp32")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(**PRESETS[args.preset])
    for f in TrainConfig.__dataclass_fields__:
        v = getattr(args, f, None)
        if v is not None and f not in ("bf16", "dtype", "device"):
            setattr(cfg, f, v)
    if cfg.recipe == "rank" and args.lora:
        raise FirstEdgeError("--lora needs the end-to-end recipe (--recipe e2e)")
    if args.target_keep is not None and args.target_keep < 0:
        raise FirstEdgeError(f"--target-keep {args.target_keep:g}: a negative target no longer selects the plain "
                             f"lam * mean-gate penalty, use --no-target-keep (--target-keep is a fraction of layers)")
    if args.no_target_keep:
        if args.target_keep is not None:
            raise FirstEdgeError("give either --target-keep or --no-target-keep, not both")
        cfg.target_keep = None
    if args.fp32:
        if args.dtype not in (None, "fp32"):
            raise FirstEdgeError(f"give either --fp32 or --dtype {args.dtype}, not both")
        cfg.bf16 = False
    if args.dtype is not None:
        distributed.resolve_dtype(args.dtype, "cpu")  # an unknown name is a one-line error before anything loads
        cfg.dtype = args.dtype
    if args.device is not None:
        cfg.device = distributed.resolve_device(args.device)
    if cfg.batch_size < 1 or cfg.total_steps < 1:
        raise FirstEdgeError("batch size and steps must be at least 1")
    try:
        summary = train(args.model, args.data, args.out, cfg, tasks=args.tasks, lora=args.lora, resume=args.resume,
                        stop_after=args.stop_after, progress=not args.no_progress)
        if "stopped_at" not in summary and not args.keep_cache and distributed.current().main:
            import shutil

            shutil.rmtree(Path(args.out) / "cache", ignore_errors=True)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
