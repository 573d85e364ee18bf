"""R-Sparse (Zhang et al., "R-Sparse: Rank-Aware Activation Sparsity for Efficient LLM Inference", ICLR
2025) as a method of the `sparsity` plugin: what the calibration keeps for it and the hook that applies it.

For a projection y = W x (W [out, in], SVD W = U S V^T), R-Sparse keeps the input channels whose score
|x_j| * ||W[:, j]|| (the weight column's norm: the paper code's `scale`) is above a threshold and sends
the dropped part x_d through the top-r singular components of W (a projection whose budget goes all to
the sparse path, alpha = 1, scores by |x_j| alone, as the paper's code does):

    y = W x_s + U_r S_r V_r^T x_d

At sparsity level s (the paper's "model-level sparsity": the fraction of the dense projection's
multiply-adds saved) a projection's budget is (1 - s) in*out; a share alpha of it goes to the sparse
path (a fraction 1 - (1 - s) alpha of the inputs is dropped), the rest to the low-rank path, r =
(1 - s)(1 - alpha) in*out / (in + out). Here r is also capped by the factors stored (`rank_cap`, a
fraction of the weight's size), and the dropped fraction t is whatever keeps the budget exact:

    t(s) = s + r(s) (in + out) / (in * out),   r(s) = min(floor((1 - s)(1 - alpha) in*out / (in + out)), R)

alpha and s per projection: the paper searches both per layer (evolutionary) over the whole model. Here
each projection's alpha is picked at calibration from a few candidates by the relative error of its own
output on calibration inputs, averaged over a few levels (calibrate_methods.py), the same at every level;
and a model-wide level s is shared among the projections by the greedy allocation of allocation.py (each
projection's own s_i, the multiply-add-weighted mean of the s_i equal to s; `allocation`). q/k/v and
gate/up are one fused matrix each here (one mask, one SVD), as in our fused projections.

Achieved sparsity (what the metric reports, and the tests check): 1 - ((1 - z) in*out + r (in + out)) /
(in*out), z the zero fraction of the sparse path's input; it equals s_i when z = t(s_i). Over a layer's
projections, weighted by their sizes in*out, it is s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from actserve.interventions.base import PROJECTIONS, LinearCall, RowInputs
from actserve.interventions.sparsity.allocation import allocated_levels, check_allocation
from actserve.interventions.sparsity.histograms import corrected_quantiles, quantile_values

INPUT = "sparsity_level"  # the per-row level index (plugin.py's row input), -1: not this method's row


def budget_rank(level: torch.Tensor, alpha: torch.Tensor, n_in: int, n_out: int, cap: int) -> torch.Tensor:
    """int64, broadcast of level and alpha: r(s) of the module doc (0 at level 0)."""
    s = level.to(torch.float64)
    r = torch.floor((1 - s) * (1 - alpha.to(torch.float64)) * n_in * n_out / (n_in + n_out) + 1e-9)
    return torch.where(s > 0, r.clamp(0, cap), torch.zeros_like(r)).long()


def dropped_fraction(level: torch.Tensor, rank: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """float64: t(s) of the module doc, the fraction of the inputs the sparse path drops."""
    return (level.to(torch.float64) + rank.to(torch.float64) * (n_in + n_out) / (n_in * n_out)).clamp(0, 1)


def drop_mask(x: torch.Tensor, scale: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """[rows, in] bool: the inputs the sparse path drops, |x| * scale < thr (scale [in]: ||W[:, j]||, or 1
    where alpha = 1; thr [rows, 1]; 0: none)."""
    return (x.abs().float() * scale) < thr


def low_rank(x_d: torch.Tensor, vs: torch.Tensor, u: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """[rows, out]: U_r S_r V_r^T x_d per row, r = rank [rows] (vs = V S [in, R], u = U [out, R], columns
    in decreasing singular value; components at and past a row's rank are masked out)."""
    t = x_d.to(vs.dtype) @ vs
    keep = torch.arange(vs.shape[1], device=vs.device).unsqueeze(0) < rank.unsqueeze(1)
    return (t * keep) @ u.T


@dataclass
class RSparseStats:
    """What the artifact keeps for R-Sparse (tensors `r_sparse.*`), per projection p of PROJECTIONS."""

    alpha: torch.Tensor  # float64 [layers, 4]: the sparse share of the budget
    colnorm: dict[str, torch.Tensor]  # p -> float32 [layers, in]: ||W[:, j]||
    vs: dict[str, torch.Tensor]  # p -> float32 [layers, in, R]: V S, top R components
    u: dict[str, torch.Tensor]  # p -> float32 [layers, out, R]: U
    counts: torch.Tensor  # int64 [layers, 4, bins + 2]: dense histogram of the score (`scale`)
    grid: torch.Tensor | None = None  # float64 [G]
    quantiles: torch.Tensor | None = None  # float64 [G, layers, 4]: corrected dense quantiles
    rank_fraction: float = field(default=0.125)  # R <= rank_fraction * in*out / (in + out)
    allocation: torch.Tensor | None = None  # float64 [G, layers, 4]: each projection's level at grid[g]

    def shape(self, p: str) -> tuple[int, int, int]:
        """(in, out, R) of projection p."""
        return self.vs[p].shape[1], self.u[p].shape[1], self.vs[p].shape[2]

    def scale(self) -> dict[str, torch.Tensor]:
        """p -> float32 [layers, in]: what |x_j| is multiplied by in the score: ||W[:, j]||, or 1 at the
        projections whose alpha is 1."""
        out = {}
        for i, p in enumerate(PROJECTIONS):
            c = self.colnorm[p].float()
            out[p] = torch.where((self.alpha[:, i] < 1).unsqueeze(1), c, torch.ones_like(c))
        return out

    def site_levels(self, levels: torch.Tensor) -> torch.Tensor:
        """float64 [len(levels), layers, 4]: each projection's own level at the model-wide `levels` (the
        allocation's, or the level itself without one)."""
        if self.allocation is None or self.grid is None:
            return levels.to(torch.float64).reshape(-1, 1, 1).expand(-1, *self.alpha.shape).clone()
        return allocated_levels(levels, self.grid, self.allocation)

    def ranks_at(self, site_levels: torch.Tensor) -> torch.Tensor:
        """int64 [n, layers, 4]: r at each projection's own level (site_levels [n, layers, 4])."""
        out = []
        for i, p in enumerate(PROJECTIONS):
            n_in, n_out, cap = self.shape(p)
            out.append(budget_rank(site_levels[..., i], self.alpha[:, i].reshape(1, -1), n_in, n_out, cap))
        return torch.stack(out, dim=2)

    def targets_at(self, site_levels: torch.Tensor) -> torch.Tensor:
        """float64 [n, layers, 4]: t at each projection's own level, the dropped fraction of its input."""
        ranks = self.ranks_at(site_levels)
        cols = []
        for i, p in enumerate(PROJECTIONS):
            n_in, n_out, _ = self.shape(p)
            cols.append(dropped_fraction(site_levels[..., i], ranks[..., i], n_in, n_out))
        return torch.stack(cols, dim=2)

    def ranks(self, levels: torch.Tensor) -> torch.Tensor:
        """int64 [len(levels), layers, 4]."""
        return self.ranks_at(self.site_levels(levels))

    def targets(self, levels: torch.Tensor) -> torch.Tensor:
        """float64 [len(levels), layers, 4]: t(s_i), the dropped fraction of each projection's input."""
        return self.targets_at(self.site_levels(levels))

    def thresholds(self, levels: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """float32 [len(levels), layers, 4]: the threshold on the score (level 0: 0)."""
        base_grid = None if self.grid is None else self.targets(self.grid)
        q = corrected_quantiles(levels, self.targets(levels), self.grid, self.quantiles, base_grid)
        return quantile_values(self.counts, edges, q).float()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"r_sparse.alpha": self.alpha.double().cpu(), "r_sparse.histogram": self.counts.cpu()}
        out["r_sparse.rank_fraction"] = torch.tensor([self.rank_fraction], dtype=torch.float64)
        for p in PROJECTIONS:
            out |= {
                f"r_sparse.{p}.colnorm": self.colnorm[p].float().cpu().contiguous(),
                f"r_sparse.{p}.vs": self.vs[p].float().cpu().contiguous(),
                f"r_sparse.{p}.u": self.u[p].float().cpu().contiguous(),
            }
        if self.grid is not None and self.quantiles is not None:
            out |= {
                "r_sparse.levels": self.grid.cpu().double(),
                "r_sparse.quantiles": self.quantiles.cpu().double(),
            }
        if self.allocation is not None:
            out["r_sparse.allocation"] = self.allocation.cpu().double()
        return out

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], num_layers: int, bins: int) -> RSparseStats | None:
        """From the artifact's tensors (None when it has no R-Sparse section); ValueError naming what is
        wrong."""
        if not any(k.startswith("r_sparse.") for k in tensors):
            return None
        try:
            alpha, counts = tensors["r_sparse.alpha"], tensors["r_sparse.histogram"]
            frac = float(tensors["r_sparse.rank_fraction"][0])
            colnorm = {p: tensors[f"r_sparse.{p}.colnorm"] for p in PROJECTIONS}
            vs = {p: tensors[f"r_sparse.{p}.vs"] for p in PROJECTIONS}
            u = {p: tensors[f"r_sparse.{p}.u"] for p in PROJECTIONS}
        except (KeyError, IndexError) as e:
            raise ValueError(f"incomplete R-Sparse section (missing {e})") from None
        sites = (num_layers, len(PROJECTIONS))
        if alpha.shape != sites or not bool(((alpha > 0) & (alpha <= 1)).all()):
            raise ValueError(f"r_sparse.alpha must be [{num_layers}, 4] within (0, 1]")
        if counts.shape != (*sites, bins) or counts.dtype != torch.int64 or bool((counts < 0).any()):
            raise ValueError(f"r_sparse.histogram must be int64 [{num_layers}, 4, {bins}], not negative")
        if bool((counts.sum(-1) == 0).any()) or not 0 < frac <= 1:
            raise ValueError("r_sparse.histogram needs entries at every site; rank_fraction in (0, 1]")
        for p in PROJECTIONS:
            c, a, b = colnorm[p], vs[p], u[p]
            ok = c.dim() == 2 and a.dim() == 3 and b.dim() == 3 and c.shape[0] == a.shape[0] == b.shape[0]
            if not ok or c.shape != a.shape[:2] or a.shape[2] != b.shape[2] or a.shape[0] != num_layers:
                raise ValueError(
                    f"r_sparse.{p}: must be colnorm [layers, in], vs [layers, in, R], u [layers, out, R]"
                )
            n_in, n_out, cap = a.shape[1], b.shape[1], a.shape[2]
            if cap > math.floor(frac * n_in * n_out / (n_in + n_out)):
                raise ValueError(f"r_sparse.{p}: {cap} components, more than rank_fraction {frac} allows")
            if not all(bool(torch.isfinite(t).all()) for t in (a, b, c)):
                raise ValueError(f"r_sparse.{p}: factors and column norms must be finite")
        grid, q = tensors.get("r_sparse.levels"), tensors.get("r_sparse.quantiles")
        if (grid is None) != (q is None):
            raise ValueError("r_sparse.levels and r_sparse.quantiles come together")
        if grid is not None and q is not None:
            if grid.dim() != 1 or q.shape != (len(grid), *sites):
                raise ValueError(f"r_sparse.quantiles must be [G, {num_layers}, 4]")
            if not bool((grid > 0).all() and (grid < 1).all() and (grid[1:] > grid[:-1]).all()):
                raise ValueError("r_sparse.levels must increase within (0, 1)")
            if not bool(((q >= 0) & (q <= 1)).all()):
                raise ValueError("r_sparse.quantiles must lie in [0, 1]")
        alloc = tensors.get("r_sparse.allocation")
        if alloc is not None:
            check_allocation(alloc, grid, num_layers, len(PROJECTIONS), "r_sparse")
        return cls(alpha.double(), colnorm, vs, u, counts, grid, q, frac, alloc)


