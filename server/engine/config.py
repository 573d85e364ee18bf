"""Engine settings: the `actserve serve` flags that shape the engine, with their defaults in one place."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any

from actserve.server.models.builder import LoadConfig

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded default model
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int = 64
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True  # reuse the KV of full prompt blocks other requests computed
    # beside decodes, a prefill chunk's attention over its context counts against the token budget
    # (Scheduler); None: on for CUDA
    attention_aware_chunks: bool | None = None
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0  # CPU: KV cache size when not given in blocks
    # host tier of the KV cache (GiB of pinned host memory): cold blocks of sequences whose plugin allows
    # it (`kv_residency`) move there; 0: none
    kv_offload_gb: float = 0.0
    gpu_memory_utilization: float = 0.85  # CUDA: weights + KV + workspace within this share of the GPU
    enforce_eager: bool = False  # CUDA: no decode or prefill graphs
    cuda_graph_prefill_len: int = 512  # CUDA: single fresh prompts up to this many tokens prefill from graphs
    overlap_steps: bool | None = None  # None: on for CUDA; launch step N+1 before step N is post-processed
    load_format: str = "auto"  # "dummy": random weights of the right shapes (benchmarks)
    allow_pickle_weights: bool = False
    force_transformers: bool = False  # serve a native family through the transformers fallback
    quantization: str | None = None  # "nvfp4" / "mxfp4": projections quantized to FP4 at load
    quantization_method: str = "rtn"  # rtn / search / gptq: how projections become FP4 at load
    # expert offloading of MoE models (docs/architecture.md §5): device expert slots in GiB over all MoE
    # layers, or a fraction of each layer's experts (one of them); prefetch depth, CPU compute mode, zero
    # copy of misses, and the misses in a row that copy an expert into a slot between zero-copy steps
    expert_cache_gb: float | None = None
    resident_experts: float | None = None
    expert_prefetch_depth: int | None = None
    expert_cpu_compute: str | None = None
    expert_zero_copy: str | None = None
    expert_admit_after: int | None = None
    seed: int = 0
    # plugin name -> that plugin's options (opaque to the engine; the CLI fills them from plugin flags)
    plugin_options: dict[str, Any] = field(default_factory=dict)
    engine_process: str = "auto"  # "on": engine core in its own process; "off": a thread; auto: on for CUDA
    cpu_threads: int | None = None  # torch threads of the engine; None: OMP_NUM_THREADS, else cores - 1
    stall_timeout: float = 60.0  # seconds without progress after which the engine counts as stalled
    # tensor parallelism (docs/architecture.md §12): ranks the model is split over (rank 0 runs this engine,
    # the others run tp_worker.py), and the CUDA all-reduce: "nccl" (in CUDA graphs) or "symm_mem"
    tensor_parallel_size: int = 1
    tp_allreduce: str = "nccl"

    def load_config(self) -> LoadConfig:
        """The part of these settings that loading the model needs (models sit below the engine)."""
        return LoadConfig(**{f.name: getattr(self, f.name) for f in fields(LoadConfig)})


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def engine_cpu_threads(requested: int | None) -> tuple[int, str]:
    """The engine's torch thread count and where it comes from. By default it leaves the API process a
    core: on a busy machine an OpenMP team as large as the machine has one thread preempted mid-barrier
    by HTTP work and every step waits for it (2 cores: 15 s decode steps with 2 threads, 9 s with 1)."""
    if requested is not None:
        return requested, "--cpu-threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = available_cores()
    return max(1, cores - 1), f"{cores} cores, one left to the API process"


def apply_cpu_threads(requested: int | None) -> int:
    """Set the calling thread's torch thread count (the engine thread, or the core process's main thread:
    with OpenMP the setting is per thread) and log it."""
    import torch

    n, why = engine_cpu_threads(requested)
    torch.set_num_threads(n)
    log.info("engine uses %d CPU thread(s) (%s)", n, why)
    return n
