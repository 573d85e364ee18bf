"""Sparse decode GEMV y = threshold(x) @ W^T (+ bias) for 1-16 rows: only the weight rows of active
inputs are read (activation sparsity, TEAL; docs/architecture.md §6, "Activation sparsity").

The weight is stored transposed, W^T [K, N], so that an input entry that is zero in every row of the
step is one contiguous row of W^T that is not loaded at all (its loads are predicated off: no memory
transaction). Each row m has a threshold thr[m] (float32): entries with |x| < thr[m] count as zero, as
the sparsity plugin's mask has them (so thr <= 0 keeps every entry, +inf none); with several rows the
weight rows of the union of their active entries are read. The threshold is applied here, in the loads,
so no masked copy of x is written first; `silu_mul=True` forms the down projection's input
silu(gate)·up from a fused [gate | up] row while loading (rounded to the storage dtype exactly as
kernels/silu_mul.py does) and thresholds that.

Grid: (N tiles, K splits). bf16 has no atomic add in Triton (TEAL's kernel is fp16-only for that
reason), and a K split's partial sums are float32 anyway, so they meet in one of three ways (`accum`):
- "serial": each program stores its partial tile in a float32 workspace [splits, M, N], then counts
  itself in a per-tile counter; the last program of a tile sums the partials (a few splits per load, in
  a fixed order), adds the bias and writes the output (one launch, deterministic; the counters reset
  themselves);
- "workspace": the same partials, summed by a second small kernel (two launches, deterministic);
- "atomic": float32 atomic adds into a [M, N] buffer kept zero between launches; the last program of a
  tile (counted as in "serial") casts it to the output and zeroes it (one launch, no partials stored;
  the order of the adds, hence the last bits, varies from run to run);
- "atomic_cast": the same adds, without the counter; a second small kernel casts and zeroes the buffer
  (two launches; no program waits on its adds, as the counter's fence makes it).
A program of one row whose K split is one block (`ONE_SHOT`) loads its x block and then its whole weight
tile at once, and reduces it across the threads: no loop of dependent loads.
One row whose sums a reader takes as they are (`sums_key`, the decode hot path): the atomic adds land in
a float32 buffer of that key and no cast kernel runs; the reader rounds them to the model dtype (as the
cast would, so the bits are the same) and zeroes them: kernels/rope_kv.py (qkv), kernels/steer_rmsnorm.py
(o and down: the residual add), this kernel itself (gate/up, `X_SUMS`: the down projection reads the
gate/up sums, silu·mul formed from the rounded values; the residual add after it zeroes them), or
`settle_sums` for any other reader. That removes the cast launch of each projection of a fused step.
One split writes the output directly. One row accumulates products elementwise and reduces once at
the end; 2-16 rows use `tl.dot` on a 16-row tile (tensor cores). `threshold=None` is the same kernel
without the mask: the dense GEMV on the transposed layout (bench/sparse_gemv.py compares layouts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from actserve.kernels.gemv import load_x, silu_mul_round
from actserve.kernels.gemv_ref import MAX_ROWS
from actserve.kernels.pdl import pdl_args, pdl_sync

Accum = Literal["serial", "workspace", "atomic", "atomic_cast"]
ACCUMS: tuple[Accum, ...] = ("serial", "workspace", "atomic", "atomic_cast")
_DIRECT, _WORKSPACE, _ATOMIC, _SERIAL, _ATOMIC_CAST = 0, 1, 2, 3, 4
_ACCUM_CODE = {"workspace": _WORKSPACE, "atomic": _ATOMIC, "serial": _SERIAL, "atomic_cast": _ATOMIC_CAST}


@dataclass(frozen=True)
class SparseGemvConfig:
    block_n: int = 128
    block_k: int = 32
    splits: int = 0  # K splits; 0: from the shape (`pick_splits`)
    num_warps: int = 4
    num_stages: int = 3
    # one row: 1 streams W^T from registers (occupancy hides the latency, as kernels/gemv.py's one-row
    # loop); 2+ software-pipelines it through shared memory (cp.async), which the dependent mask keeps
    # Triton from doing by itself. 2-16 rows are pipelined through tl.dot anyway (`num_stages`)
    loop_stages: int = 1
    accum: Accum = "serial"
    programs: int = 1056  # the launch size `pick_splits` aims at (8 per H200 SM)


ONE_BLOCK = 1 << 20  # a `programs` value that gives every program one K block (ONE_SHOT for one row)


def pick_config(m: int, n: int, k: int) -> SparseGemvConfig:
    """Launch config per row count: the H200 sweeps' best over one Llama-3-8B layer at 50% sparsity.
    One row: narrow tiles of one K block each, one warp, atomic sums (65.1 us a layer against 72.6 for
    two warps of 256 x 32 (K x N) tiles and 96 for the loop's best: bench/results/sparse_gemv_sweep2.json
    `sweep_best_m1`, sparse_gemv_sweep.json; then 1.78x torch bf16 a layer, TEAL's kernel 1.40x, in
    bench/results/sparse_gemv.json); more rows: the loop (sparse_gemv_quick.json, `sweep_best_m8`)."""
    if m == 1:
        return SparseGemvConfig(block_n=64, block_k=128, num_warps=1, programs=ONE_BLOCK, accum="atomic_cast")
    return SparseGemvConfig(block_n=128, block_k=32, num_warps=4, num_stages=3, programs=528)


def pick_splits(n_tiles: int, k: int, cfg: SparseGemvConfig) -> int:
    """K splits so that the launch has about `cfg.programs` programs (at least one K block each)."""
    if cfg.splits:
        return cfg.splits
    return max(1, min(triton.cdiv(k, cfg.block_k), cfg.programs // max(n_tiles, 1)))


@triton.jit
def load_x_rounded(x_ptr, k_half, rk, mask, SILU_MUL: tl.constexpr, DTYPE: tl.constexpr):
    """One row of float32 sums, each rounded to DTYPE first (what the cast kernel would have stored),
    then silu·mul of [gate | up] as `load_x` forms it."""
    if SILU_MUL:
        gate = tl.load(x_ptr + rk, mask=mask, other=0.0).to(DTYPE)
        up = tl.load(x_ptr + k_half + rk, mask=mask, other=0.0).to(DTYPE)
        return silu_mul_round(gate, up)
    return tl.load(x_ptr + rk, mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, thr_ptr, wt_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, k_split, splits,
    stride_xm, stride_thr, stride_wk, stride_ym, stride_ws,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, THRESHOLD: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, ACCUM: tl.constexpr, PREC: tl.constexpr,
    LOOP_STAGES: tl.constexpr, SUM_CHUNK: tl.constexpr, ONE_SHOT: tl.constexpr, USE_PDL: tl.constexpr,
    X_SUMS: tl.constexpr = False, cnt_tab_ptr=None, cnt_at_ptr=None, COUNT: tl.constexpr = False,
):  # fmt: skip
    """Program (n tile, K split): rows k of W^T in [split * k_split, +k_split) whose input is active in
    some row, times the thresholded inputs, for BLOCK_N output columns. X_SUMS: x is a previous launch's
    float32 sums, rounded to y's dtype on load (one row, ONE_SHOT)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    k_lo = split * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    w_cols = wt_ptr + rn[None, :]
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    pdl_sync(USE_PDL)
    if BLOCK_M == 1 and ONE_SHOT:
        # one [BLOCK_K, BLOCK_N] tile per program: x, then the weight rows it keeps, in flight at once
        rk = k_lo + tl.arange(0, BLOCK_K)
        on = rk < K
        if X_SUMS:
            x = load_x_rounded(x_ptr, K, rk, on, SILU_MUL, y_ptr.dtype.element_ty).to(tl.float32)
        else:
            x = load_x(x_ptr, 0, K, rk, on, SILU_MUL).to(tl.float32)
        if THRESHOLD:
            below = on & (tl.abs(x) < tl.load(thr_ptr))
            if COUNT:  # the first N tile's programs count their K block (`count`)
                if pid_n == 0:
                    at = tl.load(cnt_at_ptr).to(tl.int64)
                    if at >= 0:
                        n_below = tl.sum(below.to(tl.int32), axis=0).to(tl.float64)
                        tl.atomic_add(cnt_tab_ptr + at * 2, n_below, sem="relaxed")
                        n_in = tl.sum(on.to(tl.int32), axis=0).to(tl.float64)
                        tl.atomic_add(cnt_tab_ptr + at * 2 + 1, n_in, sem="relaxed")
            on = on & ~below
        w_at = w_cols + rk.to(tl.int64)[:, None] * stride_wk
        w = tl.load(w_at, mask=on[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
        acc = tl.sum(w.to(tl.float32) * tl.where(on, x, 0.0)[:, None], axis=0)[None, :]
    elif BLOCK_M == 1:
        if THRESHOLD:
            thr = tl.load(thr_ptr)
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES):
            rk = k0 + tl.arange(0, BLOCK_K)
            on = rk < k_hi
            x = load_x(x_ptr, 0, K, rk, on, SILU_MUL).to(tl.float32)
            if THRESHOLD:
                on = on & ~(tl.abs(x) < thr)
            w = tl.load(
                w_cols + rk.to(tl.int64)[:, None] * stride_wk, mask=on[:, None] & n_ok[None, :], other=0.0
            )
            acc2 += w.to(tl.float32) * tl.where(on, x, 0.0)[:, None]
        acc = tl.sum(acc2, axis=0)[None, :]
    else:
        if THRESHOLD:  # rows past M: +inf, never active
            thr = tl.load(thr_ptr + rm * stride_thr, mask=m_ok, other=float("inf"))
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < k_hi
            on = m_ok[:, None] & k_ok[None, :]
            x = load_x(x_ptr, rm[:, None] * stride_xm, K, rk[None, :], on, SILU_MUL)
            if THRESHOLD:
                on = on & ~(tl.abs(x.to(tl.float32)) < thr[:, None])
                x = tl.where(on, x, tl.zeros_like(x))
                active = tl.max(on.to(tl.int32), axis=0) > 0  # the union over the rows
            else:
                active = k_ok
            w_at = w_cols + rk.to(tl.int64)[:, None] * stride_wk
            w = tl.load(w_at, mask=active[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(x, w, input_precision=PREC)
    y_mask = m_ok[:, None] & n_ok[None, :]
    tile = rm[:, None] * N + rn[None, :]  # in a float32 [M, N] slice of the workspace
    if ACCUM == 0:  # one split: the output itself
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    elif ACCUM == 4:  # the second kernel casts and zeroes
        tl.atomic_add(ws_ptr + tile, acc, mask=y_mask, sem="relaxed")
    elif ACCUM == 2:
        # float32 adds into a workspace that is zero between launches; the tile's last program (counted
        # as in "serial") casts it to the output and zeroes it again: one launch, no partials stored
        tl.atomic_add(ws_ptr + tile, acc, mask=y_mask, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == splits - 1:
            total = tl.load(ws_ptr + tile, mask=y_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            y_at = y_ptr + rm[:, None] * stride_ym + rn[None, :]
            tl.store(y_at, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.store(ws_ptr + tile, tl.zeros_like(total), mask=y_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
    else:
        tl.store(ws_ptr + split * stride_ws + tile, acc, mask=y_mask)
        if ACCUM == 3:
            # every thread's partial is stored before the tile's counter moves (release); the program
            # that brings it to `splits` reads them all back from L2 (.cg: not a stale L1 line)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == splits - 1:
                # SUM_CHUNK partials per load, summed in a fixed tree: a few round trips to L2 for the
                # tile's last program instead of one per split (the launch's tail)
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                rs = tl.arange(0, SUM_CHUNK)
                for s0 in range(0, splits, SUM_CHUNK):
                    ss = s0 + rs
                    at = ws_ptr + ss[:, None, None] * stride_ws + tile[None, :, :]
                    part_ok = (ss < splits)[:, None, None] & y_mask[None, :, :]
                    total += tl.sum(tl.load(at, mask=part_ok, other=0.0, cache_modifier=".cg"), axis=0)
                if HAS_BIAS:
                    total += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                y_at = y_ptr + rm[:, None] * stride_ym + rn[None, :]
                tl.store(y_at, total.to(y_ptr.dtype.element_ty), mask=y_mask)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next launch


@triton.jit
def _sum_splits_kernel(
    ws_ptr, b_ptr, y_ptr, N, splits, stride_ws, stride_ym,
    BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """y[m] = sum over splits of ws[s, m] (in split order) + bias, cast to y's dtype; ZERO: one split,
    zeroed after the read ("atomic_cast": the buffer stays zero between launches)."""
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_ok = rn < N
    pdl_sync(USE_PDL)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        total += tl.load(ws_ptr + s * stride_ws + m * N + rn, mask=n_ok, other=0.0)
    if HAS_BIAS:
        total += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, total.to(y_ptr.dtype.element_ty), mask=n_ok)
    if ZERO:
        tl.store(ws_ptr + m * N + rn, tl.zeros_like(total), mask=n_ok)


# per device (and key), every buffer handed out, the largest last: never freed, since CUDA graphs keep
# the pointer they captured
_counters: dict[tuple[torch.device, str], list[torch.Tensor]] = {}


def _zeroed(
    store: dict[tuple[torch.device, str], list[torch.Tensor]],
    device: torch.device,
    size: int,
    dtype: torch.dtype,
    key: str = "",
) -> torch.Tensor:
    """A zeroed buffer of at least `size` from `store`, grown by a new one (the old stay alive)."""
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device here
        device = torch.device("cuda", torch.cuda.current_device())
    have = store.setdefault((device, key), [])
    if not have or have[-1].numel() < size:
        have.append(torch.zeros(max(size, 4096), dtype=dtype, device=device))
    return have[-1]


def tile_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    """The "serial" and "atomic" modes' per-tile arrival counters on `device`: zero between launches (the
    last program of each tile resets its own), shared by the launches on the device's one compute stream."""
    return _zeroed(_counters, device, n_tiles, torch.int32)


_sums: dict[tuple[torch.device, str], list[torch.Tensor]] = {}


def atomic_sums(device: torch.device, size: int, key: str = "") -> torch.Tensor:
    """The atomic modes' float32 sums on `device`, zero between launches (each tile's last program or the
    cast kernel zeroes them), shared like `tile_counters`. `key` (a projection's name): the buffer of the
    sums a launch leaves for its reader (`sums_key`); sums of different keys may be pending at once."""
    return _zeroed(_sums, device, size, torch.float32, key)


HALF = (torch.bfloat16, torch.float16)


def is_sums(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `t` is a one-row launch's pending float32 sums (`sparse_gemv(sums_key=...)`) where the
    model computes in the half `dtype`: the reader rounds them to `dtype` and zeroes them."""
    return t.dtype == torch.float32 and dtype in HALF


def sparse_gemv(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    thr: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
    cfg: SparseGemvConfig | None = None,
    sums_key: str | None = None,
    count: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """threshold(x [M, K], thr [M] float32) @ weight_t [K, N] (+ bias) -> [M, N] in weight_t's dtype; thr
    None: no threshold (dense); with silu_mul, x is [M, 2K] = [gate | up]. `thr` may be a strided view.
    x may be a previous launch's pending float32 sums (`is_sums`, one row): rounded on load, left as they
    are (the caller's reader zeroes them). `sums_key`: a one-row launch without bias whose K splits meet
    in atomic adds returns those float32 sums [1, N] unrounded, in the buffer of that key, for a reader
    that rounds and zeroes them (module docstring); any other launch ignores it and returns the output.
    `count` (table float64 [slots, 2], at int32 [1]), one thresholded row: also adds the row's entries
    below its threshold and its entries to table[at] (at < 0: nothing), what kernels/sparsity_ops.py's
    count kernel adds, without its launch."""
    m, kx = x.shape
    k, n = weight_t.shape
    if m > MAX_ROWS:
        raise ValueError(f"sparse_gemv handles at most {MAX_ROWS} rows; got {m}")
    if kx != (2 * k if silu_mul else k) or weight_t.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(
            f"sparse_gemv: x {tuple(x.shape)} does not match weight_t {tuple(weight_t.shape)} "
            "(the transposed weight [K, N], N-contiguous)"
        )
    if thr is not None and (thr.shape != (m,) or thr.dtype != torch.float32):
        raise ValueError(f"sparse_gemv: thresholds must be float32 [{m}], got {thr.dtype} {tuple(thr.shape)}")
    x_sums = x.dtype != weight_t.dtype
    if x_sums and not (is_sums(x, weight_t.dtype) and m == 1):
        raise ValueError(f"sparse_gemv: x {x.dtype} under {weight_t.dtype} weights (one row of sums only)")
    cfg = cfg or pick_config(m, n, k)
    n_tiles = triton.cdiv(n, cfg.block_n)
    k_split = triton.cdiv(triton.cdiv(k, pick_splits(n_tiles, k, cfg)), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_split)
    one_shot = m == 1 and k_split == cfg.block_k
    if (x_sums or count is not None) and not one_shot:
        raise ValueError("sparse_gemv: float32 sums as x, or a count, need the one-row one-shot config")
    if count is not None and (thr is None or count[0].dtype != torch.float64 or count[1].shape != (1,)):
        raise ValueError("sparse_gemv: a count needs thresholds, a float64 table and one row's int32 index")
    mode = _DIRECT if splits == 1 else _ACCUM_CODE[cfg.accum]
    keep = (
        sums_key is not None and m == 1 and mode == _ATOMIC_CAST and bias is None and weight_t.dtype in HALF
    )
    y = torch.empty(m, n, dtype=weight_t.dtype, device=x.device)
    if not m:
        return y
    ws, counters = y, y  # placeholders for pointers a mode does not read
    if mode in (_ATOMIC, _ATOMIC_CAST):
        ws = atomic_sums(x.device, m * n, sums_key if keep and sums_key else "")
    elif mode != _DIRECT:
        ws = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    if mode in (_SERIAL, _ATOMIC):
        counters = tile_counters(x.device, n_tiles)
    launch = pdl_args(x)
    cnt_tab, cnt_at = count if count is not None else (y, y)
    _sparse_gemv_kernel[(n_tiles, splits)](
        x, thr if thr is not None else x, weight_t, bias if bias is not None else x, y, ws, counters,
        m, n, k, k_split, splits, x.stride(0), thr.stride(0) if thr is not None else 0, weight_t.stride(0),
        y.stride(0), m * n, BLOCK_M=1 if m == 1 else MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        THRESHOLD=thr is not None, HAS_BIAS=bias is not None, SILU_MUL=silu_mul, ACCUM=mode,
        PREC="ieee" if x.dtype == torch.float32 else "tf32", LOOP_STAGES=cfg.loop_stages,
        SUM_CHUNK=8 if m == 1 else 2, ONE_SHOT=one_shot, X_SUMS=x_sums,
        cnt_tab_ptr=cnt_tab, cnt_at_ptr=cnt_at, COUNT=count is not None, **launch,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if keep:
        return ws[: m * n].view(m, n)
    if mode in (_WORKSPACE, _ATOMIC_CAST):
        block = 1024
        _sum_splits_kernel[(triton.cdiv(n, block), m)](
            ws, bias if bias is not None else x, y, n, splits if mode == _WORKSPACE else 1, m * n,
            y.stride(0), BLOCK=block, HAS_BIAS=bias is not None, ZERO=mode == _ATOMIC_CAST, **launch,
        )  # fmt: skip
    return y


def settle_sums(sums: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pending sums [rows, N] (contiguous) as a `dtype` tensor, the buffer zeroed: the cast kernel, for a
    reader that does not take float32 sums itself."""
    rows, n = sums.shape
    y = torch.empty(rows, n, dtype=dtype, device=sums.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(n, block), rows)](
        sums, sums, y, n, 1, rows * n, y.stride(0), BLOCK=block, HAS_BIAS=False, ZERO=True, **pdl_args(sums)
    )
    return y
