"""Data parallelism over PyTorch's own engine (``torch.distributed``): the glue training and evaluation share.

``torchrun --nproc_per_node N -m export.finetune ...`` and ``accelerate launch -m export.finetune ...``
start N copies of the ordinary command line; each finds its rank and the world size in the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``, set by the launcher) and
:func:`setup` joins the process group: gloo on CPU, NCCL on CUDA. Without those variables nothing is
initialised and every helper below is the identity (one process, the single-process code path).

The split of the work is the same everywhere: record ``i`` of a run's (global, seeded) record list
belongs to rank ``i % world`` (:meth:`Dist.owns`). A rank measures, caches and memory-maps only its
own records; a global batch is the single-process batch, each rank computing the part of it that it
owns; losses are normalised by global counts (:meth:`Dist.globalize`) and gradients summed with
``all_reduce`` (:meth:`Dist.reduce_grads`), so N processes take the optimiser step one process takes
on the same global batch (up to the order of floating-point sums). Rank 0 (``main``) writes the run
folder, the logs and the checkpoints; results of sharded measurements are gathered with
``all_gather_object`` in record order.

FSDP (``accelerate launch --config_file configs/accelerate_fsdp.yaml -m export.finetune --recipe e2e ...``):
accelerate's launcher exports its FSDP settings (``ACCELERATE_USE_FSDP``, ``FSDP_*``); :func:`fsdp_config`
reads them through accelerate's own ``FullyShardedDataParallelPlugin`` and :func:`fsdp_working_copy` shards
the e2e recipe's working model with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per
decoder layer (the modules ``FirstModel.layer`` calls), the embedding, and the final norm with the head,
under a root whose forward runs each step's whole forward (:class:`FsdpRoot`). The frozen base weights
and the LoRA adapters are sharded (each rank holds 1/N of them outside the unit in use); LoRA gradients
are summed by FSDP's reduce-scatter; the routers (small) stay whole on every rank and are summed by
:meth:`Dist.reduce_grads` as without FSDP. Rank 0 writes full (gathered) tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from runtime.errors import FirstEdgeError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("cpu", "cuda")


def resolve_device(name: Optional[str]) -> str:
    """'cpu' or 'cuda' ('auto' or None: cuda where there is a CUDA device), or a one-line error."""
    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in DEVICES:
        raise FirstEdgeError(f"unknown --device '{name}' (use cpu or cuda)")
    if name == "cuda" and not torch.cuda.is_available():
        raise FirstEdgeError("--device cuda: no CUDA device is available to this PyTorch "
                             f"({torch.__version__}); use --device cpu")
    return name


def resolve_dtype(name: Optional[str], device: str, prefer_bf16: bool = True) -> str:
    """The frozen model's working precision: 'bf16', 'fp16' or 'fp32'. 'auto' (None): bf16 on CUDA and on
    CPUs where bf16 is fast (AMX, ``importance.bf16_is_fast``), else fp32; ``prefer_bf16=False`` (the
    old ``--fp32``) makes auto fp32."""
    if name in (None, "", "auto"):
        if not prefer_bf16:
            return "fp32"
        if device.startswith("cuda"):
            return "bf16"
        from .importance import bf16_is_fast

        return "bf16" if bf16_is_fast() else "fp32"
    if name not in DTYPES:
        raise FirstEdgeError(f"unknown --dtype '{name}' (use bf16, fp16 or fp32)")
    return name


@dataclass
class Dist:
    """This process's place in the job. ``world == 1``: not distributed (no collective is called)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"      # "cpu" or "cuda:<local rank>"
    backend: Optional[str] = None
    fsdp: Optional["FsdpConfig"] = None  # accelerate's FSDP config, when launched with it on 2+ processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    # ---- the split of the records
    def owns(self, i: int) -> bool:
        return int(i) % self.world == self.rank

    def mine(self, idx: Iterable[int]) -> List[int]:
        """The members of ``idx`` this rank computes, in their order."""
        return [int(i) for i in idx if int(i) % self.world == self.rank]

    def records_of(self, n: int) -> Dict[int, List[int]]:
        """{rank: the indices of ``n`` records it owns} (what routers.json records)."""
        return {r: list(range(r, n, self.world)) for r in range(self.world)}

    # ---- collectives (identity with one process)
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dev) if self.backend == "nccl" else t.cpu()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``t`` (a new tensor on ``t``'s device; ``t`` itself is not changed)."""
        if not self.active:
            return t.clone()
        import torch.distributed as td

        x = self._comm(t.detach().clone())
        td.all_reduce(x, op=td.ReduceOp.SUM)
        return x.to(t.device)

    def globalize(self, local: torch.Tensor) -> torch.Tensor:
        """A tensor whose value is the sum over ranks of ``local`` and whose gradient is ``local``'s:
        losses built from globalized sums have the single-process value, and their backward gives
        this rank's share of the single-process gradient (summed by :meth:`reduce_grads`)."""
        if not self.active:
            return local
        total = self.all_sum(local.detach())
        return local + (total - local.detach())

    def reduce_grads(self, params: Sequence[torch.nn.Parameter]):
        """Sum the gradients of ``params`` over ranks (one all_reduce of the flattened gradients; a
        parameter without a gradient on this rank contributes zeros)."""
        if not self.active:
            return
        import torch.distributed as td
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = self._comm(_flatten_dense_tensors([g.detach() for g in grads]).clone())
        td.all_reduce(flat, op=td.ReduceOp.SUM)
        for g, s in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(s.to(g.device))

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (``all_gather_object``)."""
        if not self.active:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def merge(self, part: Dict[int, object]) -> Dict[int, object]:
        """Gather {index: value} dicts of every rank into one, in index order."""
        allp = {}
        for p in self.gather(part):
            allp.update(p)
        return dict(sorted(allp.items()))

    def broadcast(self, obj, src: int = 0):
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self):
        if self.active:
            import torch.distributed as td

            if self.backend == "nccl":
                td.barrier(device_ids=[self.local_rank])
            else:
                td.barrier()

    def summary(self) -> dict:
        out = {"world_size": self.world, "backend": self.backend, "device": self.device}
        if self.fsdp is not None:
            out["fsdp"] = self.fsdp.summary()
        return out


_CURRENT = Dist()


def current() -> Dist:
    """The Dist of this process (one process until :func:`setup` joined a group)."""
    return _CURRENT


def launched() -> bool:
    """Started by torchrun / accelerate launch (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def setup(device: Optional[str] = None, fsdp: Optional["FsdpConfig"] = None) -> Dist:
    """Resolve the device and, under a launcher, join the process group (gloo on CPU, NCCL on CUDA).
    Idempotent. The collective timeout is ``FIRST_EDGE_DIST_TIMEOUT`` seconds (default 1800).

    ``fsdp``: the caller shards its model with accelerate's FSDP config (:func:`fsdp_config`; only the e2e
    recipe of export.finetune does). Launched with that config, a caller that does not is refused (one
    line) rather than silently holding the whole model in every process."""
    global _CURRENT
    if fsdp is None and fsdp_requested():
        raise FirstEdgeError("accelerate's FSDP config (ACCELERATE_USE_FSDP) is only used by export.finetune "
                             "--recipe e2e; launch this with configs/accelerate_multi.yaml or torchrun (every "
                             "process then holds the whole model)")
    dev = resolve_device(device)
    if _CURRENT.active:
        if not _CURRENT.device.startswith(dev):
            raise FirstEdgeError(f"the process group runs on {_CURRENT.device}, not {dev}")
        _CURRENT.fsdp = fsdp
        return _CURRENT
    if not launched():
        _CURRENT = Dist(device="cuda:0" if dev == "cuda" else "cpu")
        if dev == "cuda":
            torch.cuda.set_device(0)
        return _CURRENT
    import torch.distributed as td

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if dev == "cuda":
        if local >= torch.cuda.device_count():
            raise FirstEdgeError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); "
                                 f"use --nproc_per_node <= {torch.cuda.device_count()}")
        torch.cuda.set_device(local)
        backend, device_name = "nccl", f"cuda:{local}"
    else:
        backend, device_name = "gloo", "cpu"
    if not td.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("FIRST_EDGE_DIST_TIMEOUT", "1800")))
        kw = {"device_id": torch.device(device_name)} if backend == "nccl" else {}
        td.init_process_group(backend=backend, init_method="env://", timeout=timeout, **kw)
    world = td.get_world_size()
    _CURRENT = Dist(rank=td.get_rank(), world=world, local_rank=local, device=device_name, backend=backend,
                    fsdp=fsdp if world > 1 else None)
    return _CURRENT


