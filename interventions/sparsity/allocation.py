"""How a model-wide sparsity level is shared among a method's sites (per layer: TEAL's and R-Sparse's four
projection inputs; CHESS's q input, o input, FFN channels and down input): a greedy allocation on measured
costs, as TEAL's greedy and R-Sparse's per-layer search do, model-wide here.

Cost: for each site and probe level p (PROBE_LEVELS), the mean KL(dense || probed) of the next-token
distributions over probe text with only that site sparsified, a fraction p of its entries dropped
(probe.py). Between probe levels the cost is interpolated in log-log (a power law), beyond them the power
law of the nearest two (exponent at least 1), 0 at level 0; its increments are then made non-decreasing
(the curve's convex majorant from below is not needed: measured curves are convex up to noise), so the
greedy below is optimal for the curves it sees.

Budget: the share of the method's multiply-adds saved, sum_i w_i l_i / sum_i w_i (w_i: the multiply-adds
a site's level saves per unit, `site_weights`). Greedy: from every site at 0, the site whose next STEP
costs the least KL per multiply-add saved goes up by STEP (at most MAX_SITE_LEVEL), until the share
reaches each grid level; the step that crosses a grid level is taken in part, linearly, so the share is
exact there. One path for all levels: a site's level never falls as the model-wide level rises. Costs of
sites are taken as additive (on SmolLM2-135M's calibration text the sum of the 90 single-site KLs of CHESS
at 0.4 was within 10 % of the KL with all of them at once).

CHESS's coupling: its FFN-channel site f (channels zeroed by the gate's score: the up row and the down
column not needed) and its down site d (the down input's zero share, CHESS's channels included, so d >=
f; the rest thresholded on |silu(gate)·up|) share the down input. Cost c_f(f) + c_d(d) - c_d(f): the
channel mask's own cost, plus what the down threshold adds beyond the zeros it already has; a step of f
with d = f moves d with it (both the up row and the down column saved).
"""

from __future__ import annotations

import math

import torch

PROBE_LEVELS = (0.2, 0.4, 0.6, 0.8)  # the levels each site is probed at
STEP = 0.05  # the greedy's step of a site's level
MAX_SITE_LEVEL = 0.9  # the most any site drops (the highest level a request may ask for)


def site_weights(method: str, hidden: int, q_size: int, kv_size: int, intermediate: int) -> torch.Tensor:
    """float64 [sites]: the multiply-adds per token that a site's level 1 saves, per layer. TEAL and
    R-Sparse: each projection's weight size (qkv, o, gate_up, down); CHESS: the q part of qkv, o, the up
    rows (FFN channels) and the down columns (down input)."""
    h, q, kv, n = hidden, q_size, kv_size, intermediate
    if method == "chess":
        return torch.tensor([h * q, q * h, n * h, n * h], dtype=torch.float64)
    return torch.tensor([h * (q + 2 * kv), q * h, 2 * n * h, n * h], dtype=torch.float64)


def cost_curves(costs: torch.Tensor, probe_levels: tuple[float, ...] = PROBE_LEVELS) -> torch.Tensor:
    """float64 [*sites, K + 1]: the costs [*sites, P] measured at `probe_levels` (increasing, P >= 2) at
    the levels 0, STEP, ..., MAX_SITE_LEVEL (module doc)."""
    k = round(MAX_SITE_LEVEL / STEP)
    lx = (torch.arange(1, k + 1, dtype=torch.float64) * STEP).log()
    lp = torch.tensor(probe_levels, dtype=torch.float64).log()
    lc = costs.to(torch.float64).clamp(min=1e-12).log()
    i = torch.searchsorted(lp, lx).clamp(1, len(probe_levels) - 1)  # the segment [i - 1, i]
    slope = (lc[..., i] - lc[..., i - 1]) / (lp[i] - lp[i - 1])
    above = lx > lp[-1]
    slope = torch.where(above | (lx < lp[0]), slope.clamp(min=1.0), slope)  # extrapolated
    a = torch.where(above, i, i - 1)  # the probe level it is anchored at: the nearest below, or the last
    curve = (lc[..., a] + slope * (lx - lp[a])).exp()
    curve = torch.cat([torch.zeros_like(curve[..., :1]), curve], dim=-1)
    steps = curve.diff(dim=-1).clamp(min=0).cummax(dim=-1).values  # non-decreasing increments
    return torch.cat([torch.zeros_like(curve[..., :1]), steps.cumsum(-1)], dim=-1)


