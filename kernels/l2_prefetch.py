"""Ask the GPU's L2 cache to fetch memory a later kernel of the step will read, and go on at once.

A batch-1 decode step alternates weight-streaming GEMVs with latency-bound kernels (norms, rope,
attention at short context, routing) during which HBM is idle. A GEMV that ends by prefetching the next
GEMV's weights (`prefetch.global.L2::evict_last`, one 128-byte line per lane, nothing waits for it)
moves that GEMV's HBM reads into the idle stretch between them; the later GEMV then reads L2. Nothing
here changes a result, so there is no plain-torch reference to compare: the tests check the compiled
instruction and that the prefetching launch's outputs are the plain launch's. Triton's interpreter has no
inline assembly, so callers pass PREFETCH=False there (`prefetch_ok`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LINE = tl.constexpr(128)  # bytes per prefetched line


def prefetch_ok(t: torch.Tensor | None) -> bool:
    """Whether a launch may prefetch `t` (a CUDA tensor, compiled kernels)."""
    return t is not None and t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def prefetch_l2(ptrs):
    """Prefetch the lines at `ptrs` into L2, kept ahead of normal lines when L2 must evict."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
        is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def prefetch_share(ptr, nbytes, part, parts, LANES: tl.constexpr):
    """Prefetch this program's share (`part` of `parts`) of the bytes [ptr, ptr + nbytes)."""
    lines = tl.cdiv(nbytes, LINE)
    per = tl.cdiv(lines, parts)
    lo = part * per
    hi = tl.minimum(lo + per, lines)
    base = ptr.to(tl.pointer_type(tl.int8), bitcast=True)
    for i in range(lo, hi, LANES):
        ln = tl.minimum(i + tl.arange(0, LANES), hi - 1)  # past the end: the last line again
        prefetch_l2(base + ln.to(tl.int64) * LINE)


@triton.jit
def _prefetch_kernel(ptr, nbytes, LANES: tl.constexpr):
    prefetch_share(ptr, nbytes, tl.program_id(0), tl.num_programs(0), LANES)


def l2_prefetch(t: torch.Tensor, programs: int = 264) -> None:
    """Prefetch a contiguous CUDA tensor into L2 from `programs` programs (a standalone launch, for
    benchmarks; decode kernels prefetch from their own programs)."""
    if prefetch_ok(t) and t.numel():
        _prefetch_kernel[(programs,)](t, t.numel() * t.element_size(), LANES=128, num_warps=4)
