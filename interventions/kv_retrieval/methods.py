"""The three retrieval methods as tensor functions (docs/architecture.md §10, "KV retrieval"): per-block
summaries written when a block fills, a row's scores of its blocks, the budget per layer and the choice.

Every function takes batched tensors and uses device ops of fixed shapes only (no host sync), so the
hook runs inside decode CUDA graphs. Method ids: INFLLM 0, QUEST 1, ACTQKV 2.
"""

from __future__ import annotations

import torch

INFLLM, QUEST, ACTQKV = 0, 1, 2
METHODS = {"infllm": INFLLM, "quest": QUEST, "actqkv": ACTQKV}


def representatives(qb: torch.Tensor, kb: torch.Tensor, scale: float, count: int) -> torch.Tensor:
    """InfLLM's representative keys of full blocks: the mean of the `count` keys of each block that
    receive the most attention within it, per KV head. qb [k, bs, Hq, D] the block's queries, kb
    [k, bs, Hk, D] its keys (both with rotary). Each query's softmax is taken over the block's bs keys
    (InfLLM takes it over its local window; the block is the window that exists when it fills); a key's
    score sums what it receives from the block's queries and from every query head of its KV head.
    -> [k, Hk, D] float32."""
    k, bs, hq, d = qb.shape
    hk = kb.shape[2]
    qf = qb.float().view(k, bs, hk, hq // hk, d)
    kf = kb.float()
    att = (torch.einsum("kjhgd,kmhd->khgjm", qf, kf) * scale).softmax(-1)
    received = att.sum(dim=(2, 3))  # [k, Hk, bs]
    top = received.topk(count, dim=-1).indices  # [k, Hk, count]
    keys = kf.permute(0, 2, 1, 3)  # [k, Hk, bs, D]
    return keys.gather(2, top.unsqueeze(-1).expand(-1, -1, -1, d)).mean(2)


def quest_bounds(kb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's per-block elementwise (min, max) of the keys, per KV head: kb [k, bs, Hk, D] -> two
    [k, Hk, D]."""
    return kb.amin(1), kb.amax(1)


def fold_heads(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q [R, Hq, D] summed over each KV head's query heads -> [R, Hk, D] float32: sum_h q_h . x_g(h) =
    sum_g (sum_{h in g} q_h) . x_g, so one product per KV head scores a block for all its query heads."""
    r, hq, d = q.shape
    return q.float().view(r, kv_heads, hq // kv_heads, d).sum(2)


def quest_terms(q: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's upper bound sum_h sum_d max(q_hd mn_gd, q_hd mx_gd) = sum_g (P_g . mx_g + N_g . mn_g) with P
    (N) the query's positive (negative) parts summed per KV head (mx >= mn): -> (P, N) [R, Hk, D]."""
    r, hq, d = q.shape
    qf = q.float().view(r, kv_heads, hq // kv_heads, d)
    return qf.clamp(min=0).sum(2), qf.clamp(max=0).sum(2)


def activation_probe(
    ring: torch.Tensor, valid: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
    """ActQKV's probe query: the window's queries weighted by their activation bias. ring [R, T, Hq, D]
    (the row's last T queries, the current one included), valid [R, T] bool, mean/var [R, Hq*D] the
    row's running statistics of its queries. A token's bias is the mean over channels of
    (x - mean)^2 / (var + mean(var) / 100); the weights are the biases normalised to sum to 1.
    -> [R, Hq, D] float32."""
    r, t, hq, d = ring.shape
    x = ring.float().reshape(r, t, hq * d)
    denom = var + var.mean(-1, keepdim=True) / 100
    bias = ((x - mean.unsqueeze(1)) ** 2 / denom.clamp_min(1e-20).unsqueeze(1)).mean(-1)  # [R, T]
    w = torch.where(valid, bias, torch.zeros_like(bias))
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    return (w.unsqueeze(-1) * x).sum(1).view(r, hq, d)


def gathered_scores(
    a: torch.Tensor,
    x: torch.Tensor,
    tables: torch.Tensor,
    ncols: torch.Tensor,
    b: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """`kernels.kv_scores` without Triton (the CPU path): gathers the summaries of every listed block."""
    ids = tables.long()
    s = torch.einsum("rgd,rcgd->rc", a, x[ids].float())
    if b is not None and y is not None:
        s = s + torch.einsum("rgd,rcgd->rc", b, y[ids].float())
    col = torch.arange(tables.shape[1], device=tables.device)
    return torch.where(col.unsqueeze(0) < ncols.unsqueeze(1), s, float("-inf"))


def block_scores(
    a: torch.Tensor,
    x: torch.Tensor,
    tables: torch.Tensor,
    ncols: torch.Tensor,
    b: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores [R, W] float32 of each row's first ncols[r] listed blocks (-inf after): the Triton kernel
    on CUDA (power-of-two head sizes), gathered torch ops elsewhere."""
    d = x.shape[-1]
    if a.is_cuda and d >= 16 and d & (d - 1) == 0:
        from actserve.kernels.kv_scores import kv_scores

        return kv_scores(a.contiguous(), x, tables, ncols.int(), b, y)
    return gathered_scores(a, x, tables, ncols, b, y)


def normalized_entropy(scores: torch.Tensor, n_cand: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(scores) over a row's candidates (-inf elsewhere) divided by log(candidates):
    1 for flat scores, near 0 for one dominant block. [R] float32 (1 where fewer than 2 candidates)."""
    logp = scores.log_softmax(-1)
    p = logp.exp()
    h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    n = n_cand.float()
    return torch.where(n >= 2, h / n.clamp(min=2).log(), torch.ones_like(h)).nan_to_num(1.0)


def layer_blocks(
    ent: torch.Tensor, layer: int, remaining: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor
) -> torch.Tensor:
    """ActQKV's per-layer budget: layer `layer` takes the share ent[l] / sum_{j>=l} ent[j] of the blocks
    left for it and the layers after it (ent [R, L]: running means of each layer's normalised entropy),
    rounded and kept within [kmin, kmax]. -> [R] int64."""
    share = ent[:, layer] / ent[:, layer:].sum(-1).clamp_min(1e-6)
    k = torch.round(share * remaining)
    return torch.minimum(torch.maximum(k, kmin.float()), kmax.float()).long()


def choose(scores: torch.Tensor, k_sel: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k_sel[r] best-scoring columns of each row (among at most `width`), in ascending column order,
    padded with W (the table width): (columns [R, width'], count [R]) with width' = min(width, W)."""
    w = scores.shape[1]
    kk = min(width, w)
    val, idx = scores.topk(kk, dim=1)
    rank = torch.arange(kk, device=scores.device).unsqueeze(0)
    picked = (rank < k_sel.unsqueeze(1)) & torch.isfinite(val)
    cols = torch.where(picked, idx, torch.full_like(idx, w)).sort(dim=1).values
    return cols, picked.sum(1)


def build_tables(
    tables: torch.Tensor,
    lens: torch.Tensor,
    sink: torch.Tensor,
    win_start: torch.Tensor,
    mid: torch.Tensor,
    count: torch.Tensor,
    block_size: int,
    mid_are_ids: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's new table: its first `sink` blocks, then `count` middle blocks (`mid` [R, K]: ascending
    columns of `tables` padded with W, or block ids when `mid_are_ids`), then its blocks from column
    `win_start` to its last; zeros after. Its length counts those blocks' tokens (the last one partial).
    All [R] arguments int64."""
    r, w = tables.shape
    kk = mid.shape[1]
    j = torch.arange(w, device=tables.device).unsqueeze(0)
    s, m, ws = sink.unsqueeze(1), count.unsqueeze(1), win_start.unsqueeze(1)
    n = (lens.long() + block_size - 1) // block_size
    in_sink = j < s
    in_mid = (j >= s) & (j < s + m)
    in_win = (j >= s + m) & (j < s + m + (n.unsqueeze(1) - ws))
    src = torch.where(in_sink, j, ws + (j - s - m)).clamp(0, w - 1)
    base = tables.gather(1, src)
    pick = mid.gather(1, (j - s).clamp(0, kk - 1))
    if not mid_are_ids:
        pick = tables.gather(1, pick.clamp(max=w - 1))
    out = torch.where(
        in_mid, pick.to(tables.dtype), torch.where(in_sink | in_win, base, torch.zeros_like(base))
    )
    new_len = (sink + count) * block_size + (lens.long() - win_start * block_size)
    return out, new_len.to(lens.dtype)
