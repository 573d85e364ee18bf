"""CoreInfer (Wang et al., "CoreInfer: Accelerating Large Language Model Inference with Semantics-Inspired
Adaptive Sparse Activation", 2024) as a method of the `sparsity` plugin: a request's FFN "core neurons"
are chosen from its prompt and fixed for its whole decode.

The rule (the paper's stability-guided selection, on the FFN's intermediate activations x = silu(gate) *
up, the down projection's input):
- token-wise core neurons: for each prompt token, the top floor(beta * P) neurons by value, P the number
  of its positive activations (beta = TOKEN_FRACTION, the paper's default 0.2);
- sentence-wise core neurons: the neurons most often token-wise core over the prompt, the top K =
  round((1 - level) * N) by that count (ties: larger summed activation first, then lower index; the
  paper's code breaks ties arbitrarily);
- decode: the FFN runs on the core neurons only (gather the gate/up rows and the down columns once, then
  dense GEMVs: `gathered_ffn`, the speed path); the masked path here zeroes the other neurons' inputs to
  the down projection, which gives the same numbers.
All layers (the paper's code leaves the first and last few dense). The prompt runs dense, and the core
set needs every prompt token's activations, so a CoreInfer prompt never shares prefix-cache blocks.

State is resident and per request (a "core slot"): per layer and neuron the token-wise count and the
summed activation (accumulated over prefill chunks) and the current core mask, rebuilt after each chunk;
decode rows read their slot's mask through a per-row input, so decode steps stay graph-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actserve.interventions.base import RowInputs

TOKEN_FRACTION = 0.2  # beta: each token's core share of its positive activations
INPUT = "sparsity_level"  # the per-row level index (plugin.py's row input), -1: not this method's decode row
SLOT = "sparsity_slot"  # per row: (counter slot, core slot)


def core_size(level: float, n: int) -> int:
    """K: the core neurons kept at `level` (the fraction dropped) of n."""
    return n - round(level * n)


def token_core(x: torch.Tensor, beta: float = TOKEN_FRACTION) -> torch.Tensor:
    """[tokens, N] bool: each token's core neurons, its top floor(beta * P) by value (P: its positive
    entries; ties: lower index first)."""
    limit = torch.floor(beta * (x > 0).sum(1).double()).long()
    order = torch.sort(x, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(x.shape[1], device=x.device).expand_as(order))
    return rank < limit.unsqueeze(1)


def core_mask(counts: torch.Tensor, sums: torch.Tensor, k: int) -> torch.Tensor:
    """[N] bool: the k neurons with the highest count (ties: higher sum, then lower index)."""
    by_sum = torch.sort(sums, descending=True, stable=True).indices
    order = by_sum[torch.sort(counts[by_sum], descending=True, stable=True).indices]
    mask = torch.zeros_like(counts, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def gathered_ffn(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, core: torch.Tensor
) -> torch.Tensor:
    """The speed path's reference: the FFN over the core neurons `core` [K] int64 only, from the fused
    gate_up weight [2N, hidden] and down [hidden, N] gathered once (dense GEMVs over K of N neurons)."""
    n = down.shape[1]
    w_gate, w_up, w_down = gate_up[core], gate_up[n + core], down[:, core]
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


@dataclass(frozen=True)
class Observe:
    """A prompt chunk's packed rows [lo, hi) of a CoreInfer request: accumulate into core slot `slot`
    and rebuild its mask with `keep` neurons."""

    slot: int
    keep: int
    lo: int
    hi: int


class CoreState:
    """Resident per-request tables: counts and sums [slots, layers, N] float32, mask [slots, layers, N]."""

    def __init__(self, slots: int, num_layers: int, n: int, device: torch.device) -> None:
        self.counts = torch.zeros(slots, num_layers, n, dtype=torch.float32, device=device)
        self.sums = torch.zeros(slots, num_layers, n, dtype=torch.float32, device=device)
        self.mask = torch.ones(slots, num_layers, n, dtype=torch.bool, device=device)

    def reset(self, slot: int) -> None:
        self.counts[slot].zero_()
        self.sums[slot].zero_()
        self.mask[slot].fill_(True)

    def observe(self, layer: int, x: torch.Tensor, spans: list[Observe]) -> None:
        """Add each span's prompt rows of x (the down input at `layer`) and rebuild its slot's mask."""
        for o in spans:
            rows = x[o.lo : o.hi].float()
            self.counts[o.slot, layer] += token_core(rows).sum(0)
            self.sums[o.slot, layer] += rows.sum(0)
            self.mask[o.slot, layer] = core_mask(self.counts[o.slot, layer], self.sums[o.slot, layer], o.keep)


class CoreInferHook:
    """At every layer's down projection: prompt rows of `observe` feed their slot's core set; decode rows
    (level index >= 1) keep only their slot's core neurons."""

    def __init__(self, state: CoreState, observe: list[Observe] | None = None) -> None:
        self.state, self.observe = state, observe or []
        self._sites = {(layer, "down_proj") for layer in range(state.mask.shape[1])}

    def sites(self) -> set[tuple[int, str]]:
        return self._sites

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: RowInputs) -> torch.Tensor:
        if self.observe:
            self.state.observe(layer, x, self.observe)
        decode = inputs[INPUT][:, 0] > 0
        slot = inputs[SLOT][:, 1].clamp(min=0).long()
        keep = self.state.mask[slot, layer]  # [rows, N]
        return x.masked_fill(decode.unsqueeze(1) & ~keep, 0)
