"""A one-row sparse GEMV's float32 sums left for their reader (issue 14: no cast launch per projection in a
fused decode step): kernels/sparse_gemv.py `sums_key`, read and zeroed by rope_kv (qkv), the residual add
(o, down; and the gate/up sums zeroed there) and the down projection's own loads (gate/up), or settled by
`settle_sums`. Each reader must give the bits it gives for the cast output (the sums rounded to bf16), its
plain-torch reference within tolerance, and leave the buffer zero. bf16 on fresh random inputs, through
Triton's interpreter on the CPU (natively on a GPU). The cast output is the cast kernel's (`settle_sums`
of a copy): the interpreter rounds float32 to bf16 its own way, not torch's."""

from __future__ import annotations

import torch

from actserve.kernels.rope_kv import rope_kv
from actserve.kernels.rope_kv_ref import rope_kv_ref
from actserve.kernels.sparse_gemv import SparseGemvConfig, atomic_sums, settle_sums, sparse_gemv
from actserve.kernels.sparse_gemv_ref import silu_mul_ref_rounded, sparse_gemv_ref
from actserve.kernels.steer_rmsnorm import add_steer_rmsnorm
from actserve.kernels.steer_rmsnorm_ref import add_steer_rmsnorm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF = torch.bfloat16
# one row, K split into one-block programs (ONE_SHOT) whose sums meet in float32 atomic adds: the decode
# hot path's config (`pick_config(1, ...)`) at test size
ONE_ROW = SparseGemvConfig(block_n=16, block_k=16, splits=5, accum="atomic_cast", num_stages=1)


def rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, BF)


def quantile_thr(x: torch.Tensor, level: float) -> torch.Tensor:
    return x.float().abs().quantile(level).reshape(1).to(DEVICE)


def cast(sums: torch.Tensor) -> torch.Tensor:
    """The cast kernel's bf16 of float32 sums (of a copy: `sums` stay)."""
    return settle_sums(sums.clone(), BF)


def assert_zero(key: str) -> None:
    assert not atomic_sums(torch.device(DEVICE), 1, key).any()


