"""CHESS (He et al., "CHESS: Optimizing LLM Inference via Channel-Wise Thresholding and Selective
Sparsification", EMNLP 2024) as a method of the `sparsity` plugin: what the calibration keeps for it and
the hook that applies it at decode.

The rule (the paper's, as its public code computes it):
- FFN, channel-wise: zeroing channel i of the activated gate a_i = silu(gate_i) changes the FFN output by
  a_i * up_i * W_down[:, i]; CHESS scores each entry by |a_i| * E|up_i| (E over calibration tokens,
  `up_mean`), puts one threshold lambda on that score per layer (its level-quantile over calibration
  tokens), so channel i's own threshold on |a_i| is lambda / E|up_i|. A zeroed a_i zeroes that channel of
  the down projection's input (and its up row is not needed): the hook zeroes gate and up there, at the
  gate_up projection's output (silu(0) * 0 = 0).
- Attention, selective: only the q projection's input and the o projection's input are thresholded
  (one threshold per layer each, on |x|); k and v are computed from the dense input, since they go into
  the KV cache that every later token reads. Our q/k/v are one fused matmul: the hook zeroes the qkv
  input, and its output hook recomputes the k/v part of the row from the dense input.

Ours goes further in two ways (measured on SmolLM2-135M's calibration text, bench/sparsity_quality.py):
- The down input: after the channel mask, the down projection's input silu(gate)·up is known exactly, and
  its entries below a threshold per layer are zeroed too (TEAL's rule at that one site): its column of
  the down weight is not read. The channel mask saves the up row and the down column of a channel, this
  threshold the down column only.
- Levels per site: a request's level s is the share of the multiply-adds of CHESS's sites saved (the q
  part of qkv, o, the up rows, the down columns), shared among the layers' four sites by the greedy
  allocation of allocation.py (the paper uses s at every site). `SITES` order: the q input, the o input,
  the FFN channels, the down input (its share counts the masked channels too).

As for TEAL (calibrate.py), zeroing one site changes the inputs of the later ones, so the calibration
corrects each site's threshold at grid levels 0.05..0.90 with a sequential pass (the paper's code uses
the dense model's statistics only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actserve.interventions.base import PROJECTIONS, LinearCall, RowInputs
from actserve.interventions.sparsity.allocation import check_allocation
from actserve.interventions.sparsity.histograms import corrected_quantiles, quantile_values

# CHESS's thresholded tensors per layer, in the order of its tables: the q projection's input (our
# qkv_proj input), the o projection's input, the FFN's importance score, the down projection's input
SITES = ("q", "o", "ffn", "down")
INPUT = "sparsity_level"  # the per-row level index (plugin.py's row input), -1: not this method's row


def ffn_mask(gate: torch.Tensor, up_mean: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """[rows, N] bool: the FFN channels CHESS zeroes, |silu(gate)| * E|up| < lambda (lam [rows, 1]; 0:
    none, the comparison is strict). Scored in float32."""
    return (F.silu(gate.float()).abs() * up_mean) < lam


def zero_ffn_channels(y: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """The gate_up output [rows, 2N] with gate and up zeroed at the channels `drop` [rows, N] marks."""
    return y.masked_fill(torch.cat([drop, drop], dim=1), 0)


@dataclass
class ChessStats:
    """What the artifact keeps for CHESS (tensors `chess.*`); the q, o and down sites reuse TEAL's dense
    |x| histograms of the qkv, o and down inputs (the artifact's `histogram`)."""

    up_mean: torch.Tensor  # float32 [layers, N]: E|up_i| of the dense model over the calibration tokens
    counts: torch.Tensor  # int64 [layers, bins + 2]: dense histogram of the FFN score |silu(g_i)| * E|up_i|
    grid: torch.Tensor | None = None  # float64 [G]: the correction's levels
    quantiles: torch.Tensor | None = None  # float64 [G, layers, 4]: per SITES, the corrected dense quantile
    allocation: torch.Tensor | None = None  # float64 [G, layers, 4]: per SITES, its level at grid[g]

    def site_counts(self, teal_counts: torch.Tensor) -> torch.Tensor:
        """int64 [layers, 4, bins + 2]: the dense histogram of each SITES tensor."""
        qkv, o, down = (PROJECTIONS.index(p) for p in ("qkv_proj", "o_proj", "down_proj"))
        return torch.stack([teal_counts[:, qkv], teal_counts[:, o], self.counts, teal_counts[:, down]], dim=1)

    def thresholds(
        self, levels: torch.Tensor, teal_counts: torch.Tensor, edges: torch.Tensor
    ) -> torch.Tensor:
        """float32 [len(levels), layers, 4]: per level, the q-input and o-input thresholds on |x|, the
        FFN's lambda and the down-input threshold on |x| (level 0: 0)."""
        counts = self.site_counts(teal_counts)
        base = levels.to(torch.float64).reshape(-1, 1, 1).expand(-1, *counts.shape[:-1])
        base_grid = None
        if self.grid is not None:
            base_grid = self.grid.to(torch.float64).reshape(-1, 1, 1).expand(-1, *counts.shape[:-1])
        q = corrected_quantiles(levels, base, self.grid, self.quantiles, base_grid)
        return quantile_values(counts, edges, q).float()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"chess.up_mean": self.up_mean.float().cpu().contiguous(), "chess.histogram": self.counts.cpu()}
        if self.grid is not None and self.quantiles is not None:
            out |= {
                "chess.levels": self.grid.cpu().double(),
                "chess.quantiles": self.quantiles.cpu().double(),
            }
        if self.allocation is not None:
            out["chess.allocation"] = self.allocation.cpu().double()
        return out

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], num_layers: int, bins: int) -> ChessStats | None:
        """From the artifact's tensors (None when it has no CHESS section); ValueError naming what is
        wrong."""
        if "chess.up_mean" not in tensors and "chess.histogram" not in tensors:
            return None
        up, counts = tensors.get("chess.up_mean"), tensors.get("chess.histogram")
        if up is None or counts is None or up.dim() != 2 or up.shape[0] != num_layers:
            raise ValueError("chess.up_mean [layers, N] and chess.histogram [layers, bins + 2] come together")
        if counts.shape != (num_layers, bins) or counts.dtype != torch.int64 or bool((counts < 0).any()):
            raise ValueError(f"chess.histogram must be int64 [{num_layers}, {bins}], not negative")
        if bool((counts.sum(-1) == 0).any()) or not bool(torch.isfinite(up).all() and (up >= 0).all()):
            raise ValueError("chess.histogram needs entries in every layer; chess.up_mean finite, >= 0")
        grid, q = tensors.get("chess.levels"), tensors.get("chess.quantiles")
        if (grid is None) != (q is None):
            raise ValueError("chess.levels and chess.quantiles come together")
        if grid is not None and q is not None:
            if grid.dim() != 1 or q.shape != (len(grid), num_layers, len(SITES)):
                raise ValueError(f"chess.quantiles must be [G, {num_layers}, {len(SITES)}]")
            if not bool((grid > 0).all() and (grid < 1).all() and (grid[1:] > grid[:-1]).all()):
                raise ValueError("chess.levels must increase within (0, 1)")
            if not bool(((q >= 0) & (q <= 1)).all()):
                raise ValueError("chess.quantiles must lie in [0, 1]")
        alloc = tensors.get("chess.allocation")
        if alloc is not None:
            check_allocation(alloc, grid, num_layers, len(SITES), "chess")
        return cls(up.float(), counts, grid, q, alloc)


