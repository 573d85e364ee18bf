"""kernels/sparse_gemv.py against its plain-torch reference (kernels/sparse_gemv_ref.py) on fresh random
inputs: on the CPU through Triton's interpreter in float32 (its bf16 tl.dot is not exact) at small shapes
that are not multiples of the tiles; on a GPU (marked `gpu`) in bf16 at the Llama-3-8B shapes, inside a
CUDA graph too. The sm_90 compile of every variant is tests/sm90_compile.py's."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from actserve.kernels.gemv_ref import gemv_ref
from actserve.kernels.sparse_gemv import Accum, SparseGemvConfig, pick_config, sparse_gemv
from actserve.kernels.sparse_gemv_ref import silu_mul_ref_rounded, sparse_gemv_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N, K = 37, 72  # neither a multiple of the 16-wide tiles below


def small_cfg(accum: Accum = "serial", splits: int = 3) -> SparseGemvConfig:
    return SparseGemvConfig(block_n=16, block_k=16, splits=splits, accum=accum, num_stages=1)


Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def draw(
    m: int, level: float, silu: bool, seed: int, n: int = N, k: int = K, dtype: torch.dtype = torch.float32
) -> Case:
    """x [m, k] (or [m, 2k] gate | up), W^T [k, n], bias [n], per-row thresholds at `level`'s quantile of
    |x| (row 0 at half the level, so rows differ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if silu else k, generator=g).to(DEVICE, dtype)
    wt = (torch.randn(k, n, generator=g) / k**0.5).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    act = (silu_mul_ref_rounded(x) if silu else x).float()
    levels = torch.full((m,), level)
    levels[0] = level / 2
    thr = torch.stack([act[r].abs().quantile(float(levels[r])) for r in range(m)]) if level else act[:, 0] * 0
    return x, wt, bias, thr.float().contiguous()


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * max(1.0, want.float().abs().max().item()), err


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("level", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("silu", [False, True])
def test_matches_reference(m: int, level: float, silu: bool) -> None:
    """One row (elementwise path) and 3 / 16 rows (tensor-core tile, union of active inputs); the
    threshold, silu·mul and bias in the loads; K splits of one and two blocks, the last one short."""
    x, wt, bias, thr = draw(m, level, silu, seed=m * 10 + int(level * 10) + silu)
    b = bias if m != 3 else None
    want = sparse_gemv_ref(x, wt, thr, b, silu_mul=silu)
    for splits in (3, 5):  # K splits of two blocks (a loop) and of one (one row: ONE_SHOT)
        close(sparse_gemv(x, wt, thr, b, silu_mul=silu, cfg=small_cfg(splits=splits)), want, 1e-5)
    if level == 0.9 and m == 1:  # the reference really is sparse here: most of x is gone
        act = silu_mul_ref_rounded(x) if silu else x
        assert (act.abs() < thr[:, None]).float().mean() > 0.4


@pytest.mark.parametrize("accum", ["serial", "workspace", "atomic", "atomic_cast"])
@pytest.mark.parametrize("m", [1, 16])
def test_each_way_of_summing_k_splits(accum: Accum, m: int) -> None:
    """Every accumulation mode, over 5 splits and over one (the output written directly)."""
    x, wt, bias, thr = draw(m, 0.5, False, seed=7 + m)
    want = sparse_gemv_ref(x, wt, thr, bias)
    for splits in (5, 1):
        close(sparse_gemv(x, wt, thr, bias, cfg=small_cfg(accum, splits)), want, 1e-5)


@pytest.mark.parametrize("accum", ["serial", "atomic", "atomic_cast"])
def test_shared_buffers_stay_zero_between_launches(accum: Accum) -> None:
    """The one-launch modes count a tile's programs, and the atomic modes sum into a shared buffer: the
    tile's last program (or the cast kernel) resets them, so the next launch (another shape, other rows)
    starts clean."""
    from actserve.kernels.sparse_gemv import atomic_sums, tile_counters

    for i, (m, n, k) in enumerate([(3, N, K), (1, 2 * N, K + 5), (3, N, K)]):
        x, wt, bias, thr = draw(m, 0.5, False, seed=90 + i, n=n, k=k)
        got = sparse_gemv(x, wt, thr, bias, cfg=small_cfg(accum, 4))
        close(got, sparse_gemv_ref(x, wt, thr, bias), 1e-5)
        assert not tile_counters(x.device, 1).any()
        if accum != "serial":
            assert not atomic_sums(x.device, 1).any()


@pytest.mark.parametrize("m", [1, 5])
def test_without_threshold_is_the_dense_product(m: int) -> None:
    x, wt, bias, _ = draw(m, 0.0, True, seed=40 + m)
    close(sparse_gemv(x, wt, None, bias, silu_mul=True, cfg=small_cfg()), gemv_ref(x, wt.T, bias, True), 1e-5)


def test_threshold_semantics() -> None:
    """Strict `<` as in the plugin's mask: an entry equal to its threshold stays, thr 0 keeps a row whole
    (NaN too), +inf leaves only the bias; thresholds may be a strided view."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, K, generator=g).to(DEVICE)
    wt = torch.randn(K, N, generator=g).to(DEVICE)
    bias = torch.randn(N, generator=g).to(DEVICE)
    x[0, :] = 0.0
    x[0, 5] = 0.75  # exactly the threshold: kept
    x[0, 6] = 0.7499  # just below: dropped
    x[1, 9] = float("nan")
    table = torch.tensor([[0.75, 9.0], [0.0, 9.0], [float("inf"), 9.0], [0.5, 9.0]]).to(DEVICE)
    thr = table[:, 0]  # stride 2
    got = sparse_gemv(x, wt, thr, bias, cfg=small_cfg())
    close(got[0], 0.75 * wt[5] + bias, 1e-5)
    assert got[1].isnan().all()  # the NaN entry is kept (|NaN| < 0 is false), as the mask keeps it
    close(got[2], bias, 0)
    want = sparse_gemv_ref(x[3:], wt, thr[3:], bias)
    close(got[3:], want, 1e-5)


@pytest.mark.parametrize("silu", [False, True])
def test_one_row_counts_in_its_own_launch(silu: bool) -> None:
    """`count`: the one-row kernel adds what the count kernel's reference adds (entries below the row's
    threshold, and the row's entries) at the row's slot, over K blocks of several programs, and nothing
    for a row at -1; the product is unchanged."""
    from actserve.kernels.sparsity_ops_ref import count_skipped_ref

    x, wt, bias, thr = draw(1, 0.6, silu, seed=60 + silu)
    want = sparse_gemv_ref(x, wt, thr, bias, silu_mul=silu)
    act = silu_mul_ref_rounded(x) if silu else x
    for slot in (3, -1):
        table = torch.zeros(6, 2, dtype=torch.float64, device=DEVICE)
        at = torch.tensor([slot], dtype=torch.int32, device=DEVICE)
        got = sparse_gemv(x, wt, thr, bias, silu_mul=silu, cfg=small_cfg(splits=5), count=(table, at))
        close(got, want, 1e-5)
        ref = torch.zeros_like(table)
        one = torch.ones(1, dtype=torch.int32, device=DEVICE)
        counted = torch.ones(4, dtype=torch.int32, device=DEVICE)
        count_skipped_ref(ref, act, counted, one if slot >= 0 else one * 0, one * 0, at.clamp(min=0), thr)
        assert torch.equal(table, ref)
        assert (table[3, 0] > 0) == (slot >= 0)
    with pytest.raises(ValueError, match="one-shot"):  # K splits of two blocks: not counted there
        sparse_gemv(x, wt, thr, bias, silu_mul=silu, cfg=small_cfg(splits=3), count=(table, at))


def test_refuses_what_it_cannot_do() -> None:
    wt = torch.randn(16, 8).to(DEVICE)
    with pytest.raises(ValueError, match="at most 16 rows"):
        sparse_gemv(torch.randn(17, 16).to(DEVICE), wt)
    with pytest.raises(ValueError, match="does not match"):
        sparse_gemv(torch.randn(2, 16).to(DEVICE), wt, silu_mul=True)
    with pytest.raises(ValueError, match="does not match"):
        sparse_gemv(torch.randn(2, 16).to(DEVICE), wt.T.contiguous().T)  # not N-contiguous
    with pytest.raises(ValueError, match="float32"):
        sparse_gemv(torch.randn(2, 16).to(DEVICE), wt, torch.zeros(2, dtype=torch.float64).to(DEVICE))


# -- on the GPU: bf16 at the Llama-3-8B shapes ------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize(("n", "k", "silu"), [(6144, 4096, False), (28672, 4096, False), (4096, 14336, True)])
@pytest.mark.parametrize("accum", ["serial", "workspace", "atomic", "atomic_cast"])
def test_gpu_real_shapes(m: int, n: int, k: int, silu: bool, accum: Accum) -> None:
    """bf16 (silu·mul rounded as kernels/silu_mul.py rounds it), each way of summing K splits."""
    x, wt, bias, thr = draw(m, 0.5, silu, seed=m + n, n=n, k=k, dtype=torch.bfloat16)
    cfg = replace(pick_config(m, n, k), accum=accum)
    got = sparse_gemv(x, wt, thr, bias, silu_mul=silu, cfg=cfg)
    want = sparse_gemv_ref(x, wt, thr, bias, silu_mul=silu)
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 5e-3, err
    if not accum.startswith("atomic"):  # the split sums meet in a fixed order: the same bits every run
        assert torch.equal(got, sparse_gemv(x, wt, thr, bias, silu_mul=silu, cfg=cfg))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_inside_a_cuda_graph() -> None:
    """Replays of a captured sequence of launches (the shared counters and sums reset themselves) give the
    eager results (bit for bit where the split sums meet in a fixed order), for new inputs copied into
    the captured buffers too."""
    shapes = [(1, 6144, 4096), (4, 4096, 4096), (1, 4096, 14336), (16, 28672, 4096)]
    cases = [
        draw(m, 0.5, False, seed=i, n=n, k=k, dtype=torch.bfloat16) for i, (m, n, k) in enumerate(shapes)
    ]
    eager = [sparse_gemv(x, wt, thr, b) for x, wt, b, thr in cases]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [sparse_gemv(x, wt, thr, b) for x, wt, b, thr in cases]
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for (x, wt, _, _), a, b in zip(cases, outs, eager, strict=True):
        if pick_config(x.shape[0], wt.shape[1], wt.shape[0]).accum.startswith("atomic"):
            # float32 adds in arrival order: at most the last bit of the bf16 output apart
            assert (a.float() - b.float()).abs().max() <= 2**-7 * b.float().abs().max()
        else:
            assert torch.equal(a, b)
    for x, _, _, thr in cases:  # fresh inputs through the same graph
        x.copy_(torch.randn_like(x))
        thr.copy_(torch.quantile(x.float().abs(), 0.6, dim=1))
    graph.replay()
    torch.cuda.synchronize()
    for (x, wt, b, thr), got in zip(cases, outs, strict=True):
        err = ((got.float() - sparse_gemv_ref(x, wt, thr, b).float()).norm()).item()
        assert err < 5e-3 * sparse_gemv_ref(x, wt, thr, b).float().norm().item()