class RSparseHook:
    """R-Sparse at decode for the rows whose level index (`INPUT`, -1: none) is >= 1, at every projection:
    the input's low-score entries dropped (input hook), their low-rank product added (output hook)."""

    def __init__(
        self,
        thresholds: torch.Tensor,
        ranks: torch.Tensor,
        scale: dict[str, torch.Tensor],
        vs: dict[str, torch.Tensor],
        u: dict[str, torch.Tensor],
    ) -> None:
        self.thresholds, self.rank_table = thresholds, ranks  # [levels, layers, 4] each
        self.scale, self.vs, self.u = scale, vs, u  # scale: RSparseStats.scale
        layers = thresholds.shape[1]
        self._sites = {(layer, p) for layer in range(layers) for p in PROJECTIONS}

    def sites(self) -> set[tuple[int, str]]:
        return self._sites

    def rank(self, layer: int, proj: str, inputs: RowInputs) -> torch.Tensor:
        """[rows] int64: each row's rank at this site (0 for rows not at a level)."""
        idx = inputs[INPUT][:, 0].clamp(min=0).long()
        return self.rank_table[:, layer, PROJECTIONS.index(proj)][idx]

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: RowInputs) -> torch.Tensor:
        idx = inputs[INPUT][:, 0].clamp(min=0).long()
        thr = self.thresholds[:, layer, PROJECTIONS.index(proj)][idx].unsqueeze(1)
        return x.masked_fill(drop_mask(x, self.scale[proj][layer], thr), 0)

    def output(self, layer: int, proj: str, call: LinearCall, inputs: RowInputs) -> torch.Tensor:
        rank = self.rank(layer, proj, inputs)
        x_d = call.x_in.masked_fill(call.x != 0, 0)  # what the input hook dropped (0 where it kept)
        extra = low_rank(x_d, self.vs[proj][layer], self.u[proj][layer], rank).to(call.y.dtype)
        return torch.where((rank > 0).unsqueeze(1), call.y + extra, call.y)
