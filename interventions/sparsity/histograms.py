"""Histograms of activation magnitudes, as the sparsity calibration keeps them: the fixed log-spaced bin
layout, a histogram's quantiles and CDF, and a level's corrected quantile (the calibration's correction
for the sparsity upstream, measured at grid levels and interpolated between them).

Layout: bin 0 holds |x| < edges[0], exact zeros included, bin i in 1..bins holds edges[i-1] <= |x| <
edges[i], the last bin |x| >= edges[-1].
"""

from __future__ import annotations

import torch

# bins: 64 per octave over [2^-20, 2^12): a bin is 1.1 % wide in |x|, and a quantile is interpolated
# within its bin, so a threshold's error in sparsity is a small fraction of one bin's share of entries
EDGE_EXPONENTS = (-20, 12)
BINS_PER_OCTAVE = 64


def log_edges() -> torch.Tensor:
    """The fixed bin edges, float64 [bins + 1]."""
    lo, hi = EDGE_EXPONENTS
    return torch.exp2(torch.linspace(lo, hi, (hi - lo) * BINS_PER_OCTAVE + 1, dtype=torch.float64))


def bin_index(x: torch.Tensor) -> torch.Tensor:
    """int64, x's shape: the bin of each |x| (layout in the module doc), from log2|x| directly (a search
    over the edges costs 4x more); a value within float32 rounding of an edge may land beside it."""
    lo, hi = EDGE_EXPONENTS
    v = (torch.log2(x.detach().abs().float()) - lo) * BINS_PER_OCTAVE + 1
    return v.clamp_(0, (hi - lo) * BINS_PER_OCTAVE + 1).long()


def _bin_bounds(edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each bin's [lo, hi): bin 0 spans [0, edges[0]); the top bin, which never holds a quantile below
    0.9 with these edges, counts as [edges[-1], edges[-1]]."""
    return torch.cat([edges.new_zeros(1), edges]), torch.cat([edges, edges[-1:]])


def quantile_values(counts: torch.Tensor, edges: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """float64 [n, *counts.shape[:-1]]: per histogram, the value t with a fraction q of its entries below
    it, linear within the bin it falls in. `q` is [n] (the same for every histogram) or [n,
    *counts.shape[:-1]]. q = 0 gives 0: nothing is below a threshold of 0."""
    c = counts.to(torch.float64)
    cum = c.cumsum(-1).contiguous()
    total = cum[..., -1:]
    lo, hi = _bin_bounds(edges.to(torch.float64))
    if q.dim() == 1:
        q = q.reshape(-1, *([1] * (c.dim() - 1))).expand(-1, *c.shape[:-1])
    out = []
    for qi in q.to(torch.float64):
        target = total * qi.unsqueeze(-1)  # [..., 1]
        b = torch.searchsorted(cum, target.contiguous()).clamp(max=c.shape[-1] - 1)
        n = c.gather(-1, b)
        frac = ((target - (cum.gather(-1, b) - n)) / n.clamp(min=1)).clamp(0, 1)
        t = (lo[b] + frac * (hi[b] - lo[b])).squeeze(-1)
        out.append(torch.where(qi > 0, t, torch.zeros_like(t)))
    return torch.stack(out)


def cdf(counts: torch.Tensor, edges: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float64, values' shape [n, *counts.shape[:-1]]: the fraction of each histogram's entries below
    each value, linear within a bin (the inverse of `quantile_values`)."""
    c = counts.to(torch.float64)
    cum = c.cumsum(-1)
    lo, hi = _bin_bounds(edges.to(torch.float64))
    v = values.to(torch.float64)
    b = torch.bucketize(v, edges.to(torch.float64), right=True)  # [n, ...]
    n = c.unsqueeze(0).expand(len(v), *c.shape).gather(-1, b.unsqueeze(-1)).squeeze(-1)
    before = cum.unsqueeze(0).expand(len(v), *c.shape).gather(-1, b.unsqueeze(-1)).squeeze(-1) - n
    width = hi[b] - lo[b]
    frac = torch.where(width > 0, (v - lo[b]) / width.clamp(min=1e-300), torch.ones_like(v)).clamp(0, 1)
    return (before + frac * n) / cum[..., -1]


def corrected_quantiles(
    levels: torch.Tensor,
    base: torch.Tensor,
    grid: torch.Tensor | None,
    quantiles: torch.Tensor | None,
    base_grid: torch.Tensor | None,
) -> torch.Tensor:
    """float64, base's shape [n, *sites]: the dense-histogram quantile each site thresholds at for each
    level. `base` [n, *sites] is the uncorrected fraction to drop at `levels` [n] (TEAL: the level
    itself); with a correction (`quantiles` [G, *sites] measured at `grid` [G] levels, where the
    uncorrected fraction was `base_grid` [G, *sites]) the correction quantiles - base_grid is
    interpolated linearly in the level (0 at level 0) and added, the result clamped to [0, 1]."""
    base = base.to(torch.float64)
    if grid is None or quantiles is None or base_grid is None:
        return base.clone()
    s = levels.to(torch.float64)
    sites = base.shape[1:]
    xs = torch.cat([s.new_zeros(1), grid.to(torch.float64)])
    ys = torch.cat([s.new_zeros(1, *sites), quantiles.to(torch.float64) - base_grid.to(torch.float64)])
    i = torch.searchsorted(xs, s, right=True).clamp(1, len(xs) - 1)
    w = ((s - xs[i - 1]) / (xs[i] - xs[i - 1])).clamp(0, 1).reshape(-1, *([1] * len(sites)))
    return (base + ys[i - 1] + w * (ys[i] - ys[i - 1])).clamp(0, 1)
