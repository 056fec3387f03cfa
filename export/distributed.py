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
        return {"world_size": self.world, "backend": self.backend, "device": self.device}


_CURRENT = Dist()


def current() -> Dist:
    """The Dist of this process (one process until :func:`setup` joined a group)."""
    return _CURRENT


def launched() -> bool:
    """Started by torchrun / accelerate launch (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def setup(device: Optional[str] = None) -> Dist:
    """Resolve the device and, under a launcher, join the process group (gloo on CPU, NCCL on CUDA).
    Idempotent. The collective timeout is ``FIRST_EDGE_DIST_TIMEOUT`` seconds (default 1800)."""
    global _CURRENT
    dev = resolve_device(device)
    if _CURRENT.active:
        if not _CURRENT.device.startswith(dev):
            raise FirstEdgeError(f"the process group runs on {_CURRENT.device}, not {dev}")
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
    _CURRENT = Dist(rank=td.get_rank(), world=td.get_world_size(), local_rank=local, device=device_name,
                    backend=backend)
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
