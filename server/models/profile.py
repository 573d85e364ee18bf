"""The peak activation memory of one serving step at the token budget, measured by running it (as vLLM
profiles a dummy forward), so the KV cache is sized to leave room for it (docs/architecture.md §3)."""

from __future__ import annotations

import torch

from actserve.server.layers.attention import AttentionBatch, SeqSlice, make_kv_cache, paged_prefill_fits
from actserve.server.models.spec import ModelSpec


@torch.inference_mode()
def step_activation_bytes(
    model: torch.nn.Module,
    spec: ModelSpec,
    tokens: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
) -> int:
    """Peak CUDA memory above what is allocated now, of the heaviest step a budget of `tokens` allows:
    one chunk of `tokens` prompt tokens at the end of a `max_len` context, through the attention path the
    runner takes for it (the paged-prefill kernel, or the per-sequence gather for other head sizes), with
    logits and log-softmax over every row (prompt logprobs). The dummy cache holds only the chunk's
    blocks: the context reads them repeatedly, which costs the same memory as distinct blocks. Weights
    are not touched; random token ids."""
    tokens = min(tokens, max_len)
    blocks = -(-tokens // block_size)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    kv = make_kv_cache(spec.num_layers, blocks * block_size, spec.num_kv_heads, spec.head_dim, dtype, device)
    table = torch.arange(-(-max_len // block_size), device=device) % blocks
    context = (table.unsqueeze(1) * block_size + torch.arange(block_size, device=device)).flatten()[:max_len]
    batch = AttentionBatch(context[-tokens:], [SeqSlice(0, tokens, context)], block_size=block_size)
    if paged_prefill_fits(spec.head_dim):
        batch.chunk_tables = table.to(torch.int32).unsqueeze(0)
    ids = torch.randint(0, spec.vocab_size, (tokens,), device=device)
    positions = torch.arange(max_len - tokens, max_len, device=device)
    hidden = model(ids, positions, kv, batch, None)
    torch.log_softmax(model.compute_logits(hidden), dim=-1)  # type: ignore[operator]
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del kv, hidden
    torch.cuda.empty_cache()
    return int(peak)