def teardown():
    """Leave the process group (at the end of a CLI run)."""
    global _CURRENT
    if _CURRENT.active:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
    _CURRENT = Dist()


def working_copy(fm, dtype: str, device: str, share_routers: bool = True):
    """The model the heavy steps run: ``fm`` itself for fp32 on the CPU, else a copy of the frozen base in
    ``dtype`` on ``device`` whose routers (fp32) are ``fm``'s own, moved to ``device`` (training), or
    with ``share_routers=False`` a copy of them (evaluation: ``fm`` stays whole on the CPU). ``fm``
    keeps its fp32 weights (its identity and the saved routers come from it)."""
    import copy

    dt = DTYPES[dtype]
    dev = torch.device(device)
    if dt == torch.float32 and dev.type == "cpu":
        return fm
    routers, fm.routers = fm.routers, None
    try:
        work = copy.deepcopy(fm)
    finally:
        fm.routers = routers
    if not share_routers:
        routers = copy.deepcopy(routers)
    routers.to(dev)
    work.routers = routers
    work.hf.to(device=dev, dtype=dt)
    work.to(dev)  # buffers (pinned mask, rotary frequencies)
    return work


# ------------------------------------------------------------------ FSDP (accelerate's FSDP config)
_TRUE = ("1", "true", "yes", "on")


