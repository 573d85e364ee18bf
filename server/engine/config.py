"""Engine settings: the `actserve serve` flags that shape the engine, with their defaults in one place."""

from __future__ import annotations

from dataclasses import dataclass


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
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0  # CPU: KV cache size when not given in blocks
    gpu_memory_utilization: float = 0.85  # CUDA: weights + KV + workspace within this share of the GPU
    enforce_eager: bool = False  # CUDA: no decode or prefill graphs
    cuda_graph_prefill_len: int = 512  # CUDA: single fresh prompts up to this many tokens prefill from graphs
    overlap_steps: bool | None = None  # None: on for CUDA; launch step N+1 before step N is post-processed
    load_format: str = "auto"  # "dummy": random weights of the right shapes (benchmarks)
    allow_pickle_weights: bool = False
    force_transformers: bool = False  # serve a native family through the transformers fallback
    seed: int = 0
    steering_vectors_dir: str | None = None  # named steering vectors: preloaded, and new ones saved here
    cot_compression: str | None = None  # ASC artifact (`actserve cot build`): enables cot_compression
    engine_process: str = "auto"  # "on": engine core in its own process; "off": a thread; auto: on for CUDA
