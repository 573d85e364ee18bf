"""Calibration of CHESS and R-Sparse (chess.py, r_sparse.py), run by calibrate.py after TEAL's dense pass,
through the engine's own forwards (`collect(linear=...)`), as TEAL's.

- CHESS: E|up_i| per FFN channel over the dense pass (`UpMean`), then a second dense pass for the
  histogram of the FFN score |silu(gate_i)| * E|up_i| (`ChessScores`), then the correction: per grid
  level one forward with CHESS applied at each site's allocated level (allocation.py), each site's
  threshold fixed in forward order as that quantile of what it sees (`SequentialChess`).
- R-Sparse: each projection's weight column norms, the histogram of |x_j| * ||W[:, j]|| over the dense
  pass (`ScoreHistograms`), the SVD of each weight and its sparse share alpha (`AlphaSearch`, one forward
  over the correction sample: per projection, the candidate with the lowest relative error of its output
  on those inputs, averaged over SEARCH_LEVELS; where alpha = 1 the score is |x_j|, as the paper's code
  does for a projection without a low-rank part), then the correction (`SequentialRSparse`).

The same hooks at one nonzero site and level are the allocation's probes (probe.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from actserve.interventions.sparsity.chess import SITES as CHESS_SITES
from actserve.interventions.sparsity.chess import ffn_mask, zero_ffn_channels
from actserve.interventions.sparsity.histograms import bin_index, log_edges, quantile_values
from actserve.interventions.sparsity.r_sparse import (
    RSparseStats,
    budget_rank,
    drop_mask,
    dropped_fraction,
    low_rank,
)
from actserve.server.contract import PROJECTIONS, LinearCall

ALPHAS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # R-Sparse's sparse share candidates (ties: the larger wins)
SEARCH_LEVELS = (0.25, 0.4, 0.5, 0.7)  # the levels alpha's error is averaged over
SEARCH_ROWS = 256  # calibration rows per projection the search reads


class _Sites:
    """A linear hook at every projection of every layer, with the histogram helper."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.edges = log_edges().to(device)
        self.bins = len(self.edges) + 1
        self.num_layers = num_layers
        self._sites = {(layer, p) for layer in range(num_layers) for p in PROJECTIONS}

    def sites(self) -> set[tuple[int, str]]:
        return self._sites

    def histogram(self, values: torch.Tensor) -> torch.Tensor:
        return torch.bincount(bin_index(values).flatten(), minlength=self.bins)

    def quantile(self, values: torch.Tensor, q: float) -> float:
        """The q-quantile of `values` through their histogram (as the TEAL correction computes it)."""
        hist = self.histogram(values).cpu()
        return float(quantile_values(hist, self.edges.cpu(), torch.tensor([q], dtype=torch.float64))[0])

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: Any) -> torch.Tensor:
        return x


class Chain(_Sites):
    """Several observing hooks at once (each returns its input unchanged)."""

    def __init__(self, hooks: list[Any], num_layers: int, device: torch.device) -> None:
        super().__init__(num_layers, device)
        self.hooks = hooks

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: Any) -> torch.Tensor:
        for h in self.hooks:
            h.apply(layer, proj, x, inputs)
        return x

    def output(self, layer: int, proj: str, call: LinearCall, inputs: Any) -> torch.Tensor:
        for h in self.hooks:
            if callable(getattr(h, "output", None)):
                h.output(layer, proj, call, inputs)
        return call.y


class UpMean(_Sites):
    """Sums |up_i| (the gate_up output's second half) per layer and channel over the dense forwards."""

    def __init__(self, num_layers: int, n: int, device: torch.device) -> None:
        super().__init__(num_layers, device)
        self.sums = torch.zeros(num_layers, n, dtype=torch.float64, device=device)
        self.tokens = 0

    def output(self, layer: int, proj: str, call: LinearCall, inputs: Any) -> torch.Tensor:
        if proj == "gate_up_proj":
            n = call.y.shape[1] // 2
            self.sums[layer] += call.y[:, n:].abs().sum(0, dtype=torch.float64)
            self.tokens += call.y.shape[0] if layer == 0 else 0
        return call.y

    def mean(self) -> torch.Tensor:
        return (self.sums / max(1, self.tokens)).float()


