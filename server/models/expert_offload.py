"""Expert offloading's flags turned into the cache's configuration, and the cache attached to a native
mixture-of-experts model before it is allocated (docs/architecture.md §5, "Expert offloading").

`--expert-cache-gb X` (GiB of device slots over all MoE layers) or `--resident-experts F` (a fraction of
each layer's experts, 0 < F <= 1), mutually exclusive; `--expert-prefetch-depth D` and
`--expert-cpu-compute auto|never|always` only with one of them. A size that holds every expert leaves the
model as it is (nothing offloaded, CUDA graphs kept)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from actserve.server.layers.expert_cache import CPU_MODES, ZERO_COPY_MODES, ExpertOffload, OffloadConfig
from actserve.server.models.loader import ModelLoadError
from actserve.server.models.spec import ModelSpec

log = logging.getLogger(__name__)

# measured on the H200 (bench/results/moe_offload.json, eager steps): plain LRU (depth 0) beat the
# router-ahead prefetch (depth 1) on Mixtral and Qwen3-30B-A3B shapes under uniform and Zipf routers alike
# (12.5 vs 9.4, 13.5 vs 10.2, 36.6 vs 34.9, 41.5 vs 32.3 tok/s): wrong guesses cost copies
DEFAULT_PREFETCH_DEPTH = 0
# zero-copy steps: copy an expert into a slot once it missed in this many consecutive steps. 2 beat 1 in all
# six H200 comparisons of 2026-12-02 (bench/results/moe_offload_mixtral.json and its why: Mixtral at 25 % and
# 50 % resident, Qwen3-30B-A3B at 25 %, uniform and Zipf routers; e.g. Qwen3 uniform, 1004 vs 305 tok/s;
# Mixtral uniform at 25 %, 9.4 vs 7.9): a copy after one miss mostly moves an expert not routed again soon
DEFAULT_ADMIT_AFTER = 2


def expert_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """One expert's gate, up and down matrices."""
    assert spec.moe is not None
    return 3 * spec.hidden_size * spec.moe.intermediate_size * torch.tensor([], dtype=dtype).element_size()


def offload_config(
    spec: ModelSpec | None,
    dtype: torch.dtype,
    name: str,
    fallback_reason: str | None,
    cache_gb: float | None,
    resident: float | None,
    prefetch_depth: int | None,
    cpu_compute: str | None,
    zero_copy: str | None = None,
    admit_after: int | None = None,
) -> OffloadConfig | None:
    """The cache's configuration from the flags (None: no offloading), or a ModelLoadError naming the flag."""
    if cache_gb is None and resident is None:
        for flag, value in (
            ("--expert-prefetch-depth", prefetch_depth),
            ("--expert-cpu-compute", cpu_compute),
            ("--expert-zero-copy", zero_copy),
            ("--expert-admit-after", admit_after),
        ):
            if value is not None:
                raise ModelLoadError(
                    f"{flag} needs expert offloading: give --expert-cache-gb or --resident-experts"
                )
        return None
    if cache_gb is not None and resident is not None:
        raise ModelLoadError("--expert-cache-gb and --resident-experts are mutually exclusive: give one")
    flag = "--expert-cache-gb" if cache_gb is not None else "--resident-experts"
    if resident is not None and not 0 < resident <= 1:
        raise ModelLoadError(
            f"--resident-experts must be in (0, 1] (a fraction of each layer's experts), got {resident}"
        )
    if cache_gb is not None and not cache_gb > 0:
        raise ModelLoadError(
            f"--expert-cache-gb must be > 0 (GiB of device memory for experts), got {cache_gb}"
        )
    if prefetch_depth is not None and prefetch_depth < 0:
        raise ModelLoadError(f"--expert-prefetch-depth must be >= 0 (0: no prefetch), got {prefetch_depth}")
    if cpu_compute is not None and cpu_compute not in CPU_MODES:
        raise ModelLoadError(
            f"--expert-cpu-compute must be one of {', '.join(CPU_MODES)}, got {cpu_compute!r}"
        )
    if zero_copy is not None and zero_copy not in ZERO_COPY_MODES:
        raise ModelLoadError(
            f"--expert-zero-copy must be one of {', '.join(ZERO_COPY_MODES)}, got {zero_copy!r}"
        )
    if zero_copy == "on" and cpu_compute == "always":
        raise ModelLoadError(
            "--expert-zero-copy on reads missing experts on the GPU; it cannot be combined with "
            "--expert-cpu-compute always (give one of them)"
        )
    if admit_after is not None and admit_after < 0:
        raise ModelLoadError(f"--expert-admit-after must be >= 0 (0: never copy), got {admit_after}")
    if spec is None or spec.moe is None:
        if fallback_reason is not None:
            why = f"the transformers fallback serves {name} ({fallback_reason})"
        else:
            why = f"{name} is not a mixture-of-experts model"
        raise ModelLoadError(
            f"{flag}: expert offloading needs a natively served mixture-of-experts model; {why}"
        )
    moe = spec.moe
    layers = sum(1 for i in range(spec.num_layers) if moe.sparse(i))
    per_expert = expert_bytes(spec, dtype)
    if cache_gb is not None:
        slots = int(cache_gb * 2**30 // (layers * per_expert))
        if slots < 1:
            need = layers * per_expert / 2**30
            raise ModelLoadError(
                f"--expert-cache-gb {cache_gb} holds less than one expert per MoE layer ({layers} layers x "
                f"{per_expert / 2**20:.1f} MiB); give at least {need:.3f}"
            )
    else:
        assert resident is not None
        slots = max(1, math.floor(resident * moe.num_experts + 1e-9))
    if slots >= moe.num_experts:
        log.info("%s: every expert fits (%d per layer): nothing offloaded", flag, moe.num_experts)
        return None
    depth = DEFAULT_PREFETCH_DEPTH if prefetch_depth is None else prefetch_depth
    admit = DEFAULT_ADMIT_AFTER if admit_after is None else admit_after
    config = OffloadConfig(slots, depth, cpu_compute or "auto", zero_copy or "auto", admit)
    log.info(
        "expert offloading: %d of %d experts per layer on the device (%.2f GiB over %d layers), the rest "
        "in host memory; prefetch depth %d, CPU compute %s, zero copy %s (admit after %d misses)", slots,
        moe.num_experts, slots * layers * per_expert / 2**30, layers, depth, config.cpu_compute,
        config.zero_copy, admit,
    )  # fmt: skip
    return config


def attach_offload(
    model: Any, config: OffloadConfig, dtype: torch.dtype, device: torch.device
) -> ExpertOffload:
    """On the model still on the meta device: each MoE layer's experts moved to host copies with
    `config.slots` device slots, and the cache over them (`model.expert_offload`). The admission
    preference predicts with the first MoE layer's router on its post-attention norm of an embedding."""
    layers = model.model.layers
    blocks = [(i, layer.mlp) for i, layer in enumerate(layers) if layer.is_moe]
    for _, block in blocks:
        block.experts.offload_to_host(config.slots, dtype, pin=device.type == "cuda")
    first = layers[blocks[0][0]]
    offload = ExpertOffload(blocks, config, device, model.model.embed_tokens, first.post_attention_layernorm)
    model.expert_offload = offload
    return offload