def fsdp_requested() -> bool:
    """Launched with an accelerate FSDP config (``accelerate launch`` exports ``ACCELERATE_USE_FSDP=true``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in _TRUE


@dataclass
class FsdpConfig:
    """The settings of accelerate's FSDP config that the sharding honours (docs/scale-out.md "FSDP")."""
    reshard_after_forward: bool = True   # fsdp_reshard_after_forward (false: keep gathered until backward)
    cpu_offload: bool = False            # fsdp_offload_params (CUDA only: shards live in host RAM)
    wrap_classes: tuple = ()             # fsdp_transformer_layer_cls_to_wrap (one must name the decoder layer)

    def summary(self) -> dict:
        return {"version": 2, "reshard_after_forward": self.reshard_after_forward, "cpu_offload": self.cpu_offload,
                "units": "one per decoder layer, the embedding, the final norm with the head (tied: with the "
                         "embedding); routers whole on every rank"}


def fsdp_config() -> Optional[FsdpConfig]:
    """accelerate's FSDP settings, read from the environment ``accelerate launch`` sets by accelerate's own
    ``FullyShardedDataParallelPlugin``; None when not launched with an FSDP config. What the sharding
    cannot honour is a one-line error (FSDP1, activation checkpointing, sharded state dicts, a wrap policy
    other than per transformer layer, accelerate's mixed precision instead of ``--dtype``)."""
    if not fsdp_requested():
        return None
    from runtime.errors import first_line

    try:
        from accelerate.utils import FullyShardedDataParallelPlugin
    except ImportError:
        raise FirstEdgeError("accelerate's FSDP config needs the 'accelerate' package") from None
    try:
        plugin = FullyShardedDataParallelPlugin()
    except Exception as e:  # noqa: BLE001 - accelerate's own validation of its settings
        raise FirstEdgeError(f"accelerate's FSDP config: {first_line(e, 200)}") from None
    if int(plugin.fsdp_version) != 2:
        raise FirstEdgeError(f"accelerate's FSDP config: fsdp_version {plugin.fsdp_version} is not supported; "
                             "set fsdp_version: 2 (PyTorch's fully_shard)")
    if plugin.activation_checkpointing:
        raise FirstEdgeError("accelerate's FSDP config: fsdp_activation_checkpointing is not supported "
                             "(set it to false)")
    sdt = getattr(plugin.state_dict_type, "name", str(plugin.state_dict_type))
    if sdt != "FULL_STATE_DICT":
        raise FirstEdgeError(f"accelerate's FSDP config: fsdp_state_dict_type {sdt} is not supported; rank 0 "
                             "writes full (gathered) tensors: set FULL_STATE_DICT")
    policy = getattr(plugin.auto_wrap_policy, "__name__", str(plugin.auto_wrap_policy))
    if policy != "transformer_auto_wrap_policy":
        raise FirstEdgeError(f"accelerate's FSDP config: fsdp_auto_wrap_policy {os.environ.get('FSDP_AUTO_WRAP_POLICY', 'NO_WRAP')} "
                             "is not supported; FiRST shards one unit per decoder layer: set TRANSFORMER_BASED_WRAP")
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if mp not in ("", "no"):
        raise FirstEdgeError(f"accelerate's mixed_precision '{mp}' is not used: set mixed_precision: 'no' and give "
                             "the frozen model's precision with --dtype bf16|fp16|fp32")
    offload = type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy" or plugin.cpu_offload is True
    names = tuple(n.strip() for n in (plugin.transformer_cls_names_to_wrap or ()) if n and n.strip())
    return FsdpConfig(reshard_after_forward=bool(plugin.reshard_after_forward), cpu_offload=offload,
                      wrap_classes=names)


