"""From an `EngineConfig` to a loaded, sized model with its plugins and its runner: the part of the
engine's start that every tensor-parallel rank runs the same way (the engine on rank 0, tp_worker.py on
the others), so their collectives (the step profile, the KV agreement, CUDA-graph captures) line up."""

from __future__ import annotations

import logging
from typing import Any

import torch

from actserve.interventions.registry import InterventionRegistry
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.model_runner import ModelRunner
from actserve.server.layers.parallel import Communicator
from actserve.server.models.builder import LoadConfig, LoadedModel, load_weights, size_kv_cache
from actserve.server.models.formats import install_formats

log = logging.getLogger(__name__)

# the step token budget when --max-num-batched-tokens is not given (at least --max-num-seqs)
DEFAULT_BATCHED_TOKENS_CUDA = 2048
DEFAULT_BATCHED_TOKENS_CPU = 512


def step_budget(config: EngineConfig, device: torch.device) -> int:
    """The step's token budget (--max-num-batched-tokens or its default); ValueError when it cannot hold
    every running sequence's decode token."""
    default_budget = DEFAULT_BATCHED_TOKENS_CUDA if device.type == "cuda" else DEFAULT_BATCHED_TOKENS_CPU
    batched = config.max_num_batched_tokens or max(default_budget, config.max_num_seqs)
    if batched < config.max_num_seqs:
        raise ValueError(
            f"--max-num-batched-tokens ({batched}) must be >= --max-num-seqs ({config.max_num_seqs}): "
            "every running sequence's decode token must fit in one step's token budget"
        )
    return batched


def install_plugin_formats(loaded: LoadedModel, registry: InterventionRegistry) -> None:
    """The plugins' extra weight formats on the native model. The transformers fallback has no hook
    for them: they are skipped with a log line (such plugins refuse non-native models in `prepare`)."""
    requests = registry.weight_formats()
    if not requests:
        return
    if loaded.spec is None:
        log.warning("weight formats of plugin(s) %s not installed: the model is not native", sorted(requests))
        return
    added = install_formats(loaded.model, requests, loaded.info.dtype)
    log.info("installed %d plugin weight format(s) for %s", added, sorted(requests))


def load_and_size(
    config: EngineConfig, load: LoadConfig, comm: Communicator
) -> tuple[LoadedModel, InterventionRegistry, int]:
    """The model (this rank's shards), its plugins and its KV cache size; also the K/V bytes of a block
    alone (without the plugins' per-block data)."""
    loaded = load_weights(load, comm)
    registry = InterventionRegistry(loaded.info, options=config.plugin_options)
    # before the runner (graphs capture the weights) and before the KV cache is sized, so that it
    # is sized after the extra formats (and the plugins' resident tables) took their memory
    install_plugin_formats(loaded, registry)
    kv_only = loaded.kv_block_bytes
    loaded.kv_block_bytes += registry.kv_block_bytes()  # plugins' data per block, beside its K/V
    return size_kv_cache(loaded, load), registry, kv_only


def build_runner(loaded: LoadedModel, config: EngineConfig, registry: InterventionRegistry) -> Any:
    """The runner for a loaded model: the native `ModelRunner`, or `HFRunner` on the transformers
    fallback."""
    info = loaded.info
    if loaded.spec is None:
        from actserve.server.engine.hf_runner import HFRunner

        return HFRunner(loaded.model, info.num_layers, registry)
    eager = config.enforce_eager or loaded.eager_reason is not None
    if loaded.eager_reason is not None and info.device.type == "cuda" and not config.enforce_eager:
        log.info("no CUDA graphs: %s", loaded.eager_reason)
    graphs = 0 if eager else min(config.max_num_seqs, 256)
    prefill = 0 if eager else min(config.cuda_graph_prefill_len, info.max_model_len)
    return ModelRunner(
        loaded.model, loaded.num_blocks, loaded.block_size, info.device, info.dtype, registry,
        info.max_model_len, cuda_graph_max_bs=graphs, cuda_graph_prefill_len=prefill,
        extra_blocks=loaded.reserved_kv_blocks,
    )  # fmt: skip
