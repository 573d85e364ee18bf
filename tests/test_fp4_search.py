"""The FP4 block-scale search (server/layers/fp4_search.py) against round-to-nearest with absmax scales,
on random weights with outlier columns and correlated inputs with outlier channels."""

from __future__ import annotations

import pytest
import torch

from actserve.kernels.fp4_ref import GROUP, dequantize, encode_with_scales, quantize_rtn
from actserve.server.layers.fp4_search import output_error, search_fp4


def case(seed: int, n: int = 48, k: int = 128, t: int = 256):
    """Weights with 3 outlier columns; inputs x = z A (correlated channels), 4 channels 10x larger;
    a held-out draw of the same distribution."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, torch.randperm(k, generator=g)[:3]] *= 8
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
