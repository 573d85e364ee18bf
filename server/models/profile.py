"""The peak activation memory of one serving step at the token budget, measured by running it (as vLLM
profiles a dummy forward), so the KV cache is sized to leave room for it (docs/architecture.md §3)."""

from __future__ import annotations

import torch

from actserve.server.layers.attention import AttentionBatch, SeqSlice, make_kv_cache, paged_prefill_fits
from actserve.server.models.spec import ModelSpec


@torch.inference_mode()
def heaviest_step(
    model: torch.nn.Module,
    spec: ModelSpec,
    tokens: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    chunk_kernel: bool,
) -> torch.Tensor:
    """The heaviest step a budget of `tokens` allows, on dummy data: one chunk of `tokens` prompt tokens
    at the end of a `max_len` context, through the attention path the runner takes for it (the
    paged-prefill kernel with `chunk_kernel`, else the per-sequence gather), with logits and log-softmax
    over every row (as prompt logprobs). The dummy cache holds only the chunk's blocks: the context reads
    them repeatedly, which costs the memory of distinct blocks. Returns the log-softmax."""
    tokens = min(tokens, max_len)
    blocks = -(-tokens // block_size)
    kv_heads = getattr(model, "local_kv_heads", spec.num_kv_heads)  # tensor parallelism: this rank's
    kv = make_kv_cache(spec.num_layers, blocks * block_size, kv_heads, spec.head_dim, dtype, device)
    table = torch.arange(-(-max_len // block_size), device=device) % blocks
    context = (table.unsqueeze(1) * block_size + torch.arange(block_size, device=device)).flatten()[:max_len]
    batch = AttentionBatch(context[-tokens:], [SeqSlice(0, tokens, context)], block_size=block_size)
    if chunk_kernel:
        batch.chunk_tables = table.to(torch.int32).unsqueeze(0)
    ids = torch.randint(0, spec.vocab_size, (tokens,), device=device)
    positions = torch.arange(max_len - tokens, max_len, device=device)
    hidden = model(ids, positions, kv, batch, None)
    logits = model.compute_logits(hidden)  # type: ignore[operator]
    # tensor parallelism: the ranks other than 0 get no logits (rank 0's profile holds them)
    return torch.log_softmax(logits, dim=-1) if logits is not None else hidden


def step_activation_bytes(
    model: torch.nn.Module,
    spec: ModelSpec,
    tokens: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
) -> int:
    """Peak CUDA memory of `heaviest_step` above what is allocated now (the runner's CUDA attention
    path: the kernel for power-of-two head sizes)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = heaviest_step(
        model, spec, tokens, max_len, dtype, device, block_size, paged_prefill_fits(spec.head_dim)
    )
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    torch.cuda.empty_cache()
    return int(peak)