class ChessHook:
    """CHESS at decode for the rows whose level index (`INPUT`, -1: none) is >= 1: the q/o inputs
    thresholded, k/v recomputed dense, the FFN's channels below their thresholds zeroed, the down input
    thresholded."""

    def __init__(self, table: torch.Tensor, up_mean: torch.Tensor, q_size: int, num_layers: int) -> None:
        self.table, self.up_mean, self.q_size = table, up_mean, q_size  # [levels, layers, 4], [layers, N]
        self._sites = {(layer, p) for layer in range(num_layers) for p in PROJECTIONS}

    def sites(self) -> set[tuple[int, str]]:
        return self._sites

    def _level(self, inputs: RowInputs) -> tuple[torch.Tensor, torch.Tensor]:
        raw = inputs[INPUT][:, 0]
        return raw.clamp(min=0).long(), raw > 0

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: RowInputs) -> torch.Tensor:
        if proj == "gate_up_proj":
            return x
        idx, _ = self._level(inputs)
        site = {"qkv_proj": "q", "o_proj": "o", "down_proj": "down"}[proj]
        thr = self.table[:, layer, SITES.index(site)][idx]  # [rows]
        return x.masked_fill(x.abs() < thr.unsqueeze(1), 0)

    def output(self, layer: int, proj: str, call: LinearCall, inputs: RowInputs) -> torch.Tensor:
        idx, rows = self._level(inputs)
        y = call.y
        if proj == "qkv_proj":  # k and v from the dense input: CHESS thresholds q's input only
            q = self.q_size
            kv = torch.where(rows.unsqueeze(1), call.matmul(call.x_in)[:, q:], y[:, q:])
            return torch.cat([y[:, :q], kv], dim=1)
        if proj == "gate_up_proj":
            lam = self.table[:, layer, SITES.index("ffn")][idx].unsqueeze(1)
            drop = ffn_mask(y[:, : y.shape[1] // 2], self.up_mean[layer], lam)
            return zero_ffn_channels(y, drop)
        return y
