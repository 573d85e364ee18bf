"""A mixture-of-experts router's softmax, top-k and renormalisation in one launch (reference:
`kernels/moe_ref.route_topk`). In torch these are five kernels (cast, softmax, topk, sum, divide) of about
2 us each per MoE layer, at batch-1 decode more than the routed experts' own weight reads at Qwen3-30B-A3B
(docs/architecture.md §5, "MoE experts").

One program per row holds the row's logits (the expert count rounded up to a power of two), takes the
softmax in float32 and picks the k largest by k passes of (max, first index of the max): the order of
the logits is the order of the probabilities, and ties go to the lower expert id. Ids come out largest
first, as `torch.topk` gives them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from actserve.kernels.pdl import pdl_args, pdl_sync


@triton.jit
def _route_kernel(
    logits_ptr, ids_ptr, wt_ptr, E, stride_l,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr, RENORM: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    pdl_sync(USE_PDL)
    lg = tl.load(logits_ptr + row * stride_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    top = tl.max(lg, axis=0)
    ex = tl.where(ok, tl.exp(lg - top), 0.0)
    probs = ex / tl.sum(ex, axis=0)
    kk = tl.arange(0, K_PAD)
    ids = tl.full((K_PAD,), -1, dtype=tl.int64)
    wts = tl.zeros((K_PAD,), dtype=tl.float32)
    left = lg
    for j in tl.static_range(K):
        best = tl.max(left, axis=0)
        pick = tl.min(tl.where(left == best, e, BLOCK_E), axis=0)
        ids = tl.where(kk == j, pick.to(tl.int64), ids)
        wts = tl.where(kk == j, tl.sum(tl.where(e == pick, probs, 0.0), axis=0), wts)
        left = tl.where(e == pick, float("-inf"), left)
    if RENORM:
        wts = wts / tl.sum(wts, axis=0)
    tl.store(ids_ptr + row * K + kk, ids, mask=kk < K)
    tl.store(wt_ptr + row * K + kk, wts, mask=kk < K)


def route_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [rows, experts] (any float dtype, rows contiguous along experts) -> (expert ids [rows, top_k]
    int64, weights [rows, top_k] float32), largest first; what `moe_ref.route_topk` computes without its
    per-row k. The rows' k must not exceed the experts."""
    rows, experts = logits.shape
    if not 0 < top_k <= experts:
        raise ValueError(f"route_topk: top_k must be in [1, {experts}], got {top_k}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    ids = torch.empty(rows, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(rows, top_k, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return ids, weights
    block = triton.next_power_of_2(experts)
    _route_kernel[(rows,)](
        logits, ids, weights, experts, logits.stride(0), K=top_k, K_PAD=triton.next_power_of_2(top_k),
        BLOCK_E=block, RENORM=renormalize, num_warps=1 if block <= 256 else 4, **pdl_args(logits),
    )  # fmt: skip
    return ids, weights
