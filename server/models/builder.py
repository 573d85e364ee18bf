"""From a `LoadConfig` to a loaded model, its tokenizer, its `ModelInfo` and its KV cache size.

Models sit below the engine: the engine turns its `EngineConfig` into a `LoadConfig`
(`EngineConfig.load_config`) and builds the runner from the `LoadedModel` (`build_runner`,
server/engine/llm_engine.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from actserve.server.contract import ModelInfo, MoEInfo
from actserve.server.layers.parallel import SINGLE, Communicator, SymmMemAllReduce, dist_world
from actserve.server.layers.telemetry import Telemetry
from actserve.server.models.expert_offload import attach_offload, offload_config
from actserve.server.models.formats import weight_bytes
from actserve.server.models.hf_fallback import load_transformers
from actserve.server.models.loader import (
    ModelLoadError,
    load_native,
    read_generation_eos,
    resolve_dtype,
    resolve_model_dir,
    weight_files,
)
from actserve.server.models.profile import step_activation_bytes
from actserve.server.models.quantization import (
    LLM_FP4,
    projection_format,
    quantize_calibrated,
    quantize_llm_fp4,
)
from actserve.server.models.registry import resolve as resolve_native
from actserve.server.models.spec import ModelSpec
from actserve.server.models.tp_check import check_tensor_parallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadConfig:
    """What loading a model needs (the model-side part of the engine's `EngineConfig`, same names)."""

    model: str | None = None  # None: the embedded default model
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0  # CPU: KV cache size when not given in blocks
    gpu_memory_utilization: float = 0.85  # CUDA: weights + KV + workspace within this share of the GPU
    load_format: str = "auto"  # "dummy": random weights of the right shapes (benchmarks)
    allow_pickle_weights: bool = False
    force_transformers: bool = False  # serve a native family through the transformers fallback
    quantization: str | None = None  # "nvfp4" / "mxfp4": projections quantized to FP4 at load
    quantization_method: str = "rtn"  # rtn / search / gptq: how projections become FP4 at load
    max_num_batched_tokens: int | None = None  # CUDA: the step token budget whose activations are profiled
    # expert offloading (server/models/expert_offload.py): device slots as GiB over all MoE layers, or as a
    # fraction of each layer's experts (one of them); the prefetch depth and CPU compute mode (None: default)
    expert_cache_gb: float | None = None
    resident_experts: float | None = None
    expert_prefetch_depth: int | None = None
    expert_cpu_compute: str | None = None
    expert_zero_copy: str | None = None
    expert_admit_after: int | None = None
    tensor_parallel_size: int = 1  # ranks the model is split over (docs/architecture.md §12)
    tp_allreduce: str = "nccl"  # CUDA: "nccl", or "symm_mem" (symmetric-memory one-shot, small messages)


@dataclass
class LoadedModel:
    info: ModelInfo
    model: torch.nn.Module
    tokenizer: Any
    eos_token_ids: list[int]
    spec: ModelSpec | None  # None on the transformers fallback path
    num_blocks: int
    block_size: int
    weights_bytes: int  # the parameters' bytes as stored, extra formats included (`size_kv_cache`)
    step_activation_bytes: int = 0  # CUDA native: the profiled peak of a step at the token budget
    kv_block_bytes: int = 0  # K and V of one block, all layers (plus plugins' per-block data when sized)
    # GPU blocks beyond the pool, set aside for plugins with a host tier (the engine sets it)
    reserved_kv_blocks: int = 0
    # weights_bytes by storage format (`formats.weight_bytes`: "bfloat16", "nvfp4", ...)
    weights_by_format: dict[str, int] = field(default_factory=dict)
    # what parts of the model report for the engine to export (the expert cache's counters)
    telemetry: list[Telemetry] = field(default_factory=list)
    # the engine scheduler's admission preference (`scores(token_ids) -> list[float]`), if the model has one
    admission: Any = None
    # why steps must run eager (no CUDA graphs), if they must
    eager_reason: str | None = None
    # parts of the model told before and after each step's forward ops (`before_step()`, `after_step()`:
    # the expert cache's refill between zero-copy steps)
    step_observers: list[Any] = field(default_factory=list)
    # weights kept in host memory beside the device's (offloaded experts; pinned on CUDA)
    host_weight_bytes: int = 0
    # tensor parallelism: this rank's group (weights, KV heads and the byte counts above are this rank's)
    comm: Communicator = SINGLE


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda asked for, but torch sees no CUDA device")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


GPU_WORKSPACE_BYTES = 3 * 2**30  # transformers fallback: activations of the largest prefill, logits
GPU_GRAPH_RESERVE_BYTES = 2**30  # native: graph pools, sampling, allocator slack beside the profiled step


def gpu_kv_blocks(config: LoadConfig, per_block: int, device: torch.device, workspace: int) -> int:
    """KV blocks that fit in --gpu-memory-utilization of the card after weights and `workspace` (the
    profiled step's activations plus a reserve, or a fixed guess on the transformers fallback)."""
    total = torch.cuda.get_device_properties(device).total_memory
    budget = total * config.gpu_memory_utilization - torch.cuda.memory_allocated(device) - workspace
    if budget < per_block:
        raise ModelLoadError(
            "no GPU memory left for the KV cache at --gpu-memory-utilization "
            f"{config.gpu_memory_utilization} after the weights and {workspace / 2**30:.2f} GiB of step "
            "workspace; lower --max-num-batched-tokens or --max-model-len, or raise --gpu-memory-utilization"
        )
    return int(budget // per_block)


def model_dir_and_name(config: LoadConfig) -> tuple[Path, str]:
    if config.model is None:
        from actserve.server.models.default_model import DEFAULT_MODEL_NAME, ensure_default_model

        return ensure_default_model(), config.served_model_name or DEFAULT_MODEL_NAME
    path = resolve_model_dir(config.model)
    name = config.served_model_name or (config.model if not Path(config.model).is_dir() else path.name)
    return path, name


def load_model(config: LoadConfig) -> LoadedModel:
    """`load_weights`, then `size_kv_cache`: a model with nothing added between them."""
    return size_kv_cache(load_weights(config), config)


def check_config(config: LoadConfig) -> None:
    """What can be refused from the config alone before any process loads weights (tensor parallelism:
    before the other ranks start)."""
    from transformers import AutoConfig

    if config.tensor_parallel_size == 1:
        return
    model_dir, _ = model_dir_and_name(config)
    hf_config = AutoConfig.from_pretrained(model_dir)
    native = resolve_native(hf_config, config.force_transformers)
    check_tensor_parallel(
        config.tensor_parallel_size, native.spec, native.architecture, native.fallback_reason, hf_config,
        config.quantization,
    )  # fmt: skip


def load_weights(config: LoadConfig, comm: Communicator = SINGLE) -> LoadedModel:
    """The model, its tokenizer and `ModelInfo`, its KV cache not sized yet (`num_blocks` 0 and the
    weights not counted until `size_kv_cache`): whoever adds weights first (plugins' extra formats, at
    start) does it in between, so that the KV cache is sized after them. `comm`: tensor parallelism,
    this rank's group (the model holds this rank's shards; `ModelInfo` stays the whole model's)."""
    from transformers import AutoConfig, AutoTokenizer

    from actserve.server.models.default_model import is_complete

    model_dir, name = model_dir_and_name(config)
    device = resolve_device(config.device)
    hf_config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = resolve_dtype(config.dtype, device, hf_config)
    text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
    max_pos = int(getattr(text_config, "max_position_embeddings", 0) or 0) or 4096
    max_len = config.max_model_len or max_pos
    if max_len > max_pos:
        raise ModelLoadError(
            f"--max-model-len {max_len} exceeds the model's max_position_embeddings {max_pos}"
        )
    dummy = config.load_format == "dummy"
    if config.load_format not in ("auto", "dummy"):
        raise ModelLoadError(f"--load-format must be auto or dummy, got {config.load_format!r}")
    files = [] if dummy else weight_files(model_dir, config.allow_pickle_weights)
    native = resolve_native(hf_config, config.force_transformers)  # the model registry
    spec: ModelSpec | None = native.spec
    check_tensor_parallel(
        comm.world, spec, native.architecture, native.fallback_reason, hf_config, config.quantization
    )
    if native.fallback_reason is not None:
        log.warning(
            "architecture %s: serving %s through the transformers fallback (%s)",
            native.architecture, name, native.fallback_reason,
        )  # fmt: skip
    method = config.quantization_method
    calibrated = method != "rtn"
    weight_format = projection_format(
        spec, hf_config, config.quantization, dummy, native.fallback_reason, method=method
    )
    offload = offload_config(
        spec, dtype, name, native.fallback_reason, config.expert_cache_gb, config.resident_experts,
        config.expert_prefetch_depth, config.expert_cpu_compute, config.expert_zero_copy,
        config.expert_admit_after,
    )  # fmt: skip
    if spec is not None:
        prepare = None if offload is None else (lambda m: attach_offload(m, offload, dtype, device))
        model = load_native(
            spec, hf_config, files, dtype, device, max_len, random_init=dummy, model_class=native.model_class,
            weight_format=None if calibrated else weight_format, prepare=prepare, comm=comm,
        )  # fmt: skip
        if comm.parallel and device.type == "cuda" and config.tp_allreduce == "symm_mem":
            comm.symm = SymmMemAllReduce(comm.group or dist_world(), dtype, device)  # every rank, in order
        if calibrated:  # loaded dense: calibrate, then each projection becomes FP4
            quantize_calibrated(model, tokenizer, config.quantization, max_len, method)  # type: ignore[arg-type]
        elif config.quantization == LLM_FP4:  # loaded dense: calibrate, then simulated W4A4
            quantize_llm_fp4(model, tokenizer, max_len)
        arch, impl = native.architecture, "native"
        layers, hidden, vocab = spec.num_layers, spec.hidden_size, spec.vocab_size
        kv_heads, head_dim = spec.num_kv_heads, spec.head_dim
        heads, inter = spec.num_heads, spec.intermediate_size
    else:
        model = load_transformers(model_dir, dtype, device, config.allow_pickle_weights)
        arch, impl = type(model).__name__, "transformers"
        layers, hidden = text_config.num_hidden_layers, text_config.hidden_size
        vocab = text_config.vocab_size
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or hidden // heads
        inter = int(getattr(text_config, "intermediate_size", 0) or 0)
    per_block = (  # this rank's KV heads (all of them without tensor parallelism)
        2 * layers * (kv_heads // comm.world) * head_dim * config.block_size
        * torch.tensor([], dtype=dtype).element_size()
    )  # fmt: skip
    eos = read_generation_eos(model_dir, hf_config, tokenizer)
    info = ModelInfo(
        name=name,
        path=str(model_dir),
        architecture=arch,
        implementation=impl,
        num_layers=layers,
        hidden_size=hidden,
        vocab_size=vocab,
        max_model_len=max_len,
        dtype=dtype,
        device=device,
        is_moe=bool(getattr(text_config, "num_local_experts", 0) or getattr(text_config, "num_experts", 0)),
        model_type=str(getattr(hf_config, "model_type", "") or ""),
        embedded_default=is_complete(model_dir),
        fallback_reason=native.fallback_reason,
        block_size=config.block_size,
        eos_token_ids=tuple(eos),
        intermediate_size=inter,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        moe=moe_info(spec),
        tensor_parallel_size=comm.world,
    )
    loaded = LoadedModel(
        info, model, tokenizer, eos, spec, 0, config.block_size, 0, kv_block_bytes=per_block, comm=comm
    )
    cache = getattr(model, "expert_offload", None)
    if cache is not None:
        cache.start()
        loaded.telemetry.append(cache.telemetry)
        loaded.admission = cache
        loaded.step_observers.append(cache)
        loaded.host_weight_bytes = cache.host_bytes()
        if cache.zero_copy is None:
            loaded.eager_reason = (
                "experts are offloaded without zero copy: each MoE layer reads its routing on the host to "
                "make its experts resident"
            )
    return loaded


def moe_info(spec: ModelSpec | None) -> MoEInfo | None:
    """The native MoE model's routing for plugins (None: dense, or the transformers fallback)."""
    if spec is None or spec.moe is None:
        return None
    m = spec.moe
    layers = tuple(i for i in range(spec.num_layers) if m.sparse(i))
    return MoEInfo(m.num_experts, m.top_k, m.renormalize, layers)


def agreed_kv_blocks(comm: Communicator, fit: Callable[[], int]) -> int:
    """`fit()` on this rank, then the least over the tensor-parallel ranks (every rank's cache holds the
    same block ids). A rank whose `fit` raises still joins the agreement (with 0) before raising, so the
    others fail too instead of waiting for it."""
    try:
        mine, error = fit(), None
    except ModelLoadError as e:
        mine, error = 0, e
    agreed = comm.agree_min(mine)
    if error is not None:
        raise error
    if agreed == 0:
        raise ModelLoadError(
            "another tensor-parallel rank has no GPU memory left for the KV cache (its log says why)"
        )
    if agreed < mine:
        log.info("KV cache: %d blocks fit on this rank, %d on every rank: using %d", mine, agreed, agreed)
    return agreed


def size_kv_cache(loaded: LoadedModel, config: LoadConfig) -> LoadedModel:
    """Count the weights as they are now (`weight_bytes`, with any extra formats added since
    `load_weights`) and size the KV cache: --num-kv-blocks as given; on CUDA what is left of
    --gpu-memory-utilization after everything allocated so far (the weights, extra formats included) and
    the profiled step; on the CPU --kv-cache-memory-gb. Fills `loaded` in place and returns it."""
    info, model, spec = loaded.info, loaded.model, loaded.spec
    max_len, dtype, device, per_block = info.max_model_len, info.dtype, info.device, loaded.kv_block_bytes
    # parameters as stored: an FP4 projection counts its packed codes and scales, no dense copy
    loaded.weights_by_format = weight_bytes(model)
    loaded.weights_bytes = sum(loaded.weights_by_format.values())
    min_blocks = -(-max_len // config.block_size)
    peak = 0
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
        if num_blocks < min_blocks:
            raise ModelLoadError(
                f"--num-kv-blocks {num_blocks} holds {num_blocks * config.block_size} tokens, less than "
                f"--max-model-len {max_len}; give at least {min_blocks} blocks or lower --max-model-len"
            )
    elif device.type == "cuda":
        workspace = GPU_WORKSPACE_BYTES
        if spec is not None:
            tokens = config.max_num_batched_tokens or max_len
            peak = step_activation_bytes(model, spec, tokens, max_len, dtype, device, config.block_size)
            workspace = peak + GPU_GRAPH_RESERVE_BYTES
            log.info("a step of %d tokens peaks at %.2f GiB of activations (profiled)", tokens, peak / 2**30)
        num_blocks = agreed_kv_blocks(
            loaded.comm, lambda: gpu_kv_blocks(config, per_block, device, workspace)
        )
        if num_blocks < min_blocks:
            raise ModelLoadError(
                f"the KV cache fits {num_blocks * config.block_size} tokens after the weights and the step "
                f"workspace, less than --max-model-len {max_len}: lower --max-model-len or "
                "--max-num-batched-tokens, or raise --gpu-memory-utilization"
            )
    else:
        num_blocks = max(min_blocks, int(config.kv_cache_memory_gb * 2**30 // per_block))
    loaded.num_blocks, loaded.step_activation_bytes = num_blocks, peak
    return loaded