class ChessScores(_Sites):
    """The dense histogram of CHESS's FFN score |silu(gate_i)| * E|up_i| per layer."""

    def __init__(self, up_mean: torch.Tensor, device: torch.device) -> None:
        super().__init__(up_mean.shape[0], device)
        self.up_mean = up_mean.to(device)
        self.counts = torch.zeros(up_mean.shape[0], self.bins, dtype=torch.int64, device=device)

    def output(self, layer: int, proj: str, call: LinearCall, inputs: Any) -> torch.Tensor:
        if proj == "gate_up_proj":
            gate = call.y[:, : call.y.shape[1] // 2]
            self.counts[layer] += self.histogram(F.silu(gate.float()).abs() * self.up_mean[layer])
        return call.y


class SequentialChess(_Sites):
    """CHESS at per-site levels `targets[self.level]` ([G, layers, 4] over SITES: q input, o input, FFN
    channels, down input) over one forward: each site's threshold, the first time it sees that level, is
    its target quantile of this forward's values there (`table` [G, layers, 4]: thresholds on |x| and the
    FFN's lambda), then applied, so later sites see the sparsified model. The down input's target counts
    the FFN's zeroed channels too (a target at or below their share adds no threshold)."""

    def __init__(
        self, targets: torch.Tensor, up_mean: torch.Tensor, q_size: int, device: torch.device
    ) -> None:
        super().__init__(up_mean.shape[0], device)
        self.targets, self.up_mean, self.q_size = targets.to(torch.float64), up_mean.to(device), q_size
        self.table = torch.zeros(targets.shape, dtype=torch.float64)
        self.done = torch.zeros(self.table.shape, dtype=torch.bool)
        self.level = 0

    def _threshold(self, layer: int, site: str, values: torch.Tensor) -> float:
        g, k = self.level, CHESS_SITES.index(site)
        if not self.done[g, layer, k]:
            target = float(self.targets[g, layer, k])
            self.table[g, layer, k] = self.quantile(values, target) if target > 0 else 0.0
            self.done[g, layer, k] = True
        return float(self.table[g, layer, k])

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: Any) -> torch.Tensor:
        site = {"qkv_proj": "q", "o_proj": "o", "down_proj": "down"}.get(proj)
        if site is None:
            return x
        thr = self._threshold(layer, site, x.abs())
        return x.masked_fill(x.abs() < thr, 0) if thr > 0 else x

    def output(self, layer: int, proj: str, call: LinearCall, inputs: Any) -> torch.Tensor:
        y = call.y
        if proj == "qkv_proj":
            if self._threshold(layer, "q", call.x_in.abs()) == 0:
                return y
            return torch.cat([y[:, : self.q_size], call.matmul(call.x_in)[:, self.q_size :]], dim=1)
        if proj != "gate_up_proj":
            return y
        gate = y[:, : y.shape[1] // 2]
        lam = self._threshold(layer, "ffn", F.silu(gate.float()).abs() * self.up_mean[layer])
        if lam == 0:
            return y
        lam_rows = torch.full((y.shape[0], 1), lam, dtype=torch.float32, device=y.device)
        return zero_ffn_channels(y, ffn_mask(gate, self.up_mean[layer], lam_rows))


def column_norms(weights: dict[tuple[int, str], torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """p -> float32 [layers, in]: ||W[:, j]|| of each projection's weight."""
    return {
        p: torch.stack([weights[(layer, p)].float().norm(dim=0) for layer in range(num_layers)])
        for p in PROJECTIONS
    }


class ScoreHistograms(_Sites):
    """The dense histogram of R-Sparse's score |x_j| * ||W[:, j]|| at every projection input."""

    def __init__(self, colnorm: dict[str, torch.Tensor], num_layers: int, device: torch.device) -> None:
        super().__init__(num_layers, device)
        self.colnorm = {p: c.to(device) for p, c in colnorm.items()}
        self.counts = torch.zeros(num_layers, len(PROJECTIONS), self.bins, dtype=torch.int64, device=device)

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: Any) -> torch.Tensor:
        score = x.abs().float() * self.colnorm[proj][layer]
        self.counts[layer, PROJECTIONS.index(proj)] += self.histogram(score)
        return x


def rank_cap(n_in: int, n_out: int, fraction: float) -> int:
    """R: the most singular components stored, so that the factors hold <= fraction of the weight."""
    return int(fraction * n_in * n_out // (n_in + n_out))


def search_alpha(
    x: torch.Tensor, w: torch.Tensor, colnorm: torch.Tensor, cap: int
) -> tuple[float, torch.Tensor, torch.Tensor, dict[str, float]]:
    """(alpha, V S [in, cap], U [out, cap], mean relative error by alpha) for one projection, from its
    dense inputs x [T, in] and weight w [out, in]: the error of y = W x_s + U_r S_r V_r^T x_d is
    ||sum over components k >= r of S_k (v_k . x_d) u_k||, as U is orthonormal."""
    x, w = x.float(), w.float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    vs = vh.T * s  # [in, k]
    n_out, n_in = w.shape
    ref = (x @ w.T).pow(2).sum().clamp(min=1e-30)
    scores = {True: x.abs().flatten(), False: (x.abs() * colnorm).flatten()}  # alpha = 1: |x|, as TEAL
    errors: dict[str, float] = {}
    best: tuple[float, float] | None = None
    for a in ALPHAS:
        total = 0.0
        for level in SEARCH_LEVELS:
            lv = torch.tensor(level, dtype=torch.float64)
            r = int(budget_rank(lv, torch.tensor(a, dtype=torch.float64), n_in, n_out, cap))
            t = float(dropped_fraction(lv, torch.tensor(r), n_in, n_out))
            score = scores[a == 1]
            thr = torch.quantile(score, t) if t > 0 else score.new_zeros(())
            x_d = x * (score.reshape(x.shape) < thr)
            total += float((x_d @ vs)[:, r:].pow(2).sum() / ref)
        errors[f"{a:g}"] = total / len(SEARCH_LEVELS)
        if best is None or errors[f"{a:g}"] < best[1]:
            best = (a, errors[f"{a:g}"])
    assert best is not None
    return best[0], vs[:, :cap].contiguous(), u[:, :cap].contiguous(), errors


class AlphaSearch(_Sites):
    """One dense forward: at each projection, `search_alpha` over (a spread of) the rows it sees."""

    def __init__(
        self,
        weights: dict[tuple[int, str], torch.Tensor],
        colnorm: dict[str, torch.Tensor],
        num_layers: int,
        fraction: float,
        device: torch.device,
    ) -> None:
        super().__init__(num_layers, device)
        self.weights, self.colnorm, self.fraction = weights, colnorm, fraction
        self.alpha = torch.ones(num_layers, len(PROJECTIONS), dtype=torch.float64)
        self.vs: dict[tuple[int, str], torch.Tensor] = {}
        self.u: dict[tuple[int, str], torch.Tensor] = {}
        self.errors: dict[str, dict[str, float]] = {}

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: Any) -> torch.Tensor:
        if (layer, proj) in self.vs:
            return x
        rows = x[:: max(1, -(-x.shape[0] // SEARCH_ROWS))]
        w = self.weights[(layer, proj)].to(x.device)
        cap = rank_cap(w.shape[1], w.shape[0], self.fraction)
        a, vs, u, errors = search_alpha(rows, w, self.colnorm[proj][layer].to(x.device), cap)
        self.alpha[layer, PROJECTIONS.index(proj)] = a
        self.vs[(layer, proj)], self.u[(layer, proj)] = vs.cpu(), u.cpu()
        self.errors[f"{layer}.{proj}"] = errors
        return x

    def stats(self, counts: torch.Tensor, teal_counts: torch.Tensor) -> RSparseStats:
        """The R-Sparse section (no allocation or correction yet) from this search, the histograms of
        |x_j| * ||W[:, j]|| (`counts`) and of |x| (`teal_counts`, the score where alpha = 1)."""
        counts = torch.where((self.alpha == 1).unsqueeze(-1), teal_counts.cpu(), counts.cpu())
        layers = range(self.num_layers)
        vs = {p: torch.stack([self.vs[(i, p)] for i in layers]) for p in PROJECTIONS}
        u = {p: torch.stack([self.u[(i, p)] for i in layers]) for p in PROJECTIONS}
        colnorm = {p: c.float().cpu() for p, c in self.colnorm.items()}
        return RSparseStats(self.alpha.clone(), colnorm, vs, u, counts.cpu(), rank_fraction=self.fraction)


class SequentialRSparse(_Sites):
    """R-Sparse at per-site levels `site_levels[self.level]` ([G, layers, 4]) over one forward (`table` [G,
    layers, 4]: the thresholds on the score, each the t(level)-quantile of what its site sees when first
    met; the score is |x_j| * ||W[:, j]||, or |x_j| where alpha = 1)."""

    def __init__(self, site_levels: torch.Tensor, stats: RSparseStats, device: torch.device) -> None:
        super().__init__(stats.alpha.shape[0], device)
        self.level = 0
        self.targets, self.ranks = stats.targets_at(site_levels), stats.ranks_at(site_levels)
        self.scale = {p: c.to(device) for p, c in stats.scale().items()}
        self.vs = {p: t.to(device) for p, t in stats.vs.items()}
        self.u = {p: t.to(device) for p, t in stats.u.items()}
        self.table = torch.zeros(site_levels.shape, dtype=torch.float64)
        self.done = torch.zeros(self.table.shape, dtype=torch.bool)

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: Any) -> torch.Tensor:
        g, p = self.level, PROJECTIONS.index(proj)
        scale = self.scale[proj][layer]
        if not self.done[g, layer, p]:
            target = float(self.targets[g, layer, p])
            self.table[g, layer, p] = self.quantile(x.abs().float() * scale, target) if target > 0 else 0.0
            self.done[g, layer, p] = True
        if self.table[g, layer, p] == 0:
            return x
        thr = torch.full((x.shape[0], 1), float(self.table[g, layer, p]), device=x.device)
        return x.masked_fill(drop_mask(x, scale, thr), 0)

    def output(self, layer: int, proj: str, call: LinearCall, inputs: Any) -> torch.Tensor:
        r = int(self.ranks[self.level, layer, PROJECTIONS.index(proj)])
        if r == 0:
            return call.y
        x_d = call.x_in.masked_fill(call.x != 0, 0)
        rank = torch.full((call.y.shape[0],), r, dtype=torch.long, device=call.y.device)
        vs, u = self.vs[proj][layer].to(x_d.dtype), self.u[proj][layer].to(x_d.dtype)
        return call.y + low_rank(x_d, vs, u, rank).to(call.y.dtype)
