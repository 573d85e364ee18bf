"""Triton kernels against their plain-torch references on fresh random inputs.

On the CPU they run under TRITON_INTERPRET=1 (conftest.py sets it before anything imports triton) at
tiny shapes; on a GPU the same tests run natively.
"""

from __future__ import annotations

import pytest
import torch

from actserve.kernels.paged_decode import paged_decode
from actserve.kernels.paged_decode_ref import paged_decode_ref
from actserve.kernels.steer_rmsnorm import add_steer_rmsnorm
from actserve.kernels.steer_rmsnorm_ref import SteeringTensors, add_steer_rmsnorm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 2e-2


def random_steering(rows: int, layers: int, hidden: int, k: int, g: torch.Generator, dtype: torch.dtype):
    slots = 5
    table = torch.randn(slots, layers, hidden, generator=g).to(DEVICE, dtype)
    mask = torch.rand(slots, layers, generator=g) < 0.7
    index = torch.randint(-1, slots, (rows, k), generator=g)
    scale = torch.randn(rows, k, generator=g) * 3
    normalize = torch.rand(rows, k, generator=g) < 0.4
    return SteeringTensors(table, mask.to(DEVICE), index.to(DEVICE), scale.to(DEVICE), normalize.to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_x", [True, False])
@pytest.mark.parametrize("hidden", [64, 96])
def test_add_steer_rmsnorm(dtype: torch.dtype, with_x: bool, hidden: int) -> None:
    g = torch.Generator().manual_seed(hidden + with_x)
    rows, layers = 7, 3
    residual = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
    x = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype) if with_x else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    steer = random_steering(rows, layers, hidden, 3, g, dtype)
    for layer in range(layers):
        want = add_steer_rmsnorm_ref(x, residual, weight, 1e-6, layer, steer)
        got = add_steer_rmsnorm(x, residual, weight, 1e-6, layer, steer)
        for a, b in zip(got, want, strict=True):
            assert (a.float() - b.float()).abs().max().item() < tol(dtype) * max(
                1.0, b.float().abs().max().item()
            )
    plain = add_steer_rmsnorm(x, residual, weight, 1e-6)
    ref = add_steer_rmsnorm_ref(x, residual, weight, 1e-6)
    assert all(
        torch.allclose(a.float(), b.float(), atol=tol(dtype), rtol=tol(dtype))
        for a, b in zip(plain, ref, strict=True)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steered", [False, True])
def test_add_steer_rmsnorm_adds_moe_columns(dtype: torch.dtype, steered: bool) -> None:
    """A MoE layer's unadded columns (PendingSum, -1 columns included) give the bits of adding them with
    the reference `sum_columns` first, steered or not, in the fused kernel and through RMSNorm."""
    from actserve.kernels.moe_ref import PendingSum, sum_columns
    from actserve.server.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(11 + steered)
    rows, k, hidden = 5, 3, 96
    residual = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
    products = torch.randn(rows * k, hidden, generator=g).to(DEVICE)
    slots = torch.randint(-1, 4, (rows, k), generator=g).to(DEVICE, torch.int32)
    slots[0] = -1  # a row with no expert at all
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    steer = random_steering(rows, 2, hidden, 2, g, dtype) if steered else None
    want = add_steer_rmsnorm(sum_columns(products, slots, dtype), residual, weight, 1e-6, 1, steer)
    got = add_steer_rmsnorm(products, residual, weight, 1e-6, 1, steer, parts=slots)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    norm = RMSNorm(hidden, 1e-6).to(DEVICE, dtype)
    norm.weight.data.copy_(weight)
    via_layer = norm.add_forward(PendingSum(products, slots), residual, 1, steer)
    added = norm.add_forward(sum_columns(products, slots, dtype), residual, 1, steer)
    assert all(torch.equal(a, b) for a, b in zip(via_layer, added, strict=True))
    with pytest.raises(ValueError, match="parts"):
        add_steer_rmsnorm(products[:-1], residual, weight, 1e-6, parts=slots)


def test_unsteered_rows_untouched() -> None:
    """Rows whose index is -1 everywhere come out exactly as the no-steering kernel gives them."""
    g = torch.Generator().manual_seed(0)
    residual = torch.randn(4, 64, generator=g).to(DEVICE)
    x = torch.randn(4, 64, generator=g).to(DEVICE)
    weight = torch.rand(64, generator=g).to(DEVICE)
    steer = random_steering(4, 2, 64, 2, g, torch.float32)
    steer.index[1:] = -1
    steer.index[0] = 0
    steer.layer_mask[0] = True
    got = add_steer_rmsnorm(x, residual, weight, 1e-6, 1, steer)
    plain = add_steer_rmsnorm(x, residual, weight, 1e-6)
    assert torch.equal(got[0][1:], plain[0][1:]) and torch.equal(got[1][1:], plain[1][1:])
    assert not torch.equal(got[1][0], plain[1][0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("group", "window", "splits"), [(1, None, 1), (4, None, 3), (2, 5, 2), (4, None, None)]
)
def test_paged_decode(dtype: torch.dtype, group: int, window: int | None, splits: int | None) -> None:
    g = torch.Generator().manual_seed(group * 10 + (splits or 0))
    batch, hk, dim, bs, nblocks = 3, 2, 16, 4, 12
    hq = hk * group
    k_cache = torch.randn(nblocks * bs, hk, dim, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(nblocks * bs, hk, dim, generator=g).to(DEVICE, dtype)
    q = torch.randn(batch, hq, dim, generator=g).to(DEVICE, dtype)
    tables = torch.stack([torch.randperm(nblocks, generator=g)[:4] for _ in range(batch)]).to(
        DEVICE, torch.int32
    )
    lens = torch.tensor([13, 1, 0], dtype=torch.int32, device=DEVICE)  # 0 = a padded row
    want = paged_decode_ref(q, k_cache, v_cache, tables, lens, 0.25, bs, window)
    got = paged_decode(q, k_cache, v_cache, tables, lens, 0.25, bs, window, splits=splits, tile=16)
    assert (got.float() - want.float()).abs().max().item() < tol(dtype)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


@pytest.mark.parametrize(("short_tiles", "static"), [(0, False), (2, False), (2, True)])
@pytest.mark.parametrize(("window", "splits"), [(None, 4), (20, 3), (None, None)])
def test_paged_decode_short_contexts(
    monkeypatch: pytest.MonkeyPatch, short_tiles: int, static: bool, window: int | None, splits: int | None
) -> None:
    """Contexts of at most SHORT_TILES tiles (split 0 alone, no partials, skipped by the merge) beside
    longer ones split and merged in the same launch, a padded row, with and without a window; block ids
    loaded a tile ahead, the first before the PDL wait with `static_inputs`."""
    from actserve.kernels import paged_decode as pd

    monkeypatch.setattr(pd, "SHORT_TILES", short_tiles)
    g = torch.Generator().manual_seed(31 + short_tiles + (splits or 0))
    batch, hk, group, dim, bs, nblocks = 5, 2, 2, 16, 4, 40
    k_cache = torch.randn(nblocks * bs, hk, dim, generator=g).to(DEVICE)
    v_cache = torch.randn(nblocks * bs, hk, dim, generator=g).to(DEVICE)
    q = torch.randn(batch, hk * group, dim, generator=g).to(DEVICE)
    tables = torch.stack([torch.randperm(nblocks, generator=g)[:24] for _ in range(batch)]).to(
        DEVICE, torch.int32
    )
    lens = torch.tensor([70, 20, 32, 1, 0], dtype=torch.int32, device=DEVICE)  # tiles of 16: 5, 2, 2, 1
    want = paged_decode_ref(q, k_cache, v_cache, tables, lens, 0.25, bs, window)
    got = pd.paged_decode(
        q, k_cache, v_cache, tables, lens, 0.25, bs, window, splits=splits, tile=16, static_inputs=static
    )
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_kv(dtype: torch.dtype, qk_norm: bool) -> None:
    """Rotary and the KV write (with Qwen3's per-head q/k RMSNorm first, when given) against the plain-torch
    reference, on row-strided views of a fused qkv as the attention layer passes them."""
    from actserve.kernels.rope_kv import rope_kv
    from actserve.kernels.rope_kv_ref import rope_kv_ref

    g = torch.Generator().manual_seed(5 + qk_norm)
    t, hq, hk, dim, slots = 5, 4, 2, 16, 20
    qkv = torch.randn(t, (hq + 2 * hk) * dim, generator=g).to(DEVICE, dtype)
    q, k, v = (x.view(t, -1, dim) for x in qkv.split([hq * dim, hk * dim, hk * dim], dim=-1))
    angles = torch.randn(64, dim // 2, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(DEVICE), torch.cat([angles.sin()] * 2, -1).to(DEVICE)
    pos = torch.randint(0, 64, (t,), generator=g).to(DEVICE)
    where = torch.randperm(slots, generator=g)[:t].to(DEVICE)
    caches = [torch.randn(slots, hk, dim, generator=g).to(DEVICE, dtype) for _ in range(2)]
    caches += [c.clone() for c in caches]
    norm = None
    if qk_norm:  # weights away from 1 and inputs away from unit scale, so a missing norm would show
        qw, kw = (torch.rand(dim, generator=g) + 0.5 for _ in range(2))
        norm = (qw.to(DEVICE, dtype), kw.to(DEVICE, dtype), 1e-6)
        qkv.mul_(3)
    want = rope_kv_ref(q, k, v, cos, sin, pos, where, caches[0], caches[1], norm)
    got = rope_kv(q, k, v, cos, sin, pos, where, caches[2], caches[3], norm)
    for a, b in [*zip(got, want, strict=True), (caches[2], caches[0]), (caches[3], caches[1])]:
        assert (a.float() - b.float()).abs().max().item() < tol(dtype) * 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype: torch.dtype) -> None:
    from actserve.kernels.silu_mul import silu_mul
    from actserve.kernels.silu_mul_ref import silu_mul_ref

    x = torch.randn(3, 2 * 200, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype) * 3
    assert (silu_mul(x, block=64).float() - silu_mul_ref(x).float()).abs().max().item() < tol(dtype) * 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_gemv(dtype: torch.dtype, rows: int, bias: bool, silu: bool) -> None:
    """Odd N and K (masked tails), both the 1-row and the tensor-core path, fused bias and silu·mul."""
    from actserve.kernels.gemv import GemvConfig, gemv
    from actserve.kernels.gemv_ref import gemv_ref

    g = torch.Generator().manual_seed(rows * 4 + 2 * bias + silu)
    n, k = 37, 72
    x = torch.randn(rows, 2 * k if silu else k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    got = gemv(x, w, b, silu_mul=silu, cfg=GemvConfig(block_n=16, block_k=32, num_stages=1))
    want = gemv_ref(x, w, b, silu_mul=silu)
    assert got.shape == (rows, n) and got.dtype == dtype
    assert (got.float() - want.float()).abs().max().item() < tol(dtype) * 4


def test_gemv_refuses_what_it_cannot_do() -> None:
    from actserve.kernels.gemv import gemv

    w = torch.randn(8, 16).to(DEVICE)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv(torch.randn(17, 16).to(DEVICE), w)
    with pytest.raises(ValueError, match="does not match"):
        gemv(torch.randn(2, 16).to(DEVICE), w, silu_mul=True)


def test_pdl_launch_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """PDL goes with one-row launches by default ("single"), with every launch when asked, never on CPU
    nor within `pdl_suspended`."""
    from types import SimpleNamespace

    from actserve.kernels import pdl

    def rows(n: int, cuda: bool = True) -> torch.Tensor:
        return SimpleNamespace(is_cuda=cuda, device=SimpleNamespace(index=0), shape=(n, 8))  # type: ignore[return-value]

    for mode, want in (("single", [True, False]), ("all", [True, True]), ("off", [False, False])):
        with monkeypatch.context() as m:
            m.setattr(pdl, "pdl_mode", lambda _i=0, mode=mode: mode)
            got = [pdl.pdl_args(rows(1))["launch_pdl"], pdl.pdl_args(rows(8))["USE_PDL"]]
            assert got == want, mode
            assert pdl.pdl_args(rows(1, cuda=False)) == {"USE_PDL": False, "launch_pdl": False}
            with pdl.pdl_suspended():  # nested: off until the outer block ends, on again after
                with pdl.pdl_suspended():
                    assert not pdl.pdl_args(rows(1))["launch_pdl"], mode
                assert not pdl.pdl_args(rows(8))["USE_PDL"], mode
            assert [pdl.pdl_args(rows(1))["launch_pdl"], pdl.pdl_args(rows(8))["USE_PDL"]] == want, mode
    pdl.pdl_mode.cache_clear()
    monkeypatch.setenv("ACTSERVE_PDL", "1")
    assert pdl.pdl_mode() == ("all" if torch.cuda.is_available() else "off")
    pdl.pdl_mode.cache_clear()


@pytest.mark.parametrize(("rows", "vocab"), [(1, 5000), (3, 2049), (2, 17)])
def test_argmax_rows(rows: int, vocab: int) -> None:
    """The greedy pick equals torch.argmax: ties to the lowest index (planted), NaN above everything,
    -0.0 equal to 0.0, a row of -inf."""
    from actserve.kernels.argmax import argmax_rows
    from actserve.kernels.argmax_ref import argmax_rows_ref

    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=g)
    top = int(torch.randint(1, vocab, (1,), generator=g))
    x[0, top] = x[0, top - 1] = x[0].max() + 1  # a tie: the lower index wins
    if rows > 1:
        x[1, vocab // 2] = x[1, vocab - 1] = float("nan")
    if rows > 2:
        x[2] = float("-inf")
    cases = [x, torch.where(x == x, -0.0, x), torch.randn(rows, vocab, generator=g)]
    for case in cases:
        case = case.to(DEVICE)
        assert torch.equal(argmax_rows(case), argmax_rows_ref(case))
