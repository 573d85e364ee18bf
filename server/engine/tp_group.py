"""Tensor parallelism's processes and their channels, rank 0's side (docs/architecture.md §12).

Ranks come from the environment as torchrun sets it (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`,
`LOCAL_RANK`), so the same command runs across hosts; a server started alone with
`--tensor-parallel-size N` spawns the N-1 other ranks itself on this host (`tp_worker.worker_main`). Two
process groups: the compute group (NCCL on CUDA, gloo on the CPU) for the forward's collectives, and a
gloo control group over which rank 0 broadcasts one `StepMessage` per step (and a heartbeat while idle).

Failure: the other ranks exit when rank 0's messages stop (its broadcast fails, or nothing arrives for
`CONTROL_TIMEOUT_S`). Rank 0 marks the group dead when a send fails or a rank it spawned exits; the next
step then raises a fatal `TensorParallelError` (the engine stops: 503s, exit 1), and if the engine is idle
the process exits by itself after `EXIT_GRACE_S`, so a dead rank never leaves a server that hangs.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist

from actserve.interventions.registry import InterventionRegistry, check_tp_options
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.tp_ops import (
    ON_DEVICE,
    ForwardOp,
    GraphDecodeOp,
    Op,
    Shutdown,
    StepMessage,
    TensorParallelError,
    portable_hooks,
)
from actserve.server.layers.parallel import ALLREDUCE_CHOICES, Communicator
from actserve.server.models.builder import LoadConfig, LoadedModel, check_config

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # rank 0 sends a heartbeat when it sent nothing for this long
CONTROL_TIMEOUT_S = 60.0  # the other ranks give up on rank 0 after this long without a message
# the compute group's collectives: the first ones wait for every rank to load its weights
COMPUTE_TIMEOUT_S = float(os.environ.get("ACTSERVE_TP_TIMEOUT_S", 1800))
EXIT_GRACE_S = 5.0  # after a rank died: time for the engine to fail by itself before the process exits
FLAG = "--tensor-parallel-size"


@dataclass(frozen=True)
class RankEnv:
    """Where this process sits in the tensor-parallel world, and how the ranks meet."""

    rank: int
    world: int
    local_rank: int  # the GPU index on this host
    init_method: str


def env_ranks(tp: int) -> RankEnv | None:
    """The torchrun-style environment of this process (None when WORLD_SIZE is not set or is 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    if world != tp:
        raise ValueError(f"{FLAG} {tp}, but the environment says WORLD_SIZE={world}: give the same number")
    rank = int(os.environ.get("RANK", "0"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(key):
            raise ValueError(f"WORLD_SIZE={world} is set but {key} is not (set it as torchrun does)")
    return RankEnv(rank, world, int(os.environ.get("LOCAL_RANK", rank)), "env://")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_tp_config(config: EngineConfig, load: LoadConfig, device: torch.device) -> None:
    """Refuse what tensor parallelism cannot do before any other rank starts (messages name the flag)."""
    tp = config.tensor_parallel_size
    if config.tp_allreduce not in ALLREDUCE_CHOICES:
        raise ValueError(
            f"--tp-allreduce must be one of {', '.join(ALLREDUCE_CHOICES)}, got {config.tp_allreduce!r}"
        )
    if config.tp_allreduce == "symm_mem" and device.type != "cuda":
        raise ValueError("--tp-allreduce symm_mem needs CUDA GPUs (the CPU all-reduces through gloo)")
    if config.kv_offload_gb > 0:
        raise ValueError(
            f"--kv-offload-gb is not supported with {FLAG} {tp} (the host KV tier is one rank's)"
        )
    if device.type == "cuda" and env_ranks(tp) is None and torch.cuda.device_count() < tp:
        raise ValueError(f"{FLAG} {tp} needs {tp} GPUs on this host; torch sees {torch.cuda.device_count()}")
    check_tp_options(None, config.plugin_options, tp)
    check_config(load)


class TPGroup:
    """The process groups of this rank; on rank 0 also the ranks it spawned and the step channel."""

    def __init__(self, env: RankEnv, device: torch.device, workers: list[BaseProcess] | None = None) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(env.local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=env.init_method, rank=env.rank, world_size=env.world,
            timeout=timedelta(seconds=COMPUTE_TIMEOUT_S),
        )  # fmt: skip
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
        self.rank, self.world = env.rank, env.world
        self.comm = Communicator(env.rank, env.world)
        self.workers = workers or []
        self.dead: str | None = None
        self.rank_memory: list[dict[str, int]] = []  # each rank's weights and KV bytes (rank 0)
        self._lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._serving = self._closed = False
        self._registry: InterventionRegistry | None = None
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.rank == 0:  # before multiprocessing's own exit hook joins the ranks spawned here
            atexit.register(self.close)
        log.info("tensor parallelism: rank %d of %d (%s)", env.rank, env.world, backend)

    # -- both sides ---------------------------------------------------------------------------------
    def report_memory(self, loaded: LoadedModel, kv_bytes: int) -> None:
        """Every rank's weights and KV cache bytes, gathered on rank 0 once they are final."""
        mine = {"rank": self.rank, "weights": loaded.weights_bytes, "kv_cache": kv_bytes}
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, out, dst=0, group=self.control)
        if out is not None:
            self.rank_memory = out

    def recv(self) -> Any:
        """The next message from rank 0 (the other ranks)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    # -- rank 0 -------------------------------------------------------------------------------------
    def serve(self, runner: Any, registry: InterventionRegistry, loaded: LoadedModel) -> None:
        """From now on `runner` sends each step's ops (and `registry` its plugins' activations) to the
        other ranks, and a thread keeps them alive and watches the spawned ones."""
        self.report_memory(loaded, runner.kv_bytes)
        self._registry = registry
        self._shared = registry.fused.fused_table() if registry.fused is not None else None
        registry.journal = []
        runner.mirror = self.send_ops
        self._serving = True
        threading.Thread(target=self._watch, name="actserve-tp-watch", daemon=True).start()

    def send_ops(self, ops: list[Op]) -> None:
        """One message: the plugins' journal and the step's ops, as the other ranks need them."""
        assert self._registry is not None
        journal = self._registry.take_journal()
        self.send(StepMessage(journal, [self._portable(op) for op in ops]))

    def _portable(self, op: Op) -> Op:
        marker = ON_DEVICE if getattr(op, "device_ids", None) is not None else None
        if isinstance(op, ForwardOp):
            hooks = portable_hooks(op.hooks, self._shared if op.shared_table else None)
            return replace(op, hooks=hooks, device_ids=marker)
        if isinstance(op, GraphDecodeOp):
            # graph-safe plugins under tensor parallelism act on rank 0's logits only: no rows to send
            return replace(op, plugin_rows=dict.fromkeys(op.plugin_rows), device_ids=marker)
        return op

    def send(self, msg: Any) -> None:
        """Broadcast `msg` to the other ranks (None: a heartbeat); TensorParallelError once one is gone."""
        with self._lock:
            if self.dead is not None:
                raise TensorParallelError(f"tensor parallelism is down: {self.dead}")
            try:
                dist.broadcast_object_list([msg], src=0, group=self.control)
            except Exception as e:
                self.dead = f"sending to the other ranks failed ({e})"
                raise TensorParallelError(f"tensor parallelism is down: {self.dead}") from e
            self._last_sent = time.monotonic()

    def _watch(self) -> None:
        """Heartbeats while rank 0 sends nothing else, and the liveness of the ranks it spawned."""
        while not self._closed:
            time.sleep(0.2)
            if self._closed:
                return
            for i, p in enumerate(self.workers):
                if not p.is_alive() and self.dead is None:
                    self.dead = f"rank {i + 1} (pid {p.pid}) exited with code {p.exitcode}"
            if self.dead is None and time.monotonic() - self._last_sent >= HEARTBEAT_S:
                try:
                    self.send(None)
                except TensorParallelError:
                    pass
            if self.dead is not None and not self._closed:
                log.critical("%s; this server stops", self.dead)
                time.sleep(EXIT_GRACE_S)  # the engine fails its next step (503s) and exits by itself ...
                if not self._closed:
                    log.critical("tensor parallelism is down (%s): exiting", self.dead)
                    os._exit(1)  # ... or, idle, it would never notice: exit for the supervisor
                return

    def close(self) -> None:
        """Stop the other ranks (in order when serving; the spawned ones are killed if they linger) and
        leave the process groups, so another engine may start in this process."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._serving and self.dead is None:
            try:
                with self._lock:
                    dist.broadcast_object_list([Shutdown()], src=0, group=self.control)
            except Exception:  # noqa: BLE001 - they are gone already
                pass
        for p in self.workers:
            p.join(10 if self._serving else 0)
            if p.is_alive():
                p.kill()
                p.join(5)
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.debug("destroying the process groups failed", exc_info=True)


def start_rank0(
    config: EngineConfig, load: LoadConfig, device: torch.device, worker_main: Callable[..., None]
) -> TPGroup:
    """This process as rank 0: checks what can be refused first, spawns the other ranks on this host
    (each runs `worker_main(config, RankEnv, parent pid, log level)`: tp_worker.py) unless the
    environment (torchrun) started them, and joins the process groups."""
    tp = config.tensor_parallel_size
    check_tp_config(config, load, device)
    env = env_ranks(tp)
    workers: list[BaseProcess] = []
    if env is not None and env.rank != 0:
        raise ValueError(
            f"this process is RANK={env.rank}: the engine runs on rank 0, the other ranks run the model only "
            "(`actserve serve` does that by itself when RANK is above 0)"
        )
    if env is None:
        port = free_port()
        env = RankEnv(0, tp, 0, f"tcp://127.0.0.1:{port}")
        ctx = mp.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        for rank in range(1, tp):
            rank_env = RankEnv(rank, tp, rank, env.init_method)
            args = (config, rank_env, os.getpid(), level)
            p = ctx.Process(target=worker_main, args=args, name=f"actserve-tp-rank{rank}", daemon=True)
            p.start()
            workers.append(p)
            log.info("tensor parallelism: started rank %d (pid %d)", rank, p.pid)
    try:
        return TPGroup(env, device, workers)
    except BaseException:
        for p in workers:
            p.kill()
        raise
