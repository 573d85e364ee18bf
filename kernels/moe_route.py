"""A mixture-of-experts router's softmax, top-k and renormalisation in one launch (reference:
`kernels/moe_ref.route_topk`). In torch these are five kernels (cast, softmax, topk, sum, divide) of about
2 us each per MoE layer, at batch-1 decode more than the routed experts' own weight reads at Qwen3-30B-A3B
(docs/architecture.md §5, "MoE experts").

One program per row holds the row's logits (the expert count rounded up to a power of two), takes the
softmax in float32 and picks the k largest by k passes of (max, first index of the max): the order of
the logits is the order of the probabilities, and ties go to the lower expert id. Ids come out largest
first, as `torch.topk` gives them.

At decode (`router_topk`, up to ROUTER_MAX_ROWS rows) the router's linear joins the same launch: programs
over the experts compute the logits (weights prefetched before the PDL wait), and the program that
finishes last (an atomic count) routes the rows. One launch instead of a GEMV of 16 programs and the
route kernel behind it: a kernel boundary less per MoE layer on the batch-1 critical path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from actserve.kernels.pdl import pdl_args, pdl_sync


@triton.jit
def _topk_row(lg, e, ok, kk, K: tl.constexpr, BLOCK_E: tl.constexpr, RENORM: tl.constexpr):
    """One row's float32 logits [BLOCK_E] (-inf past the experts) -> (ids [K_PAD] int64, weights [K_PAD]
    float32): softmax, the K largest by K passes of (max, first index of the max), renormalised."""
    top = tl.max(lg, axis=0)
    ex = tl.where(ok, tl.exp(lg - top), 0.0)
    probs = ex / tl.sum(ex, axis=0)
    ids = tl.full(kk.shape, -1, dtype=tl.int64)
    wts = tl.zeros(kk.shape, dtype=tl.float32)
    left = lg
    for j in tl.static_range(K):
        best = tl.max(left, axis=0)
        pick = tl.min(tl.where(left == best, e, BLOCK_E), axis=0)
        ids = tl.where(kk == j, pick.to(tl.int64), ids)
        wts = tl.where(kk == j, tl.sum(tl.where(e == pick, probs, 0.0), axis=0), wts)
        left = tl.where(e == pick, float("-inf"), left)
    if RENORM:
        wts = wts / tl.sum(wts, axis=0)
    return ids, wts


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
    kk = tl.arange(0, K_PAD)
    ids, wts = _topk_row(lg, e, ok, kk, K, BLOCK_E, RENORM)
    tl.store(ids_ptr + row * K + kk, ids, mask=kk < K)
    tl.store(wt_ptr + row * K + kk, wts, mask=kk < K)


# rows up to which `router_topk` runs (decode steps); the router's GEMV and the top-k in one launch
ROUTER_MAX_ROWS = 4


@triton.jit
def _router_topk_kernel(
    x_ptr, w_ptr, logits_ptr, ids_ptr, wt_ptr, cnt_ptr, M, E, H, stride_xm, stride_wn,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_EXP: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, RENORM: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Each program: BLOCK_EXP experts' logits for the M rows (the first weight tile read before the
    wait: no kernel writes weights), rounded to the logits' dtype as the router's linear rounds and
    stored. Then it counts itself done on `cnt` (after a barrier, with acquire-release: the logits this
    program stored are visible to whoever sees the count); the program that counts last reads every
    logit back (`.cg`: from L2, not a stale L1 line), routes each row as `_route_kernel` does, and
    sets the count back to 0 for the next launch."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_EXP + tl.arange(0, BLOCK_EXP)
    n_ok = rn < E
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    rk = tl.arange(0, BLOCK_K)
    k_ok = rk < H
    w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    pdl_sync(USE_PDL)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    acc = tl.sum(w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :], axis=2)
    for k0 in range(BLOCK_K, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < H
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        acc += tl.sum(w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :], axis=2)
    out = logits_ptr + rm[:, None] * E + rn[None, :]
    tl.store(out, acc.to(logits_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    tl.debug_barrier()  # every thread's logits stored before the count
    done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        e = tl.arange(0, BLOCK_E)
        ok = e < E
        kk = tl.arange(0, K_PAD)
        for r in range(0, M):
            lg = tl.load(logits_ptr + r * E + e, mask=ok, other=float("-inf"), cache_modifier=".cg")
            lg = lg.to(tl.float32)
            ids, wts = _topk_row(lg, e, ok, kk, K, BLOCK_E, RENORM)
            tl.store(ids_ptr + r * K + kk, ids, mask=kk < K)
            tl.store(wt_ptr + r * K + kk, wts, mask=kk < K)
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")


def router_topk(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [rows <= ROUTER_MAX_ROWS, hidden] @ weight [experts, hidden].T -> (logits [rows, experts] in x's
    dtype, expert ids [rows, top_k] int64, weights [rows, top_k] float32): the router's linear and
    `route_topk` in one launch. `count` [1] int32, zero: the launch's completion counter, back at zero
    after each launch (one per router: two launches of the same counter must not run at once)."""
    rows, hidden = x.shape
    experts = weight.shape[0]
    if not 0 < top_k <= experts:
        raise ValueError(f"router_topk: top_k must be in [1, {experts}], got {top_k}")
    if not 0 < rows <= ROUTER_MAX_ROWS or weight.shape[1] != hidden:
        raise ValueError(
            f"router_topk: x {tuple(x.shape)} (1 to {ROUTER_MAX_ROWS} rows) does not fit weight "
            f"{tuple(weight.shape)}"
        )
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("router_topk: x and weight must be contiguous along hidden")
    if count.numel() != 1 or count.dtype != torch.int32:
        raise ValueError(f"router_topk: count must be [1] int32, got {tuple(count.shape)} {count.dtype}")
    logits = torch.empty(rows, experts, dtype=x.dtype, device=x.device)
    ids = torch.empty(rows, top_k, dtype=torch.int64, device=x.device)
    weights = torch.empty(rows, top_k, dtype=torch.float32, device=x.device)
    block_m = triton.next_power_of_2(rows)
    block_exp = 1 if experts <= 64 else 2  # 64 programs at 128 experts, each 8 KB of weights at 2048
    block_k = min(triton.next_power_of_2(hidden), 4096 // block_m)
    block_e = triton.next_power_of_2(experts)
    _router_topk_kernel[(triton.cdiv(experts, block_exp),)](
        x, weight, logits, ids, weights, count, rows, experts, hidden, x.stride(0), weight.stride(0),
        K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_M=block_m, BLOCK_EXP=block_exp, BLOCK_K=block_k,
        BLOCK_E=block_e, RENORM=renormalize, num_warps=4, **pdl_args(x),
    )  # fmt: skip
    return logits, ids, weights


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
