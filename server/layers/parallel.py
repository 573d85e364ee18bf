"""Tensor parallelism as the layers see it: this rank, the world size and the few collectives they call
(docs/architecture.md §12).

Every collective of the forward goes through one `Communicator`, so the all-reduce implementation can be
swapped in one place: torch.distributed's (gloo on the CPU, NCCL on CUDA, also inside CUDA graphs) or, on
CUDA and for small messages, torch's symmetric-memory one-shot all-reduce (`allreduce="symm_mem"`).

The layers take the communicator that is current while the model is built (`use`); a model built outside
`use` gets `SINGLE` (one rank: every collective is the identity and the parallel layers are not used), so
a server without tensor parallelism runs exactly the code it ran before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

ALLREDUCE_CHOICES = ("nccl", "symm_mem")
# symmetric-memory one-shot all-reduce: messages up to this size (a batch-64 bf16 residual of an 8192-wide
# model is 1 MiB; larger ones take NCCL, whose bandwidth-bound algorithms win there)
SYMM_MEM_MAX_BYTES = 1 << 20


class Communicator:
    """One tensor-parallel group: `rank` of `world` ranks, the compute `group` (None: the default group)."""

    def __init__(self, rank: int = 0, world: int = 1, group: Any = None) -> None:
        self.rank, self.world, self.group = rank, world, group
        self.symm: SymmMemAllReduce | None = None  # CUDA one-shot all-reduce for small messages

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def split(self, n: int, what: str) -> int:
        """This rank's share of `n` (heads, channels) split evenly; ValueError naming `what` otherwise."""
        if n % self.world:
            raise ValueError(f"{what} ({n}) is not divisible by --tensor-parallel-size {self.world}")
        return n // self.world

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks (in place where the implementation allows; use the result)."""
        if self.world == 1:
            return x
        if self.symm is not None and self.symm.takes(x):
            return self.symm.all_reduce(x)
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def gather_columns(self, x: torch.Tensor, total: int) -> torch.Tensor | None:
        """Each rank's [rows, k] columns side by side on rank 0, cut to `total` columns (the padded
        vocabulary's real size); None on the other ranks. On CUDA every rank gathers (NCCL's all-gather is
        the collective that is known to capture in CUDA graphs); the other ranks drop the result."""
        if self.world == 1:
            return x[:, :total] if x.shape[1] != total else x
        import torch.distributed as dist

        x = x.contiguous()
        if x.is_cuda:
            out = torch.empty(self.world, *x.shape, dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.group)
            parts = list(out.unbind(0))
        else:
            parts = [torch.empty_like(x) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(x, parts, dst=0, group=self.group)
        if self.rank != 0:
            return None
        assert parts is not None
        return torch.cat(parts, dim=1)[:, :total]

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank (in place)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast(x, src=0, group=self.group)
        return x

    def agree_min(self, value: int) -> int:
        """The smallest of the ranks' `value`s, on every rank (e.g. KV blocks that fit on all of them)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        device = "cuda" if torch.cuda.is_available() and dist.get_backend(self.group) == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


def dist_world() -> Any:
    """torch.distributed's default group (the tensor-parallel group spans every rank)."""
    import torch.distributed as dist

    return dist.group.WORLD


SINGLE = Communicator()
_current: Communicator = SINGLE


def current() -> Communicator:
    """The communicator of the model being built (`use`), else `SINGLE`."""
    return _current


@contextlib.contextmanager
def use(comm: Communicator) -> Iterator[Communicator]:
    """Build a model's layers for `comm`'s rank (they keep it for their forward)."""
    global _current
    before, _current = _current, comm
    try:
        yield comm
    finally:
        _current = before


def shard_range(n: int, comm: Communicator) -> tuple[int, int]:
    """(start, size) of this rank's contiguous share of `n` rows split evenly."""
    size = n // comm.world
    return comm.rank * size, size


# --- CUDA only, not testable on the CPU: torch symmetric memory's one-shot all-reduce --------------------
class SymmMemAllReduce:
    """All-reduce of small messages through torch's symmetric memory (one-shot: every rank reads all
    peers' buffers over NVLink and sums, one kernel, no NCCL protocol): the batch-1 decode messages
    (8-16 KB) are latency-bound, where NCCL's ring/tree setup dominates. One rendezvoused buffer serves
    every call: `one_shot_all_reduce_copy_out` copies the message into it inside the kernel, behind the
    kernel's barrier, so a rank never overwrites its buffer while a peer still reads the previous message
    from it (a plain copy before `one_shot_all_reduce_out` could). Chosen by `--tp-allreduce symm_mem`;
    bench/tp_bench.py measures it beside NCCL. Untested on the CPU (needs 2 GPUs)."""

    def __init__(self, group: Any, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.dtype = dtype
        self.max_elems = SYMM_MEM_MAX_BYTES // torch.tensor([], dtype=dtype).element_size()
        self.buf = symm_mem.empty(self.max_elems, dtype=dtype, device=device)
        name = group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            enable(name)
        symm_mem.rendezvous(self.buf, name)
        self.group_name = name

    def takes(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.dtype == self.dtype and x.numel() <= self.max_elems

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        out = torch.empty_like(flat)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(
            self.buf[: flat.numel()], flat, "sum", self.group_name, out
        )
        return out.view_as(x)
