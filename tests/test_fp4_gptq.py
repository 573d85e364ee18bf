"""GPTQ for FP4 weights (server/layers/fp4_gptq.py) against round-to-nearest, the scale search, and an
independent plain reference of the same algorithm (explicit inverse, no Cholesky, no lazy batches), on
fresh random weights with outlier columns and correlated inputs with outlier channels."""

from __future__ import annotations

import os

import pytest
import torch

from actserve.kernels.fp4_ref import (
    E2M1_MAGNITUDES,
    GROUP,
    absmax_scales,
    dequantize,
    effective_scale,
    encode_with_scales,
    quantize_rtn,
)
from actserve.server.layers.fp4_gptq import GPTQ_SCALES, GptqConfig, gptq_fp4
from actserve.server.layers.fp4_search import output_error, scales_from_choice, search_choice, search_fp4
from tests.test_fp4_search import case as search_case

KINDS = ["nvfp4", "mxfp4"]


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def case(seed: int, n: int = 48, k: int = 256, t: int = 512, outliers: int = 3):
    """`test_fp4_search.case` (outlier weight columns, correlated inputs and a second draw of them),
    larger by default."""
    return search_case(seed, n, k, t, outliers)


def decode_independently(packed: torch.Tensor, scales: torch.Tensor, kind: str, gs: torch.Tensor | None):
    """float64 weights from the packed bytes, written out here: low nibble first, bit 3 the sign."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
    nib = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2).long()
    values = torch.where(nib >= 8, -1.0, 1.0).double() * mags[nib & 7]
    if kind == "nvfp4":  # one float32 division, as compressed-tensors computes it
        eff = scales.float() / gs.float()
    else:
        eff = torch.pow(2.0, scales.double() - 127).float()
    return (values.float() * eff.repeat_interleave(GROUP[kind], dim=1)).double(), values


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_beats_rtn_and_search(kind: str) -> None:
    """The served configuration (GptqConfig()) on random weights and correlated inputs: well below the
    search's output error (about 0.8x of it here) and round-to-nearest's (0.5-0.6x), on the
    calibration inputs, and below the search's on a second draw of them."""
    seed = fresh_seed()
    w, x, held_out = case(seed, outliers=0)
    q = gptq_fp4(w, x, kind)  # type: ignore[arg-type]
    rtn, found = quantize_rtn(w, kind), search_fp4(w, x, kind)  # type: ignore[arg-type]
    err = output_error(w, q, x).norm()
    assert err < 0.9 * output_error(w, found, x).norm(), f"seed {seed}"
    assert err < 0.7 * output_error(w, rtn, x).norm(), f"seed {seed}"
    assert output_error(w, q, held_out).norm() < output_error(w, found, held_out).norm(), f"seed {seed}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scales", GPTQ_SCALES)
