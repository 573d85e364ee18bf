"""The FP4 W4A16 kernels (kernels/fp4_gemm.py) against the plain-torch reference on fresh random weights:
under TRITON_INTERPRET=1 on the CPU with float32 activations (the interpreter's bf16 tl.dot is wrong),
natively with bf16 too on a GPU. The dequantize kernel has no tl.dot and rounds to bf16 by integer
arithmetic (the interpreter's own cast truncates): it is checked bit for bit in bf16 everywhere."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from actserve.kernels.fp4_gemm import Fp4Config, _bf16_rne, fp4_dequantize, fp4_gemm, fp4_gemv, fp4_linear
from actserve.kernels.fp4_ref import (
    GROUP,
    Fp4Weight,
    dequantize,
    e2m1_decode,
    fp4_matmul_ref,
    quantize_rtn,
    unpack_nibbles,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
KINDS = ["nvfp4", "mxfp4"]


def tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 2e-2


def random_fp4(n: int, k: int, kind: str, g: torch.Generator) -> Fp4Weight:
    """Quantized random weights with rows of different magnitudes (so block scales differ; the first
    row's NVFP4 block scales are E4M3 subnormals)."""
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-4, 3, (n, 1), generator=g)).float()
    w[0] *= 2.0**-16
    q = quantize_rtn(w / k**0.5, kind)  # type: ignore[arg-type]
    gs = q.global_scale.to(DEVICE) if q.global_scale is not None else None
    return Fp4Weight(q.kind, q.packed.to(DEVICE), q.scales.to(DEVICE), gs)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    scale = max(1.0, want.float().abs().max().item())
    return got.dtype == want.dtype and (got.float() - want.float()).abs().max().item() < tol(dtype) * scale


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("split_k", [1, 2])
def test_gemv(kind: str, dtype: torch.dtype, rows: int, split_k: int) -> None:
    """Odd N (masked tail), several K steps per split, split-K through the workspace, bias on half."""
    g = torch.Generator().manual_seed(rows * 8 + split_k * 2 + len(kind))
    n, k = 37, 192
    w = random_fp4(n, k, kind, g)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype) if rows != 5 else None
    got = fp4_gemv(x, w, bias, Fp4Config(block_n=16, block_k=64, split_k=split_k))
    assert got.shape == (rows, n)
    assert close(got, fp4_matmul_ref(x, w, bias), dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm(kind: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3 + len(kind))
    n, k, m = 40, 128, 37
    w = random_fp4(n, k, kind, g)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    got = fp4_gemm(x, w, bias, Fp4Config(block_m=16, block_n=16, block_k=64))
    assert close(got, fp4_matmul_ref(x, w, bias), dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantization_is_bit_exact(kind: str) -> None:
    """x = identity picks each weight column alone (the other products are exact zeros), so the
    kernels' float32 dequantized weights must equal the reference's bit for bit."""
    g = torch.Generator().manual_seed(11 + len(kind))
    w = random_fp4(24, 64, kind, g)
    gs = w.global_scale.cpu() if w.global_scale is not None else None
    want = dequantize(Fp4Weight(w.kind, w.packed.cpu(), w.scales.cpu(), gs)).T
    eye = torch.eye(64, device=DEVICE)
    got = fp4_gemm(eye, w, cfg=Fp4Config(block_m=16, block_n=16, block_k=32))
    assert torch.equal(got.cpu(), want)
    rows = fp4_gemv(eye[:16], w, cfg=Fp4Config(block_n=16, block_k=32, split_k=2))
    assert torch.equal(rows.cpu(), decode_rows_reference(w)[:16])


def decode_rows_reference(w: Fp4Weight) -> torch.Tensor:
    """Weights [K, N] as the GEMVs form them: code x block scale (exact), divided once by the NVFP4
    global scale (one rounding, in float64 then to float32; the dequantize rounds s / global first)."""
    codes = e2m1_decode(unpack_nibbles(w.packed.cpu())).double()
    if w.kind == "mxfp4":
        return dequantize(cpu_weight(w)).T
    block = w.scales.cpu().double().repeat_interleave(GROUP["nvfp4"], dim=1)
    return (codes * block / w.global_scale.cpu().double().reshape(-1, 1)).float().T


def test_refuses_what_it_cannot_do() -> None:
    w = random_fp4(8, 64, "mxfp4", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="at most 16 rows"):
        fp4_gemv(torch.randn(17, 64).to(DEVICE), w)
    with pytest.raises(ValueError, match="does not match"):
        fp4_gemm(torch.randn(2, 32).to(DEVICE), w)


def test_merged_shards_keep_their_global_scales() -> None:
    """A merged layer (e.g. q/k/v) from shards quantized apart, each with its own NVFP4 global scale:
    stacked rows and a per-row global scale give exactly each shard's weights, in the reference and
    in both kernels, with no scale re-rounded."""
    g = torch.Generator().manual_seed(21)
    shards = [quantize_rtn(torch.randn(n, 64, generator=g) * s, "nvfp4") for n, s in ((20, 0.1), (12, 3.0))]
    gs = torch.cat([q.global_scale.expand(q.shape[0]) for q in shards])  # type: ignore[union-attr]
    merged = Fp4Weight(
        "nvfp4", torch.cat([q.packed for q in shards]), torch.cat([q.scales for q in shards]), gs
    )
    assert torch.equal(dequantize(merged), torch.cat([dequantize(q) for q in shards]))
    w = Fp4Weight("nvfp4", merged.packed.to(DEVICE), merged.scales.to(DEVICE), gs.to(DEVICE))
    eye = torch.eye(64, device=DEVICE)
    want = dequantize(merged).T
    assert torch.equal(fp4_gemm(eye, w, cfg=Fp4Config(block_m=16, block_n=16, block_k=32)).cpu(), want)
    assert torch.equal(
        fp4_gemv(eye[:16], w, cfg=Fp4Config(block_n=16, block_k=32)).cpu(), decode_rows_reference(w)[:16]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_default_configs_on_model_shapes(kind: str) -> None:
    """The launch configs picked per shape (not the tests' small tiles) on a K of several tiles and an
    N that is no multiple of any tile: one row, a decode batch, a batch past the GEMV, a prompt."""
    g = torch.Generator().manual_seed(41 + len(kind))
    n, k = 72, 1536
    w = random_fp4(n, k, kind, g)
    for m in (1, 9, 40, 130):
        x = torch.randn(m, k, generator=g).to(DEVICE)
        got = fp4_gemv(x, w) if m <= 16 else fp4_gemm(x, w)
        assert close(got, fp4_matmul_ref(x, w), torch.float32), m
        if m > 16:
            assert close(fp4_linear(x, w), fp4_matmul_ref(x, w), torch.float32), m


def cpu_weight(w: Fp4Weight) -> Fp4Weight:
    gs = w.global_scale.cpu() if w.global_scale is not None else None
    return Fp4Weight(w.kind, w.packed.cpu(), w.scales.cpu(), gs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_k", [64, 256])
def test_dequantize_is_bit_exact(kind: str, dtype: torch.dtype, block_k: int) -> None:
    """Odd N (a masked row tail) and a K of several tiles with a partial last one (K a multiple of the
    group only), with the tests' small tiles and the default ones: the interleaved even/odd columns
    and the rounding to `dtype` equal the reference's, bit for bit."""
    g = torch.Generator().manual_seed(51 + block_k + len(kind))
    n, k = 37, 320
    w = random_fp4(n, k, kind, g)
    cfg = Fp4Config(block_n=16, block_k=block_k) if block_k != 256 else None
    got = fp4_dequantize(w, dtype, cfg)
    assert got.shape == (n, k) and got.dtype == dtype
    assert torch.equal(got.cpu(), dequantize(cpu_weight(w)).to(dtype))


def test_dequantize_per_row_global_scale() -> None:
    """A merged layer's per-row NVFP4 global scales (test_merged_shards_keep_their_global_scales),
    with the shard boundary inside an n tile."""
    g = torch.Generator().manual_seed(23)
    shards = [quantize_rtn(torch.randn(n, 96, generator=g) * s, "nvfp4") for n, s in ((20, 0.1), (13, 3.0))]
    gs = torch.cat([q.global_scale.expand(q.shape[0]) for q in shards])  # type: ignore[union-attr]
    packed, scales = torch.cat([q.packed for q in shards]), torch.cat([q.scales for q in shards])
    w = Fp4Weight("nvfp4", packed.to(DEVICE), scales.to(DEVICE), gs.to(DEVICE))
    want = torch.cat([dequantize(q) for q in shards])
    for dtype in (torch.float32, torch.bfloat16):
        got = fp4_dequantize(w, dtype, Fp4Config(block_n=16, block_k=64))
        assert torch.equal(got.cpu(), want.to(dtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear(kind: str, dtype: torch.dtype) -> None:
    """The prefill path (dequantize, then F.linear) on 3-D activations with a bias."""
    g = torch.Generator().manual_seed(61 + len(kind))
    n, k = 40, 192
    w = random_fp4(n, k, kind, g)
    x = torch.randn(2, 19, k, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    got = fp4_linear(x, w, bias)
    assert got.shape == (2, 19, n)
    assert close(got.reshape(-1, n), fp4_matmul_ref(x.reshape(-1, k), w, bias), dtype)


@triton.jit
def _bf16_rne_probe(x_ptr, y_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tl.store(y_ptr + r, _bf16_rne(tl.load(x_ptr + r)))


def test_bf16_rounding_is_torchs() -> None:
    """The dequantize kernel's float32 -> bfloat16 rounding on the cases random weights rarely reach:
    ties to the even and the odd neighbour, a carry into the exponent, overflow to inf, subnormals,
    signed zeros, inf and NaN; then random bit patterns."""
    ties = [0x3F808000, 0x3F818000, 0x3FFF8000, 0x7F7F8000, 0x00008000, 0x00018000]
    special = ties + [0x3F80FFFF, 0x7F7FFFFF, 0x7F7F7FFF, 0x007FFFFF, 0, 0x7F800000, 0x7FC00000, 0x7F800001]
    signed = special + [b - 2**31 for b in special]  # the same with the sign bit set, as int32
    rand = torch.randint(
        -(2**31), 2**31 - 1, (1024 - len(signed),), generator=torch.Generator().manual_seed(71)
    )
    bits = torch.cat([torch.tensor(signed), rand]).to(torch.int32)
    x = bits.view(torch.float32).to(DEVICE)
    y = torch.empty(1024, dtype=torch.bfloat16, device=DEVICE)
    _bf16_rne_probe[(1,)](x, y, BLOCK=1024)
    want = x.to(torch.bfloat16)
    assert torch.equal(y.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(y[ok].view(torch.int16), want[ok].view(torch.int16))


def test_word_decoder_shifts_match_the_reference() -> None:
    """The inline PTX of the one-row GEMV (compiled for GPUs only; the interpreter runs the plain path)
    is built from `_WORD_PAIRS`: replaying its shifts and masks on random words in numpy gives every
    nibble's E2M1 value, 2^-14-scaled, bit for bit."""
    import numpy as np

    from actserve.kernels.fp4_gemm import _WORD_PAIRS, E2M1_WORD_PTX
    from actserve.kernels.fp4_ref import e2m1_table

    table = e2m1_table().numpy()
    words = np.random.default_rng(5).integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    seen = set()
    for mag, sign, k, k4 in _WORD_PAIRS:
        assert f"cvt.f32.f16 ${k}, lo; cvt.f32.f16 ${k4}, hi;" in str(E2M1_WORD_PTX)
        m = words << np.uint32(mag) if mag > 0 else words >> np.uint32(-mag)
        s = words << np.uint32(sign) if sign > 0 else words
        pair = (m & np.uint32(0x0E000E00)) | (s & np.uint32(0x80008000))
        for nib, half in ((k, pair & 0xFFFF), (k4, pair >> 16)):
            got = half.astype(np.uint16).view(np.float16).astype(np.float32) * 2.0**14
            want = table[(words >> np.uint32(4 * nib)) & 15]
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), nib
            seen.add(nib)
    assert seen == set(range(8))
