"""Plain-torch reference of the fused mixture-of-experts layer (kernels/moe.py): routing, each expert's
gated MLP on the rows that chose it, and the weighted sum back per row, with the kernels' rounding points.

Experts live in *slots* of stacked tensors, `w13` [slots, 2 * inter, hidden] (each expert's gate rows,
then its up rows: the checkpoint's gate_proj and up_proj fused) and `w2` [slots, hidden, inter]
(down_proj). The layer maps expert ids to slots before calling (all resident: slot = expert id), so a
later expert cache can move one expert by rewriting one entry of its table. A slot of -1 means "no
expert in this column": a row routed to fewer experts than the step's width has -1 columns with weight
0, which contribute exactly nothing (the sum back adds +0.0), so its result is bit-identical to a
narrower step's.

Rounding as transformers' experts compute in the model dtype: gate/up products rounded to the dtype,
silu(gate) rounded, its product with up rounded, the down product rounded; then (unlike transformers,
which adds in the dtype) the routing weight is applied in float32, the columns summed in float32 in
column order, and the sum rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def route_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, row_k: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts (float32), the `top_k` largest, optionally renormalised to sum to 1: the
    routers of Mixtral (always renormalised), Qwen2/3-MoE and OLMoE (`norm_topk_prob`).

    `row_k` [rows] int (None: every row takes `top_k`): a row keeps only its first `row_k[r]` columns
    (the others get expert -1 and weight 0) before renormalising, which is exactly that router with
    `num_experts_per_tok = row_k[r]`. Returns (expert ids [rows, top_k] int64, weights [rows, top_k]
    float32), largest first."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if row_k is not None:
        keep = torch.arange(top_k, device=ids.device) < row_k.to(ids.device).unsqueeze(1)
        weights = weights.masked_fill(~keep, 0.0)
        ids = ids.masked_fill(~keep, -1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def expert_slots(ids: torch.Tensor, slot_of: torch.Tensor | None) -> torch.Tensor:
    """Expert ids [rows, k] (-1: none) -> slots through the table `slot_of` [experts] (None: identity),
    int32, -1 kept; a device gather, no host sync."""
    if slot_of is None:
        return ids.to(torch.int32)
    slots = slot_of[ids.clamp(min=0)].to(torch.int32)
    return torch.where(ids >= 0, slots, torch.full_like(slots, -1))


def sum_columns(y: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y [rows * k, hidden] float32 (pair r * k + c) -> [rows, hidden] in `dtype`: the columns added in
    order, -1 columns as +0.0."""
    rows, k = slots.shape
    y = y.view(rows, k, -1)
    acc = torch.zeros(rows, y.shape[2], dtype=torch.float32, device=y.device)
    for c in range(k):
        acc = acc + torch.where((slots[:, c] >= 0).unsqueeze(1), y[:, c], 0.0)
    return acc.to(dtype)


@dataclass(frozen=True)
class PendingSum:
    """A MoE layer's output before its columns are added: `products` [rows * k, hidden] float32 (pair
    r * k + c: column c's weighted down product) and `slots` [rows, k] (-1: none). The next residual add
    adds them itself, in column order, rounded once to the model's dtype: `sum_columns` exactly, without
    the decode step's separate sum launch (kernels/steer_rmsnorm.py, `parts`)."""

    products: torch.Tensor
    slots: torch.Tensor


def expert_weights(
    w13: torch.Tensor,
    w2: torch.Tensor,
    e: int,
    table: torch.Tensor | None = None,
    host: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert (or slot, without a table) `e`'s (w13, w2): slot e; through the table its slot; or, where
    the table says -1, its host copy (what the kernel reads over PCIe)."""
    if table is None:
        return w13[e], w2[e]
    slot = int(table[e])
    if slot >= 0:
        return w13[slot], w2[slot]
    if host is None:
        raise ValueError(f"expert {e} is in no slot (table entry -1) and no host copy was given")
    return host[0][e], host[1][e]


def expert_pairs_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    y: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    host: tuple[torch.Tensor, torch.Tensor] | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each (row, column) pair's weighted expert output, float32 [rows * k, hidden] (pair r * k + c), for
    the pairs whose slot is >= 0 (the others are left as they are in `y`, zeros when None): one matmul per
    slot present, over the rows that chose it in pair order (as transformers loops over experts). An
    expert cache fills the pairs of different experts from different weights (resident slots, the host
    copy) into one `y`; a pair's bits depend only on its expert's rows, so they equal the all-resident
    ones. With `table`, `slots` holds expert ids and each expert's weights come from `expert_weights`;
    `counts` [experts] adds each pair to its id. Host syncs, CPU use."""
    rows, k = slots.shape
    flat = slots.reshape(-1)
    flat_w = weights.reshape(-1).float()
    if y is None:
        y = torch.zeros(rows * k, x.shape[1], dtype=torch.float32, device=x.device)
    inter = w2.shape[2]
    for s in torch.unique(flat[flat >= 0]).tolist():
        pairs = (flat == s).nonzero().squeeze(1)
        if counts is not None:
            counts[s] += pairs.numel()
        e13, e2 = expert_weights(w13, w2, s, table, host)
        gate_up = F.linear(x[pairs // k], e13)
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # rounded to x's dtype at each op
        y[pairs] = F.linear(h, e2).float() * flat_w[pairs].unsqueeze(1)
    return y


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    table: torch.Tensor | None = None,
    host: tuple[torch.Tensor, torch.Tensor] | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [rows, hidden], w13 [slots, 2 * inter, hidden], w2 [slots, hidden, inter], slots [rows, k] int
    (-1: none), weights [rows, k] float32 -> [rows, hidden] in x's dtype: sum over columns c of
    weights[r, c] * down(silu(gate(x[r])) * up(x[r])) through slot slots[r, c] (`expert_pairs_ref`, then
    the columns added in order). `table`, `host`, `counts`: as `fused_moe` (kernels/moe.py) takes them."""
    y = expert_pairs_ref(x, w13, w2, slots, weights, table=table, host=host, counts=counts)
    return sum_columns(y, slots, x.dtype)


def align_ref(slots: torch.Tensor, num_slots: int, block_m: int) -> tuple[list[int], list[int]]:
    """What `moe_align` computes, by plain loops: the pair indices (r * k + c) grouped by slot in slot
    order, each group padded with the pad value (rows * k) to a multiple of `block_m`, and the slot of each
    block. Pairs with slot -1 are dropped."""
    flat = slots.reshape(-1).tolist()
    pad = len(flat)
    order: list[int] = []
    block_slots: list[int] = []
    for s in range(num_slots):
        pairs = [p for p, v in enumerate(flat) if v == s]
        if not pairs:
            continue
        padded = -(-len(pairs) // block_m) * block_m
        order += pairs + [pad] * (padded - len(pairs))
        block_slots += [s] * (padded // block_m)
    return order, block_slots
