"""Residual-stream activations of prompts, read at the steering hook point (output of decoder layer L).

Used to build vectors (mean_diff, pca_diff, ASC). Runs a plain forward over a scratch KV cache, so it
never touches the serving cache; call it on the engine thread when a server is running
(`AsyncEngine.run_in_engine`). Layer L here is exactly where steering at layer L adds its vector.
"""

from __future__ import annotations

from typing import Literal

import torch

from actserve.server.contract.hooks import StepHooks
from actserve.server.layers.attention import AttentionBatch, SeqSlice, make_kv_cache

Position = Literal["last", "mean"]


class _Capture:
    """A residual hook that records rows at chosen layers and changes nothing."""

    def __init__(self, layers: list[int]) -> None:
        self._layers = set(layers)
        self.seen: dict[int, torch.Tensor] = {}

    def layers(self) -> set[int]:
        return self._layers

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        self.seen[layer] = hidden.detach().float()
        return hidden


@torch.inference_mode()
def collect_residuals(
    model: torch.nn.Module,
    prompts: list[list[int]],
    layers: list[int],
    position: Position = "last",
    batch_tokens: int = 4096,
) -> torch.Tensor:
    """[len(prompts), len(layers), hidden] float32: each prompt's residual after each layer, at its last
    token or averaged over its tokens. `model` is a native LlamaForCausalLM (loaded engines expose it)."""
    spec = model.spec  # type: ignore[attr-defined]
    bad = [layer for layer in layers if not 0 <= layer < spec.num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range [0, {spec.num_layers - 1}]")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = torch.empty(len(prompts), len(layers), spec.hidden_size, dtype=torch.float32)
    i = 0
    while i < len(prompts):
        chunk = [prompts[i]]
        while (
            i + len(chunk) < len(prompts)
            and sum(map(len, chunk)) + len(prompts[i + len(chunk)]) <= batch_tokens
        ):
            chunk.append(prompts[i + len(chunk)])
        total = sum(map(len, chunk))
        cache = make_kv_cache(spec.num_layers, total, spec.num_kv_heads, spec.head_dim, dtype, device)
        slices, start = [], 0
        for p in chunk:
            slices.append(SeqSlice(start, len(p), torch.arange(start, start + len(p), device=device)))
            start += len(p)
        ids = torch.tensor([t for p in chunk for t in p], device=device)
        pos = torch.tensor([j for p in chunk for j in range(len(p))], device=device)
        capture = _Capture(layers)
        model(
            ids, pos, cache, AttentionBatch(torch.arange(total, device=device), slices), StepHooks([capture])
        )
        for n, s in enumerate(slices):
            for k, layer in enumerate(layers):
                rows = capture.seen[layer][s.start : s.start + s.num_queries]
                out[i + n, k] = (rows[-1] if position == "last" else rows.mean(0)).cpu()
        i += len(chunk)
    return out