class FsdpRoot(torch.nn.Module):
    """The FSDP root over the working model: ``root(fn, *args)`` runs ``fn(*args)`` (a whole forward made of
    ``FirstModel``'s pieces) inside the root's forward, so FSDP's root bookkeeping (lazy init, the
    post-backward callback) spans every unit ``fn`` calls. Without FSDP the caller runs ``fn`` directly."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, fn, *args):
        return fn(*args)


def _unit_modules(fm) -> List[List[torch.nn.Module]]:
    """The FSDP units of a (peft-wrapped or plain) Llama-family FirstModel: per decoder layer the modules
    ``FirstModel.layer`` calls, then the embedding and the final norm with the head (with the embedding
    when the head is tied to it)."""
    base = fm.base
    units = []
    for lay in fm.layers:
        att = lay.self_attn
        units.append([lay.input_layernorm, att.q_proj, att.k_proj, att.v_proj, att.o_proj,
                      lay.post_attention_layernorm, lay.mlp])
    m = fm.hf.get_base_model() if hasattr(fm.hf, "get_base_model") else fm.hf
    head = m.lm_head
    if getattr(head, "weight", None) is not None and head.weight is base.embed_tokens.weight:
        units.append([base.embed_tokens, base.norm, head])
    else:
        units += [[base.embed_tokens], [base.norm, head]]
    return units


def _place(mods: Sequence[torch.nn.Module], dev: torch.device, dt: torch.dtype):
    """Move the parameters of ``mods`` to ``dev``: frozen ones in the working precision ``dt``, trainable
    ones (LoRA) kept in their own (fp32). A parameter already in place is kept as is (it may be ``fm``'s
    own, which FSDP copies into its shards and does not change); ties within ``mods`` are kept; parameters
    already sharded are left alone."""
    done: dict = {}
    for mod in mods:
        for sub in mod.modules():
            for k, p in list(sub._parameters.items()):
                if p is None or is_sharded(p):
                    continue
                if id(p) in done:
                    sub._parameters[k] = done[id(p)]
                    continue
                want = p.dtype if (p.requires_grad or not p.is_floating_point()) else dt
                q = p
                if p.device != dev or p.dtype != want:
                    q = torch.nn.Parameter(p.detach().to(device=dev, dtype=want), requires_grad=p.requires_grad)
                done[id(p)] = q
                sub._parameters[k] = q


def fsdp_working_copy(fm, dtype: str, device: str, dist: Dist, before_shard=None):
    """The e2e recipe's working model sharded with FSDP2 over ``dist``'s ranks. Returns (work, root).

    ``work`` is a copy of ``fm``'s module tree that at first shares ``fm``'s (fp32, CPU) weights, so no
    whole second copy is made; ``before_shard(work)`` runs on it (the LoRA adapters are attached here, on
    the CPU in fp32, so they start from the values the unsharded path gives them); then unit by unit the
    weights are put on the device in ``dtype`` and sharded, so a device holds at most one whole unit plus
    its shards. The routers are ``fm``'s own (fp32, on the device, whole on every rank). FSDP sums the
    gradients over ranks (no division: the loss is already formed from global sums, ``Dist.globalize``).
    Every rank must then run the same sequence of forwards and backwards through ``root``."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    cfg = dist.fsdp
    if cfg is None or not dist.active:
        raise FirstEdgeError("FSDP needs a process group of 2 or more processes")
    dt, dev = DTYPES[dtype], torch.device(device)
    routers, fm.routers = fm.routers, None
    try:
        work = copy.deepcopy(fm, {id(p): p for p in fm.hf.parameters()})  # the tree, not the weights
    finally:
        fm.routers = routers
    routers.to(dev)
    work.routers = routers
    for mod in work.modules():  # buffers (rotary frequencies, pinned mask): copies, small
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device != dev:
                mod._buffers[k] = b.to(dev)
    if before_shard is not None:
        before_shard(work)
    cls = type(work.layers[0]).__name__
    if cfg.wrap_classes and cls not in cfg.wrap_classes:
        raise FirstEdgeError(f"accelerate's FSDP config: fsdp_transformer_layer_cls_to_wrap {','.join(cfg.wrap_classes)} "
                             f"does not name this model's decoder layer {cls}")
    mesh = init_device_mesh(dev.type, (dist.world,))
    kw = dict(mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    if cfg.cpu_offload:
        if dev.type != "cuda":
            raise FirstEdgeError("accelerate's FSDP config: fsdp_offload_params needs --device cuda (on the CPU "
                                 "the shards already are in host memory): set it to false")
        kw["offload_policy"] = CPUOffloadPolicy()
    for mods in _unit_modules(work):  # the whole unit on the device only until it is sharded
        _place(mods, dev, dt)
        fully_shard(mods if len(mods) > 1 else mods[0], **kw)
    _place([work.hf], dev, dt)  # anything left (none in Llama-family models): the root holds it
    root = FsdpRoot(work.hf)
    fully_shard(root, **kw)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM / AVG
            if hasattr(m, "set_reduce_scatter_unused_params"):
                m.set_reduce_scatter_unused_params(True, recurse=False)
    return work, root


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_numel(t) -> int:
    """Elements of ``t`` held by this rank (the local shard of an FSDP parameter)."""
    return int(t.to_local().numel()) if is_sharded(t) else int(t.numel())


def shard_report(model, dist: Dist) -> dict:
    """What each rank holds of ``model``'s parameters (gathered; every rank must call it): frozen and
    trainable elements and bytes on each rank, and the whole model's. What routers.json records under
    ``train.distributed.fsdp_shards`` and the tests check (sharding that silently did not happen shows)."""
    frozen = trainable = fb = tb = total = total_b = 0
    for p in model.parameters():
        n, sz = local_numel(p), p.element_size()
        total += int(p.numel())
        total_b += int(p.numel()) * sz
        if p.requires_grad:
            trainable += n
            tb += n * sz
        else:
            frozen += n
            fb += n * sz
    mine = {"frozen": frozen, "trainable": trainable, "frozen_bytes": fb, "trainable_bytes": tb}
    allr = dist.gather(mine)
    return {"total_params": total, "total_bytes": total_b,
            **{k: [r[k] for r in allr] for k in ("frozen", "trainable", "frozen_bytes", "trainable_bytes")}}


def full_tensors(named: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """{name: the whole tensor on the CPU} (an FSDP parameter is gathered: every rank must call this, with
    the same names in the same order)."""
    out = {}
    for n in named:
        t = named[n].detach()
        out[n] = (t.full_tensor() if is_sharded(t) else t).cpu().clone()
    return out


def full_optimizer_state(opt) -> dict:
    """``opt.state_dict()`` with the state of sharded parameters gathered (whole CPU tensors): the format of
    an unsharded optimizer's state dict, so a checkpoint is read by any number of processes, with or
    without FSDP. Every rank must call it."""
    sd = opt.state_dict()
    state = {}
    for k in sorted(sd["state"]):
        state[k] = {n: ((v.full_tensor() if is_sharded(v) else v).cpu().clone() if torch.is_tensor(v) else v)
                    for n, v in sd["state"][k].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _shard_like(full: torch.Tensor, p) -> torch.Tensor:
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.detach().to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements,
                             src_data_rank=None)  # every rank read the same whole tensor: no communication


def load_full(p, full: torch.Tensor):
    """Copy a whole tensor into parameter ``p`` (its local shard if ``p`` is sharded)."""
    with torch.no_grad():
        p.copy_(_shard_like(full, p) if is_sharded(p) else full.to(device=p.device, dtype=p.dtype))


def load_optimizer_state(opt, sd: dict):
    """Load a whole (unsharded-format) optimizer state dict into ``opt`` whose parameters may be sharded."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for k, st in sd["state"].items():
        p = params[int(k)]
        state[k] = {n: (_shard_like(v, p) if is_sharded(p) and torch.is_tensor(v) and v.dim() > 0 else v)
                    for n, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
