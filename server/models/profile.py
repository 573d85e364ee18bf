"""The peak activation memory of one serving step at the token budget, measured by running it (as vLLM
profiles a dummy forward), so the KV cache is sized to leave room for it (docs/architecture.md §3)."""

from __future__ import annotations

import torch

from actserve.server.layers.attention import AttentionBatch, SeqSlice, make_kv_cache
from actserve.server.models.spec import ModelSpec


@torch.inference_mode()
def step_activation_bytes(
    model: torch.nn.Module,
    spec: ModelSpec,
    tokens: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """Peak CUDA memory above what is allocated now, of the heaviest step a budget of `tokens` allows:
    one chunk of `tokens` prompt tokens at the end of a `max_len` context (attention gathers the whole
    context from the paged cache), with logits and log-softmax over every row (prompt logprobs). The
    dummy cache holds only the chunk's slots: the context reads them repeatedly, which costs the same
    memory as distinct slots. Weights are not touched; random token ids."""
    tokens = min(tokens, max_len)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    kv = make_kv_cache(spec.num_layers, tokens, spec.num_kv_heads, spec.head_dim, dtype, device)
    slots = torch.arange(tokens, device=device)
    context = torch.arange(max_len, device=device) % tokens
    batch = AttentionBatch(slots, [SeqSlice(0, tokens, context)])
    ids = torch.randint(0, spec.vocab_size, (tokens,), device=device)
    positions = torch.arange(max_len - tokens, max_len, device=device)
    hidden = model(ids, positions, kv, batch, None)
    torch.log_softmax(model.compute_logits(hidden), dim=-1)  # type: ignore[operator]
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del kv, hidden
    torch.cuda.empty_cache()
    return int(peak)