def test_sums_equal_the_cast_output_and_settle() -> None:
    g = torch.Generator().manual_seed(11)
    x, wt = rand(g, 1, 72), rand(g, 72, 37, scale=0.1)
    thr = quantile_thr(x, 0.5)
    sums = sparse_gemv(x, wt, thr, cfg=ONE_ROW, sums_key="t_settle")
    assert sums.dtype == torch.float32 and sums.shape == (1, 37)
    rounded = cast(sums)
    assert torch.equal(rounded, sparse_gemv(x, wt, thr, cfg=ONE_ROW))  # the cast path's bits
    want = sparse_gemv_ref(x, wt, thr)
    assert (rounded.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()
    assert sums.abs().sum() > 0
    assert torch.equal(settle_sums(sums, BF), rounded)
    assert_zero("t_settle")
    # with a bias, or several rows, the output comes back as usual (the cast kernel adds the bias)
    bias = rand(g, 37)
    assert sparse_gemv(x, wt, thr, bias, cfg=ONE_ROW, sums_key="t_settle").dtype == BF
    x3 = rand(g, 3, 72)
    out = sparse_gemv(x3, wt, thr.expand(3).contiguous(), cfg=ONE_ROW, sums_key="t_settle")
    assert out.dtype == BF
    assert_zero("t_settle")


def test_down_projection_reads_gate_up_sums() -> None:
    """silu·mul formed from the rounded gate/up sums, thresholded, equals the kernel over the cast output;
    the gate/up sums stay for whoever zeroes them (the residual add after down_proj)."""
    g = torch.Generator().manual_seed(12)
    k, inter, n = 48, 40, 24
    x, wt_gu, wt_down = rand(g, 1, k), rand(g, k, 2 * inter, scale=0.3), rand(g, inter, n, scale=0.2)
    gu = sparse_gemv(x, wt_gu, quantile_thr(x, 0.4), cfg=ONE_ROW, sums_key="t_gu")
    gu_bf, before = cast(gu), gu.clone()
    thr = quantile_thr(silu_mul_ref_rounded(gu_bf), 0.5)
    down = sparse_gemv(gu, wt_down, thr, silu_mul=True, cfg=ONE_ROW, sums_key="t_down")
    assert down.dtype == torch.float32
    assert torch.equal(gu, before)  # not zeroed by its reader
    want_bits = sparse_gemv(gu_bf, wt_down, thr, silu_mul=True, cfg=ONE_ROW)
    assert torch.equal(cast(down), want_bits)
    want = sparse_gemv_ref(gu_bf, wt_down, thr, silu_mul=True)
    assert (want_bits.float() - want.float()).abs().max() <= 2**-6 * want.float().abs().max()
    # the residual add takes the down sums and zeroes the gate/up ones
    residual, w = rand(g, 1, n), (torch.rand(n, generator=g) + 0.5).to(DEVICE, BF)
    want_n, want_r = add_steer_rmsnorm(want_bits, residual, w, 1e-6)
    normed, res = add_steer_rmsnorm(down, residual, w, 1e-6, zero=gu)
    assert torch.equal(res, want_r) and torch.equal(normed, want_n)
    assert_zero("t_gu")
    assert_zero("t_down")


def test_residual_add_takes_sums_and_zeroes_another_buffer() -> None:
    """Rows of float32 sums: rounded as the cast rounds them (the same bits as the bf16 input), then zeroed;
    `zero` (longer than one extra program's block, not a multiple of it) zeroed by the same launch."""
    g = torch.Generator().manual_seed(13)
    rows, hidden = 2, 96
    sums = (torch.randn(rows, hidden, generator=g) * 3).to(DEVICE)
    residual, w = rand(g, rows, hidden), (torch.rand(hidden, generator=g) + 0.5).to(DEVICE, BF)
    other = torch.randn(9000, generator=g).to(DEVICE)
    sums_bf = cast(sums)
    want = add_steer_rmsnorm(sums_bf, residual, w, 1e-6)
    got = add_steer_rmsnorm(sums, residual, w, 1e-6, zero=other)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    ref = add_steer_rmsnorm_ref(sums_bf, residual, w, 1e-6)
    for a, b in zip(got, ref, strict=True):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()
    assert not sums.any() and not other.any()


def test_rope_kv_takes_qkv_sums() -> None:
    """q/k/v as views of one row's float32 qkv sums: q, k and both caches equal the kernel over the cast
    output (and the plain-torch reference within tolerance), and every head of the sums is zeroed."""
    g = torch.Generator().manual_seed(14)
    hq, hk, dim, slots = 4, 2, 16, 9
    qkv = (torch.randn(1, (hq + 2 * hk) * dim, generator=g) * 2).to(DEVICE)
    qkv_bf = cast(qkv)

    def views(t: torch.Tensor) -> list[torch.Tensor]:
        return [x.view(1, -1, dim) for x in t.split([hq * dim, hk * dim, hk * dim], dim=-1)]

    angles = torch.randn(32, dim // 2, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(DEVICE), torch.cat([angles.sin()] * 2, -1).to(DEVICE)
    pos = torch.tensor([7]).to(DEVICE)
    where = torch.tensor([3]).to(DEVICE)
    caches = [torch.randn(slots, hk, dim, generator=g).to(DEVICE, BF) for _ in range(2)]
    caches += [c.clone() for c in caches] + [c.clone() for c in caches]
    want = rope_kv(*views(qkv_bf), cos, sin, pos, where, caches[2], caches[3])
    ref = rope_kv_ref(*views(qkv_bf), cos, sin, pos, where, caches[4], caches[5])
    got = rope_kv(*views(qkv), cos, sin, pos, where, caches[0], caches[1], dtype=BF)
    assert got[0].dtype == BF and got[1].dtype == BF
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    for a, b in [*zip(got, ref, strict=True), (caches[0], caches[4]), (caches[1], caches[5])]:
        assert (a.float() - b.float()).abs().max() <= 8e-2
    assert not qkv.any()