def greedy_allocation(
    curves: torch.Tensor,
    weights: torch.Tensor,
    grid: torch.Tensor,
    coupled: tuple[int, int] | None = None,
) -> torch.Tensor:
    """float64 [G, layers, sites]: each site's level at each grid level (module doc). `curves` [layers,
    sites, K + 1] on the levels k * STEP; `weights` [sites] per layer; `coupled` = (f, d): CHESS's FFN
    channel and down sites."""
    c = curves.to(torch.float64)
    layers, sites, kk = c.shape
    w = weights.to(torch.float64).expand(layers, sites)
    total = float(w.sum())
    idx = torch.zeros(layers, sites, dtype=torch.long)
    out = torch.zeros(len(grid), layers, sites, dtype=torch.float64)
    targets = [float(g) * total for g in grid]
    g, got = 0, 0.0
    rows = torch.arange(layers)
    while g < len(targets):
        nxt = (idx + 1).clamp(max=kk - 1)
        step_cost = c.gather(2, nxt.unsqueeze(2)).squeeze(2) - c.gather(2, idx.unsqueeze(2)).squeeze(2)
        gain = w * STEP
        moved = [None] * layers
        if coupled is not None:
            f, d = coupled
            together = idx[:, d] == idx[:, f]
            c_d = c[:, d]
            d_step = c_d[rows, nxt[:, f]] - c_d[rows, idx[:, f]]
            # d above f: the channel mask takes zeros the down threshold had (cost less that, no down gain)
            step_cost[:, f] = torch.where(together, step_cost[:, f], step_cost[:, f] - d_step)
            gain = gain.clone()
            gain[:, f] = torch.where(together, (w[:, f] + w[:, d]) * STEP, w[:, f] * STEP)
            moved = together.tolist()
        slope = torch.where(idx < kk - 1, step_cost / gain, torch.full_like(step_cost, math.inf))
        best = int(slope.argmin())
        if not math.isfinite(float(slope.flatten()[best])):
            raise ValueError("the grid asks for more than every site at MAX_SITE_LEVEL saves")
        layer, site = divmod(best, sites)
        before = idx[layer].to(torch.float64) * STEP
        idx[layer, site] += 1
        if coupled is not None and site == coupled[0] and moved[layer]:
            idx[layer, coupled[1]] += 1
        after = idx[layer].to(torch.float64) * STEP
        delta = float(gain[layer, site])
        while g < len(targets) and got + delta >= targets[g] - 1e-9 * total:
            frac = min(1.0, max(0.0, (targets[g] - got) / delta))
            out[g] = idx.to(torch.float64) * STEP
            out[g, layer] = before + frac * (after - before)
            g += 1
        got += delta
    return out


def allocated_levels(levels: torch.Tensor, grid: torch.Tensor, allocation: torch.Tensor) -> torch.Tensor:
    """float64 [len(levels), layers, sites]: each site's level at `levels`, linear between the grid levels
    of `allocation` [G, layers, sites] (0 at level 0; the last grid level's beyond it)."""
    s = levels.to(torch.float64)
    xs = torch.cat([s.new_zeros(1), grid.to(torch.float64)])
    ys = torch.cat([allocation.new_zeros(1, *allocation.shape[1:]), allocation.to(torch.float64)])
    i = torch.searchsorted(xs, s, right=True).clamp(1, len(xs) - 1)
    frac = ((s - xs[i - 1]) / (xs[i] - xs[i - 1])).clamp(0, 1).reshape(-1, 1, 1)
    return ys[i - 1] + frac * (ys[i] - ys[i - 1])


def check_allocation(
    allocation: torch.Tensor, grid: torch.Tensor | None, num_layers: int, sites: int, name: str
) -> None:
    """ValueError naming `name` unless `allocation` is [len(grid), num_layers, sites] within [0, 1] and
    comes with its grid."""
    if grid is None:
        raise ValueError(f"{name}.allocation needs {name}.levels")
    if allocation.shape != (len(grid), num_layers, sites):
        raise ValueError(f"{name}.allocation must be [{len(grid)}, {num_layers}, {sites}]")
    if not bool(((allocation >= 0) & (allocation <= 1)).all()):
        raise ValueError(f"{name}.allocation must lie in [0, 1]")