@pytest.mark.parametrize("act_order", [False, True])
def test_every_scale_rule_beats_rtn(kind: str, scales: str, act_order: bool) -> None:
    """Each block-scale rule, in both column orders, on weights with outlier columns: below 0.9x of
    round-to-nearest's output error (0.5-0.8x here)."""
    seed = fresh_seed()
    w, x, _ = case(seed)
    q = gptq_fp4(w, x, kind, GptqConfig(0.01, act_order, scales))  # type: ignore[arg-type]
    base = output_error(w, quantize_rtn(w, kind), x).norm()  # type: ignore[arg-type]
    assert output_error(w, q, x).norm() < 0.9 * base, f"seed {seed}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "config", [GptqConfig(), GptqConfig(0.01, False, "absmax"), GptqConfig(0.01, False, "search")]
)
def test_output_is_the_fp4_grid_times_the_stored_scales(kind: str, config: GptqConfig) -> None:
    seed = fresh_seed()
    w, x, _ = case(seed, n=40, k=192)
    q = gptq_fp4(w, x, kind, config)  # type: ignore[arg-type]
    n, k = w.shape
    assert q.kind == kind and q.packed.shape == (n, k // 2) and q.packed.dtype == torch.uint8
    assert q.scales.shape == (n, k // GROUP[kind])
    if kind == "nvfp4":
        assert q.scales.dtype == torch.float8_e4m3fn and q.global_scale is not None
        assert q.global_scale.item() == pytest.approx(448 * 6 / w.abs().max().item(), rel=1e-6)
        assert q.scales.float().isfinite().all() and (q.scales.float() >= 0).all()
    else:
        assert q.scales.dtype == torch.uint8 and q.scales.max() < 255 and q.global_scale is None
    mine, values = decode_independently(q.packed, q.scales, kind, q.global_scale)
    assert torch.equal(dequantize(q).double(), mine), f"seed {seed}"
    assert set(values.abs().unique().tolist()) <= set(E2M1_MAGNITUDES)
    # compensation moved weights: some codes are not round-to-nearest's for these very scales
    again = encode_with_scales(w, kind, q.scales, q.global_scale)  # type: ignore[arg-type]
    assert (again.packed != q.packed).float().mean() > 0.05, f"seed {seed}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_is_round_to_nearest(kind: str, act_order: bool) -> None:
    """With H = c I no error is spread: absmax scales give quantize_rtn exactly, and the search's scales
    give round-to-nearest with those scales."""
    seed = fresh_seed()
    w, _, _ = case(seed, n=32, k=320)
    x = torch.eye(w.shape[1]) * 3.0
    q = gptq_fp4(w, x, kind, GptqConfig(0.05, act_order, "absmax"))  # type: ignore[arg-type]
    rtn = quantize_rtn(w, kind)  # type: ignore[arg-type]
    assert torch.equal(q.packed, rtn.packed), f"seed {seed}"
    assert torch.equal(q.scales.view(torch.uint8), rtn.scales.view(torch.uint8))
    s = gptq_fp4(w, x, kind, GptqConfig(0.01, act_order, "search"))  # type: ignore[arg-type]
    hess = x.double().T @ x.double()
    choice = search_choice(w, hess, kind)  # type: ignore[arg-type]
    scales = scales_from_choice(w, kind, rtn.global_scale, choice)  # type: ignore[arg-type]
    same = encode_with_scales(w, kind, scales, rtn.global_scale)  # type: ignore[arg-type]
    assert torch.equal(s.packed, same.packed) and torch.equal(
        s.scales.view(torch.uint8), scales.view(torch.uint8)
    )


def round_to_grid(v: torch.Tensor, eff: torch.Tensor) -> torch.Tensor:
    """Nearest of +-E2M1 * eff to v (float64), saturating at +-6 eff (no ties with these random inputs);
    the product in float32, as the format defines the weights."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
    a = torch.where(eff > 0, v / eff.double(), 0.0).abs().clamp(max=6.0)
    grid = torch.sign(v) * mags[(a[:, None] - mags[None, :]).abs().argmin(1)]
    return (grid.float() * eff).double()


def plain_gptq(w: torch.Tensor, x: torch.Tensor, kind: str, damp: float, act_order: bool) -> torch.Tensor:
    """The same algorithm the slow, obvious way: H^-1 of the columns left kept explicitly; quantize a
    column, move the columns left by its error times H^-1's row over the diagonal, drop the column from
    H^-1 (one step of Gaussian elimination); a group's absmax scale from its weights when its first
    column comes up. Dequantized weights [n, k], float64."""
    n, k = w.shape
    group = GROUP[kind]
    h = x.double().T @ x.double()
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    hinv = torch.linalg.inv(h)
    gs = quantize_rtn(w, kind).global_scale  # type: ignore[arg-type]
    cur, out = w.double().clone(), torch.zeros(n, k, dtype=torch.float64)
    eff: dict[int, torch.Tensor] = {}
    left = list(range(k))
    for j in order.tolist():
        g = j // group
        if g not in eff:
            scale = absmax_scales(cur[:, g * group : (g + 1) * group], kind, gs)  # type: ignore[arg-type]
            eff[g] = effective_scale(kind, scale, gs)[:, 0]  # type: ignore[arg-type]
        out[:, j] = round_to_grid(cur[:, j], eff[g])
        left.remove(j)
        d = hinv[j, j]
        cur[:, left] -= ((cur[:, j] - out[:, j]) / d)[:, None] * hinv[j, left][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / d
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act_order", [False, True])
def test_equals_the_plain_algorithm(kind: str, act_order: bool) -> None:
    """Lazy batches of 128 columns and the Cholesky factor change only the order of the arithmetic: 300
    columns (3 batches) give the plain reference's weights exactly."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 320, generator=g, dtype=torch.float64).float()
    w[:, 7] *= 8
    x = torch.randn(400, 320, generator=g) @ (torch.randn(320, 320, generator=g) / 18 + torch.eye(320))
    x[:, :3] *= 10
    q = gptq_fp4(w, x, kind, GptqConfig(0.02, act_order, "absmax"))  # type: ignore[arg-type]
    want = plain_gptq(w, x, kind, 0.02, act_order)
    got = dequantize(q).double()
    assert (got != want).sum() == 0, f"seed {seed}: {(got != want).sum()} weights differ"
    base = quantize_rtn(w, kind)  # type: ignore[arg-type]
    assert output_error(w, q, x).norm() < 0.8 * output_error(w, base, x).norm()


def test_dead_inputs_and_bad_arguments() -> None:
    """An input channel no calibration token reaches (H_jj = 0) leaves the result finite and still better
    than round-to-nearest; with no input at all (H = 0) nothing is spread and absmax scales give
    round-to-nearest exactly; unknown scale rules are refused."""
    w, x, _ = case(fresh_seed(), n=16, k=64)
    x[:, 5] = 0.0
    q = gptq_fp4(w, x, "nvfp4")
    assert dequantize(q).isfinite().all()
    assert output_error(w, q, x).norm() < output_error(w, quantize_rtn(w, "nvfp4"), x).norm()
    none = gptq_fp4(w, torch.zeros(8, 64), "nvfp4", GptqConfig(0.1, True, "absmax"))
    assert torch.equal(none.packed, quantize_rtn(w, "nvfp4").packed)
    with pytest.raises(ValueError, match="GPTQ scales must be one of absmax, search, local"):
        gptq_fp4(w, x, "nvfp4", GptqConfig(scales="mse"))  # type: ignore[arg-type]
