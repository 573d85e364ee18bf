"""The FP4 block-scale search (server/layers/fp4_search.py) against round-to-nearest with absmax scales,
on random weights with outlier columns and correlated inputs with outlier channels."""

from __future__ import annotations

import pytest
import torch

from actserve.kernels.fp4_ref import GROUP, absmax_scales, dequantize, encode_with_scales, quantize_rtn
from actserve.server.layers.fp4_search import output_error, search_fp4


def case(seed: int, n: int = 48, k: int = 128, t: int = 256, outliers: int = 3):
    """Weights with `outliers` columns 8x larger; inputs x = z A (correlated channels), 4 channels 10x larger;
    a held-out draw of the same distribution."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, torch.randperm(k, generator=g)[:outliers]] *= 8
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    loud = torch.randperm(k, generator=g)[:4]
    xs = []
    for rows in (t, 4 * t):
        x = torch.randn(rows, k, generator=g) @ mix
        x[:, loud] *= 10
        xs.append(x)
    return w.to(torch.bfloat16).float(), xs[0], xs[1]


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("seed", range(3))
def test_search_beats_round_to_nearest(kind: str, seed: int) -> None:
    w, x, held_out = case(seed * 7 + len(kind))
    found = search_fp4(w, x, kind)  # type: ignore[arg-type]
    rtn = quantize_rtn(w, kind)  # type: ignore[arg-type]
    err, base = output_error(w, found, x), output_error(w, rtn, x)
    assert err.norm() < 0.97 * base.norm()  # strictly lower overall
    assert (err <= base * (1 + 1e-9)).all()  # and no row worse
    assert output_error(w, found, held_out).norm() < output_error(w, rtn, held_out).norm()
    # valid codes in the packed layout: what the reference's rounding gives for the chosen scales
    n, k = w.shape
    assert found.packed.shape == (n, k // 2) and found.packed.dtype == torch.uint8
    assert found.scales.shape == (n, k // GROUP[kind]) and found.scales.dtype == rtn.scales.dtype
    if kind == "mxfp4":
        assert found.scales.max() < 255  # 255 is E8M0's NaN
    else:
        assert found.global_scale is not None and torch.equal(found.global_scale, rtn.global_scale)
    again = encode_with_scales(w, kind, found.scales, found.global_scale)  # type: ignore[arg-type]
    assert torch.equal(again.packed, found.packed)
    assert dequantize(found).isfinite().all()


def test_ratio_grid_is_respected() -> None:
    """A grid of only 1.0 is round-to-nearest exactly; a shorter grid still never loses to it, picks only
    its own candidates, and the grid must start with round-to-nearest."""
    w, x, _ = case(11)
    rtn = quantize_rtn(w, "nvfp4")
    alone = search_fp4(w, x, "nvfp4", ratios=(1.0,))
    assert torch.equal(alone.packed, rtn.packed) and torch.equal(
        alone.scales.view(torch.uint8), rtn.scales.view(torch.uint8)
    )
    grid = (1.0, 0.9, 0.8, 0.7)
    short = search_fp4(w, x, "nvfp4", ratios=grid)
    err, base = output_error(w, short, x), output_error(w, rtn, x)
    assert (err <= base * (1 + 1e-9)).all() and err.norm() < base.norm()
    allowed = torch.stack([absmax_scales(w, "nvfp4", rtn.global_scale, r).view(torch.uint8) for r in grid])
    assert (short.scales.view(torch.uint8).unsqueeze(0) == allowed).any(0).all()
    with pytest.raises(ValueError, match="start with 1.0"):
        search_fp4(w, x, "nvfp4", ratios=(0.9, 1.0))
