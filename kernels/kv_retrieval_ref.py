"""Plain-torch reference of the KV-retrieval decode kernels (kernels/kv_retrieval.py): one decode row per
sequence, each holding a slot of per-sequence state (docs/architecture.md §10, "KV retrieval").

Row configuration `cfg` [R, 8] int32 (slot -1: a row of another request, which these leave alone):
slot, method (0 InfLLM, 1 Quest, 2 ActQKV), retrieved blocks per layer k, sink blocks, window blocks,
position, offloaded (1: its cold blocks are on the host), lag (1: the step reads the blocks chosen at
the previous step). All state tensors are one layer's views.

Per layer and step: `append` (the row's query into its slot's ring, its running statistics, its
activation bias), `query_vectors` (what scores a block: the query, its signed parts, or ActQKV's probe,
summed per KV head), `scores` (each candidate block), `budget` (blocks this layer takes), `choose` (the
best ones, ties in column order), `tables` (the table the attention kernel reads) and, with a host
tier, `stage` (chosen host blocks read through the slot's reserved GPU blocks; the copies to make).
`summaries` writes a block's summaries when a row's token completes it.

Lag 1 (one step stale): `lagged` tells which rows hold a valid choice made at the previous step (its
candidate columns, and with a host tier the reserved positions its host blocks were recalled to);
`assemble` builds their tables from it with the current sink and window; the other rows choose afresh
as above. Every lag-1 row's choice from this step's query is kept (`remember`) for the next step. These
functions are also what the plugin runs on the CPU.
"""

from __future__ import annotations

import torch

SLOT, METHOD, RETRIEVE, SINK, WINDOW, POS, OFFLOAD, LAG = range(8)
COLUMNS = 8
INFLLM, QUEST, ACTQKV = 0, 1, 2
ENTROPY_RATE = 0.1


def geometry(cfg: torch.Tensor, lens: torch.Tensor, block_size: int) -> tuple[torch.Tensor, ...]:
    """Per row: (blocks n, sink, window start, candidates) as int64: candidates are the columns
    [sink, window start), the window the last `window` blocks (the partly filled one among them)."""
    n = (lens.long() + block_size - 1) // block_size
    sink = cfg[:, SINK].long().clamp(min=0)
    ws = torch.maximum(n - cfg[:, WINDOW].long().clamp(min=0), sink)
    return n, sink, ws, (ws - sink).clamp(min=0)


def append_ref(
    q: torch.Tensor,
    cfg: torch.Tensor,
    ring_q: torch.Tensor,
    ring_pos: torch.Tensor,
    ring_bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: torch.Tensor,
    cap: float,
) -> None:
    """The row's query x joins its slot: running mean and variance per channel (Welford; the count
    stops at `cap`, after which the update weighs the newest query by 1/cap; position 0 starts afresh),
    then its activation bias mean_c (x - mean)^2 / (var + mean(var) / 100) and x itself go into the ring
    at position % ring size. ring_q [S, T, Hq, D], ring_pos/ring_bias [S, T], mean/var [S, C], count [S]."""
    mine = cfg[:, SLOT] >= 0
    s = cfg[mine, SLOT].long()
    p = cfg[mine, POS].long()
    x = q[mine].float().flatten(1)
    fresh = (p == 0).unsqueeze(1)
    n0 = torch.where(p == 0, torch.zeros_like(count[s]), count[s])
    mu = torch.where(fresh, torch.zeros_like(x), mean[s])
    v = torch.where(fresh, torch.ones_like(x), var[s])
    n = n0 + 1
    delta = x - mu
    mu2 = mu + delta / n.unsqueeze(1)
    v2 = (v * n0.unsqueeze(1) + delta * (x - mu2)) / n.unsqueeze(1)
    mean[s], var[s], count[s] = mu2, v2, n.clamp(max=cap)
    denom = (v2 + v2.mean(1, keepdim=True) / 100).clamp_min(1e-20)  # a first query: 0 / 0 -> 0
    at = p % ring_q.shape[1]
    ring_q[s, at] = q[mine].to(ring_q.dtype)
    ring_pos[s, at] = p
    ring_bias[s, at] = ((x - mu2) ** 2 / denom).mean(1)


