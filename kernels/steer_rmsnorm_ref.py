"""Plain-torch reference of the fused residual add + per-row steering + RMSNorm (and the CPU path).

The residual stream after decoder layer L is only materialised when layer L+1 (or the final norm) adds
the MLP output into it; that is where steering at layer L must act. Doing add, steering and norm in one
kernel keeps steering at ~0 cost for rows that have none (index -1) and makes the per-row tensors plain
static inputs of a captured CUDA graph.

Semantics (matching transformers in the storage dtype, and `add_steer_rmsnorm_ref` below):
    h = round(residual + x)                                   # skipped when x is None
    for k in range(K): if index[r, k] >= 0 and layer_mask[index, layer]:
        h' = round(h + round(scale[r, k] * table[index, layer]))   (scale in float32, as torch does)
        h  = round(h' * |h| / |h'|) if normalize[r, k] else h'
    residual_out = h;  out = weight * round(h * rsqrt(mean(h^2) + eps))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SteeringTensors:
    """Per-step steering inputs: a resident table and fixed-shape per-row columns (index -1 = none)."""

    table: torch.Tensor  # [slots, num_layers, hidden], model dtype
    layer_mask: torch.Tensor  # [slots, num_layers] bool
    index: torch.Tensor  # [rows, K] int64
    scale: torch.Tensor  # [rows, K] float32
    normalize: torch.Tensor  # [rows, K] bool
    # layer -> columns with an active row there; lets the torch path skip idle work (kernels ignore it)
    columns: dict[int, list[int]] | None = None


def apply_steering_ref(h: torch.Tensor, layer: int, steer: SteeringTensors) -> torch.Tensor:
    """The steering part alone: each row's vectors in column order; rows with index -1 are untouched."""
    columns = range(steer.index.shape[1]) if steer.columns is None else steer.columns.get(layer, ())
    for k in columns:
        idx = steer.index[:, k]
        safe = idx.clamp(min=0)
        active = (idx >= 0) & steer.layer_mask[safe, layer]
        stepped = h + (steer.scale[:, k : k + 1] * steer.table[safe, layer].float()).to(h.dtype)
        before = h.float().norm(dim=-1, keepdim=True)
        after = stepped.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
        rescaled = (stepped.float() * (before / after)).to(h.dtype)
        stepped = torch.where(steer.normalize[:, k : k + 1], rescaled, stepped)
        h = torch.where(active.unsqueeze(1), stepped, h)
    return h


def add_steer_rmsnorm_ref(
    x: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    layer: int = -1,
    steer: SteeringTensors | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference (and the CPU path). Returns (normed, new residual)."""
    h = residual if x is None else residual + x
    if steer is not None and layer >= 0:
        h = apply_steering_ref(h, layer, steer)
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h
