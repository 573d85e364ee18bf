"""The host tier's recall on the GPU (Triton version of kernels/kv_tier_ref.py; semantics there): the
programs read the host blocks straight from pinned host memory (mapped: its address is valid on the
device, through unified virtual addressing) and write them into GPU blocks, so a step that recalls
blocks needs no host sync, no host-side gather and no copy engine call: it runs inside decode CUDA
graphs, from lists a previous kernel of the step wrote.

Grid (rows, PROGRAMS): program (r, c) copies the row's blocks c, c + PROGRAMS, ... (a block of one
layer: K then V, each one contiguous piece on both sides, both loads issued before the stores).
RECALL_PROGRAMS programs in all (at least one a row): a few already keep PCIe busy (each holds ~64 KiB
of host reads in flight), and more slowed the kernels beside them. On the H200 at 128k, batch 4, a
quarter of the blocks recalled per step, 32 programs a row (128) took the decode step to 11.2 ms and
its GEMVs to 6.9 ms a step; 4 a row (16), 8.2 ms and 4.5 (bench/results/kv_tier_recall_programs.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

RECALL_PROGRAMS = 16  # programs of a recall in all (see above)


@triton.jit
def _recall_kernel(
    store_ptr, kv_ptr, src_ptr, dst_ptr, n_ptr, cnt_ptr, host_base, half, stride_c,
    E: tl.constexpr, E_PAD: tl.constexpr, PROGRAMS: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n = tl.load(n_ptr + r)
    if c == 0:
        tl.atomic_add(cnt_ptr, n.to(tl.int64))
    e = tl.arange(0, E_PAD)
    em = e < E
    for j in range(c, n, PROGRAMS):
        h = tl.load(src_ptr + r * stride_c + j).to(tl.int64) - host_base
        g = tl.load(dst_ptr + r * stride_c + j).to(tl.int64)
        k = tl.load(store_ptr + 2 * h * E + e, mask=em)
        v = tl.load(store_ptr + (2 * h + 1) * E + e, mask=em)
        tl.store(kv_ptr + g * E + e, k, mask=em)
        tl.store(kv_ptr + half + g * E + e, v, mask=em)


def recall_blocks(
    store: torch.Tensor, kv: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, count: torch.Tensor,
    host_base: int, counter: torch.Tensor, programs: int | None = None,
) -> None:  # fmt: skip
    """`recall_blocks_ref`: `store` may be a pinned (mapped) host tensor, the rest on the device.
    `programs` per row: default RECALL_PROGRAMS shared by the rows."""
    if programs is None:
        programs = max(1, RECALL_PROGRAMS // src.shape[0])
    e = store[0, 0].numel()
    assert store.is_contiguous() and kv.is_contiguous() and kv[0, 0].numel() == e
    e_pad = triton.next_power_of_2(e)
    _recall_kernel[(src.shape[0], programs)](
        store, kv, src, dst, count, counter, host_base, kv[0].numel(), src.stride(0),
        E=e, E_PAD=e_pad, PROGRAMS=programs, num_warps=max(4, min(16, e_pad // 2048)),
    )  # fmt: skip