def query_vectors_ref(
    q: torch.Tensor,
    cfg: torch.Tensor,
    ring_q: torch.Tensor,
    ring_pos: torch.Tensor,
    ring_bias: torch.Tensor,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) [R, Hk, D] float32, per row by its method, summed over each KV head's query heads: InfLLM
    a = q, b = 0; Quest a = max(q, 0), b = min(q, 0) (sum_d max(q mn, q mx) = max(q,0).mx + min(q,0).mn);
    ActQKV a = q + the probe sum_t w_t x_t over the slot's ring entries of the last T positions (the
    current one included: `append` ran first), w = their activation biases normalised to sum to 1 (the
    current query keeps its own weight beside the window's). Rows of other requests get a = q, b = 0
    (their scores are never used)."""
    r, hq, d = q.shape
    g = hq // kv_heads
    qf = q.float()
    method = cfg[:, METHOD].long()
    s = cfg[:, SLOT].long().clamp(min=0)
    p = cfg[:, POS].long()
    t = ring_q.shape[1]
    rp = ring_pos[s]
    valid = (cfg[:, SLOT] >= 0).unsqueeze(1) & (rp >= 0) & (rp <= p[:, None]) & (rp > p[:, None] - t)
    w = torch.where(valid, ring_bias[s], torch.zeros_like(ring_bias[s]))
    w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
    probe = torch.einsum("rt,rthd->rhd", w, ring_q[s].float())
    quest = (method == QUEST).view(r, 1, 1)
    act = (method == ACTQKV) & (cfg[:, SLOT] >= 0)
    a = torch.where(act.view(r, 1, 1), qf + probe, torch.where(quest, qf.clamp(min=0), qf))
    b = torch.where(quest, qf.clamp(max=0), torch.zeros_like(qf))
    return a.view(r, kv_heads, g, d).sum(2), b.view(r, kv_heads, g, d).sum(2)


def scores_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    cfg: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    rep: torch.Tensor | None,
    kmin: torch.Tensor | None,
    kmax: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """[R, W] float32: a row's candidate blocks scored by its method (Quest: a . max + b . min of the
    block's keys; the others: a . its representative key, summed over KV heads); -inf elsewhere and on
    rows of other requests."""
    _, sink, ws, _ = geometry(cfg, lens, block_size)
    ids = tables.long()
    col = torch.arange(tables.shape[1], device=tables.device).unsqueeze(0)
    cand = (col >= sink[:, None]) & (col < ws[:, None]) & (cfg[:, SLOT] >= 0).unsqueeze(1)
    out = torch.full(tables.shape, float("-inf"), dtype=torch.float32, device=a.device)
    quest = cfg[:, METHOD] == QUEST
    safe = torch.where(cand, ids, torch.zeros_like(ids))
    if kmin is not None and kmax is not None:
        sq = torch.einsum("rgd,rcgd->rc", a, kmax[safe].float()) + torch.einsum(
            "rgd,rcgd->rc", b, kmin[safe].float()
        )
        out = torch.where(cand & quest.unsqueeze(1), sq, out)
    if rep is not None:
        sr = torch.einsum("rgd,rcgd->rc", a, rep[safe].float())
        out = torch.where(cand & ~quest.unsqueeze(1), sr, out)
    return out


def budget_ref(
    scores: torch.Tensor,
    cfg: torch.Tensor,
    lens: torch.Tensor,
    entropy: torch.Tensor,
    remaining: torch.Tensor,
    layer: int,
    width: int,
    block_size: int,
) -> torch.Tensor:
    """Blocks each row takes at this layer [R] int64: min(k, candidates), except ActQKV rows, whose
    layer gets the share ent[l] / sum_{j>=l} ent[j] of the blocks left for it and the layers after it
    (layer 0 starts from layers x k), within [max(1, k/2), min(2k, width)], where ent [S, L] are running
    means (EMA, weight 0.1 on the newest) of each layer's entropy of softmax(scores) over the candidates
    divided by log(candidates). Updates `entropy` and `remaining` [S] of ActQKV rows."""
    _, _, _, n_cand = geometry(cfg, lens, block_size)
    k = cfg[:, RETRIEVE].long()
    mine = cfg[:, SLOT] >= 0
    act = mine & (cfg[:, METHOD] == ACTQKV)
    s = cfg[:, SLOT].long().clamp(min=0)
    logp = scores.log_softmax(1)
    pr = logp.exp()
    h = -torch.where(pr > 0, pr * logp, torch.zeros_like(pr)).sum(1)
    h = (h / n_cand.clamp(min=2).float().log()).nan_to_num(1.0)
    upd = act & (n_cand >= 2)
    ent = entropy[s].clone()
    ent[:, layer] = torch.where(upd, (1 - ENTROPY_RATE) * ent[:, layer] + ENTROPY_RATE * h, ent[:, layer])
    rem = (k * entropy.shape[1]).float() if layer == 0 else remaining[s]
    share = ent[:, layer] / ent[:, layer:].sum(1).clamp_min(1e-6)
    kmin, kmax = (k // 2).clamp(min=1), torch.clamp(2 * k, max=width)
    k_l = torch.minimum(torch.maximum(torch.floor(share * rem + 0.5), kmin.float()), kmax.float()).long()
    entropy[s[act]] = ent[act]
    remaining[s[act]] = (rem - k_l.float())[act]
    k_sel = torch.where(act, k_l, k)
    return torch.where(mine, torch.minimum(k_sel, n_cand), torch.zeros_like(k_sel))


def choose_ref(scores: torch.Tensor, k_sel: torch.Tensor) -> torch.Tensor:
    """[R, W] bool: each row's `k_sel[r]` best finite scores (-inf marks non-candidates), equal scores
    taken in ascending column order (a stable sort: the kernel breaks ties the same way)."""
    finite = torch.isfinite(scores)
    key = torch.where(finite, scores, torch.full_like(scores, float("-inf")))
    order = key.sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return finite & (rank < k_sel.unsqueeze(1))


def tables_ref(
    tables: torch.Tensor,
    lens: torch.Tensor,
    cfg: torch.Tensor,
    chosen: torch.Tensor,
    counters: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tables, lengths) the attention kernel reads: a retrieving row (more candidates than k, or
    offloaded) gets its sink blocks, then its chosen columns' blocks (`chosen` [R, W], in ascending
    column order), then its window; entries past its new length are not read (here: left as they
    were). Other rows keep theirs. counters[:2] += (blocks chosen, 1) per retrieving row."""
    n, sink, ws, n_cand = geometry(cfg, lens, block_size)
    w = tables.shape[1]
    mine = cfg[:, SLOT] >= 0
    off = mine & (cfg[:, OFFLOAD] > 0)
    m = chosen.sum(1)
    col = torch.arange(w, device=tables.device).unsqueeze(0)
    cols = torch.where(chosen, col, torch.full_like(col, w)).sort(1).values  # chosen first, ascending
    retrieve = mine & ((n_cand > cfg[:, RETRIEVE].long()) | off)
    counters[:2] += torch.stack([(m * retrieve).sum(), retrieve.sum()]).to(counters.dtype)
    sk, mn, w0 = sink.unsqueeze(1), m.unsqueeze(1), ws.unsqueeze(1)
    in_sink = col < sk
    in_mid = (col >= sk) & (col < sk + mn)
    in_win = (col >= sk + mn) & (col < sk + mn + n.unsqueeze(1) - w0)
    src = torch.where(in_sink, col, w0 + col - sk - mn)
    src = torch.where(in_mid, cols.gather(1, (col - sk).clamp(0, w - 1)), src).clamp(0, w - 1)
    write = retrieve.unsqueeze(1) & (in_sink | in_mid | in_win)
    out = torch.where(write, tables.gather(1, src), tables)
    new_len = (sink + m) * block_size + lens.long() - ws * block_size
    return out, torch.where(retrieve, new_len, lens.long()).to(lens.dtype)


def stage_ref(
    out: torch.Tensor,
    lens: torch.Tensor,
    cfg: torch.Tensor,
    chosen_n: torch.Tensor,
    held: torch.Tensor,
    reserved_base: int,
    host_base: int,
    counters: torch.Tensor,
    block_size: int,
    at: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The host tier for offloaded rows, after `tables_ref`: each chosen block with a host id (>=
    `host_base`) is read from one of the slot's reserved GPU blocks instead (reserved_base + slot x
    width + position, `held` [S, width] the host id each position holds, -1 none): the position that
    holds it already, else the free positions (those holding no chosen block) in ascending order, taken
    by the missing ids in table order. `out` is rewritten and `held` updated in place; returns the
    copies to make, (host ids [R, width], GPU ids [R, width], counts [R]) int32, and counters[2] +=
    the copies. `at` [R, width] (optional): per chosen entry, the position it is read from (-1: a GPU
    id), for offloaded rows."""
    _, sink, _, _ = geometry(cfg, lens, block_size)
    rows, width = out.shape[0], held.shape[1]
    src = torch.zeros(rows, width, dtype=torch.int32, device=out.device)
    dst = torch.zeros_like(src)
    count = torch.zeros(rows, dtype=torch.int32, device=out.device)
    off = (cfg[:, SLOT] >= 0) & (cfg[:, OFFLOAD] > 0)
    for r in off.nonzero().flatten().tolist():
        s, sk, m = int(cfg[r, SLOT]), int(sink[r]), int(chosen_n[r])
        ids = out[r, sk : sk + m].long()
        need = ids >= host_base
        eq = need.unsqueeze(1) & (ids.unsqueeze(1) == held[s].long().unsqueeze(0))  # [m, width]
        pos = torch.where(eq.any(1), eq.int().argmax(1), -1)
        free = (~eq.any(0)).nonzero().flatten()
        miss = (need & (pos < 0)).nonzero().flatten()
        pos[miss] = free[: len(miss)]
        staged = reserved_base + s * width + pos
        held[s, pos[miss]] = ids[miss].to(held.dtype)
        out[r, sk : sk + m] = torch.where(need, staged, ids).to(out.dtype)
        if at is not None:
            at[r, :m] = torch.where(need, pos, -1).to(at.dtype)
        src[r, : len(miss)] = ids[miss].to(torch.int32)
        dst[r, : len(miss)] = staged[miss].to(torch.int32)
        count[r] = len(miss)
    counters[2] += count.sum().to(counters.dtype)
    return src, dst, count


def only_rows(cfg: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`cfg` with the rows outside `keep` [R] bool made rows of other requests (slot -1): what the
    functions above then leave alone."""
    out = cfg.clone()
    out[:, SLOT] = torch.where(keep, cfg[:, SLOT], torch.full_like(cfg[:, SLOT], -1))
    return out


def lagged_ref(
    cfg: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    lag_cols: torch.Tensor,
    lag_n: torch.Tensor,
    lag_tag: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """[R] bool: lag-1 rows whose slot holds a choice made at the previous position (`lag_tag` [S], the
    position it was made at) all of whose columns (`lag_cols` [S, width], `lag_n` [S] of them) are still
    candidates. Others choose afresh: the first step after a prompt, a new slot, and an offloaded row
    whose context the budget covers but whose choice misses a candidate (the block that just left the
    window: without the tier it reads its whole table)."""
    mine = (cfg[:, SLOT] >= 0) & (cfg[:, LAG] > 0)
    s = cfg[:, SLOT].long().clamp(min=0)
    ok = mine & (lag_tag[s] == cfg[:, POS].long() - 1)
    _, sink, ws, n_cand = geometry(cfg, lens, block_size)
    cols = lag_cols[s].long()
    m = lag_n[s].long()
    live = torch.arange(cols.shape[1], device=cols.device).unsqueeze(0) < m.unsqueeze(1)
    ok &= ~(live & ((cols < sink[:, None]) | (cols >= ws[:, None]))).any(1)
    return ok & ~((n_cand <= cfg[:, RETRIEVE].long()) & (cfg[:, OFFLOAD] > 0) & (m < n_cand))


def assemble_ref(
    tables: torch.Tensor,
    lens: torch.Tensor,
    cfg: torch.Tensor,
    lag_cols: torch.Tensor,
    lag_n: torch.Tensor,
    counters: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`tables_ref` of the rows of `cfg` (those `lagged_ref` passed; others slot -1) with the columns
    their slots chose at the previous step, and the current sink and window. With a host tier,
    `stage_ref` then maps their host ids (the kernel finds them where `lag_at` says they were staged)."""
    mine = cfg[:, SLOT] >= 0
    s = cfg[:, SLOT].long().clamp(min=0)
    w = tables.shape[1]
    width = lag_cols.shape[1]
    m = torch.where(mine, lag_n[s].long(), torch.zeros_like(s))
    live = torch.arange(width, device=tables.device).unsqueeze(0) < m.unsqueeze(1)
    cols = torch.where(live, lag_cols[s].long(), torch.full_like(lag_cols[s].long(), w))
    chosen = torch.zeros(tables.shape[0], w + 1, dtype=torch.bool, device=tables.device)
    chosen = chosen.scatter(1, cols, True)[:, :w]
    return tables_ref(tables, lens, cfg, chosen, counters, block_size)


def remember_ref(
    cfg: torch.Tensor,
    chosen: torch.Tensor,
    at: torch.Tensor | None,
    lag_cols: torch.Tensor,
    lag_at: torch.Tensor,
    lag_n: torch.Tensor,
    lag_tag: torch.Tensor,
) -> None:
    """Lag-1 rows of `cfg` keep this step's choice for the next step: the chosen columns ascending (`chosen`
    [R, W] from `choose_ref`), with a host tier the position each was staged at (`at` from `stage_ref`,
    -1 for GPU ids), their count, and the position of the row."""
    keep = ((cfg[:, SLOT] >= 0) & (cfg[:, LAG] > 0)).nonzero().flatten()
    width = lag_cols.shape[1]
    w = chosen.shape[1]
    col = torch.arange(w, device=chosen.device).unsqueeze(0)
    cols = torch.where(chosen, col, torch.full_like(col, w)).sort(1).values
    if cols.shape[1] < width:
        cols = torch.cat([cols, torch.full((cols.shape[0], width - w), w, device=cols.device)], 1)
    for r in keep.tolist():
        s, m = int(cfg[r, SLOT]), int(chosen[r].sum())
        lag_cols[s] = torch.where(cols[r, :width] < w, cols[r, :width], 0).to(lag_cols.dtype)
        lag_at[s] = at[r, :width].to(lag_at.dtype) if at is not None else -1
        lag_n[s] = m
        lag_tag[s] = int(cfg[r, POS])


def representatives_ref(qb: torch.Tensor, kb: torch.Tensor, scale: float, count: int) -> torch.Tensor:
    """InfLLM's representative keys of full blocks: qb [k, bs, Hq, D] the block's queries, kb [k, bs, Hk,
    D] its keys. Each query's softmax over the block's keys; a key's score is the attention it receives
    from the block's queries and its KV head's query heads; the mean of the `count` best keys per KV
    head. -> [k, Hk, D] float32."""
    k, bs, hq, d = qb.shape
    hk = kb.shape[2]
    qf = qb.float().view(k, bs, hk, hq // hk, d)
    kf = kb.float()
    att = (torch.einsum("kjhgd,kmhd->khgjm", qf, kf) * scale).softmax(-1)
    received = att.sum(dim=(2, 3))  # [k, Hk, bs]
    top = received.topk(count, dim=-1).indices
    keys = kf.permute(0, 2, 1, 3)  # [k, Hk, bs, D]
    return keys.gather(2, top.unsqueeze(-1).expand(-1, -1, -1, d)).mean(2)


def summaries_ref(
    cfg: torch.Tensor,
    blocks: torch.Tensor,
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    ring_q: torch.Tensor,
    rep: torch.Tensor | None,
    kmin: torch.Tensor | None,
    kmax: torch.Tensor | None,
    block_size: int,
    scale: float,
    count: int,
) -> None:
    """Each block `blocks[i]` that row `rows[i]`'s token completed (-1: none) writes its summaries if the
    row is this plugin's: InfLLM's representative (`representatives_ref`, the block's queries read from
    the slot's ring) and Quest's elementwise min and max of its keys. k_cache [slots, Hk, D]."""
    ok = (rows >= 0) & (blocks >= 0)
    r = rows[ok].long()
    sel = cfg[r, SLOT] >= 0
    if not bool(sel.any()):
        return
    r, b = r[sel], blocks[ok][sel].long()
    s = cfg[r, SLOT].long()
    p = cfg[r, POS].long()
    offs = torch.arange(block_size, device=blocks.device)
    t = (p.unsqueeze(1) - (block_size - 1) + offs) % ring_q.shape[1]
    qb = ring_q[s.unsqueeze(1), t]
    kb = k_cache[b.unsqueeze(1) * block_size + offs]
    if rep is not None:
        rep[b] = representatives_ref(qb, kb, scale, count).to(rep.dtype)
    if kmin is not None and kmax is not None:
        kmin[b], kmax[b] = kb.amin(1), kb.amax(1)
