"""A tensor-parallel rank other than 0 (docs/architecture.md §12): it loads its shards, sizes its KV
cache and captures its CUDA graphs in step with rank 0 (the same `model_setup` calls), then runs the
forwards rank 0 sends, one `StepMessage` per step, and takes part in their collectives. It schedules
nothing, samples nothing and serves no HTTP; it exits on `Shutdown`, when rank 0's messages stop, when
the process that spawned it is gone, and on any error of its own (the others then stop too).

Started by rank 0 (`tp_group.start_rank0`, one host) or by torchrun (`actserve serve` with RANK above 0).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import replace

import torch

from actserve.server.engine.config import EngineConfig, apply_cpu_threads
from actserve.server.engine.model_setup import build_runner, load_and_size, step_budget
from actserve.server.engine.tp_group import RankEnv, TPGroup, env_ranks
from actserve.server.engine.tp_ops import ForwardOp, Shutdown, StepMessage, local_hooks
from actserve.server.engine.watchdog import exit_with_parent
from actserve.server.models.builder import resolve_device

log = logging.getLogger(__name__)


def run_rank(config: EngineConfig, env: RankEnv) -> None:
    """Load, size and capture as rank 0 does, then run its messages until told to stop."""
    device = resolve_device(config.device)
    load = replace(config.load_config(), max_num_batched_tokens=step_budget(config, device))
    group = TPGroup(env, device)
    loaded, registry, _ = load_and_size(config, load, group.comm)
    runner = build_runner(loaded, config, registry)
    group.report_memory(loaded, runner.kv_bytes)
    shared = registry.fused.fused_table() if registry.fused is not None else None
    dev = loaded.info.device
    log.info("tensor-parallel rank %d ready (%d KV blocks)", env.rank, loaded.num_blocks)
    with torch.inference_mode():
        while True:
            msg = group.recv()
            if msg is None:  # a heartbeat
                continue
            if isinstance(msg, Shutdown):
                break
            assert isinstance(msg, StepMessage), type(msg)
            registry.replay(msg.journal)
            for op in msg.ops:
                if isinstance(op, ForwardOp):
                    op.hooks = local_hooks(op.hooks, shared, dev)
                runner.run_op(op)
    log.info("tensor-parallel rank %d stopping", env.rank)
    import torch.distributed as dist

    dist.destroy_process_group()


def worker_main(config: EngineConfig, env: RankEnv, parent: int, log_level: int) -> None:
    """Entry point of a rank spawned by rank 0 on this host (`parent`: rank 0's pid)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0's server stops us in order
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent(parent, what=f"tensor-parallel rank {env.rank}")
    fmt = f"%(asctime)s %(levelname)s rank{env.rank}[{os.getpid()}] %(name)s: %(message)s"
    logging.basicConfig(level=log_level, format=fmt)
    _run(config, env)


def worker_from_env(config: EngineConfig) -> int:
    """`actserve serve` under torchrun with RANK above 0: this process is a worker rank."""
    env = env_ranks(config.tensor_parallel_size)
    assert env is not None and env.rank > 0
    _run(config, env)
    return 0


def _run(config: EngineConfig, env: RankEnv) -> None:
    apply_cpu_threads(config.cpu_threads)
    try:
        run_rank(config, env)
    except BaseException:  # noqa: BLE001 - the other ranks see this rank go and stop
        log.exception("tensor-parallel rank %d failed", env.rank)
        logging.shutdown()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
