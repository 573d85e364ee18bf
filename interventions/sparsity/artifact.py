"""The sparsity calibration artifact: histograms of |x| at every projection input, one safetensors file.

Tensors: `histogram` int64 [num_layers, 4, bins + 2] (projections in PROJECTIONS order: qkv_proj, o_proj,
gate_up_proj, down_proj; bin 0 holds |x| < edges[0], exact zeros included, bin i in 1..bins holds
edges[i-1] <= |x| < edges[i], the last bin |x| >= edges[-1]) and `edges` float64 [bins + 1], fixed and
log-spaced: the dense model's inputs. Optional, together: `teal.levels` float64 [G] (the correction's
grid, 0.05 ... 0.90) and `teal.quantiles` float64 [G, num_layers, 4]: at level levels[g], the dense
histogram's quantile that the site's threshold equals once the sparsity upstream is accounted for
(calibrate.py); without them a level's thresholds are the dense quantiles (TEAL as published). Metadata
(strings): `format` = "actserve.sparsity", `version`, `model`, `num_layers`, `hidden_size`, `tokens`
(calibration tokens), `projections` and `info` (JSON: how it was made).

Why histograms rather than thresholds: a TEAL threshold for any level is a quantile of them (below), and
the methods still to come (issue 14: CHESS's per-channel thresholds need per-channel statistics, which a
later version adds) start from the same runs, so the file keeps what was measured, not a level table.

Where it lives: `actserve sparsity calibrate --model DIR` writes `DIR/actserve-sparsity.safetensors`
(beside the weights it describes) unless given `--out`; the server loads that file when it exists, or the
one named by `--sparsity-calibration FILE`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from actserve.interventions.safetensors_file import read_safetensors
from actserve.server.contract import PROJECTIONS, ModelInfo

FORMAT = "actserve.sparsity"
VERSION = "1"
ARTIFACT_NAME = "actserve-sparsity.safetensors"
# bins: 64 per octave over [2^-20, 2^12): a bin is 1.1 % wide in |x|, and a quantile is interpolated
# within its bin, so a threshold's error in sparsity is a small fraction of one bin's share of entries
EDGE_EXPONENTS = (-20, 12)
BINS_PER_OCTAVE = 64


class ArtifactError(ValueError):
    """A file that is not a sparsity calibration, or one made for a model of another shape."""


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


@dataclass
class SparsityCalibration:
    counts: torch.Tensor  # int64 [num_layers, len(PROJECTIONS), bins + 2], the dense model's |x|
    edges: torch.Tensor  # float64 [bins + 1]
    model: str  # the model it was made on (informational: a mismatch only warns)
    hidden_size: int
    tokens: int  # calibration tokens (rows) that went through every projection
    info: dict[str, Any] = field(default_factory=dict)
    # TEAL's correction for the sparsity upstream (calibrate.py): at level grid[g] each site's threshold
    # is the dense histogram's quantiles[g, layer, projection] rather than its grid[g]-quantile
    grid: torch.Tensor | None = None  # float64 [G], increasing in (0, 1)
    quantiles: torch.Tensor | None = None  # float64 [G, num_layers, len(PROJECTIONS)]

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[0])

    def level_quantiles(self, levels: torch.Tensor) -> torch.Tensor:
        """float64 [len(levels), num_layers, len(PROJECTIONS)]: the dense quantile each site thresholds
        at for each level: the level itself without a correction, else the correction interpolated
        linearly between its grid levels (through 0 at level 0)."""
        s = levels.to(torch.float64)
        sites = self.counts.shape[:-1]
        if self.grid is None or self.quantiles is None:
            return s.reshape(-1, 1, 1).expand(-1, *sites).clone()
        xs = torch.cat([s.new_zeros(1), self.grid.to(torch.float64)])
        ys = torch.cat([s.new_zeros(1, *sites), self.quantiles.to(torch.float64)])
        i = torch.searchsorted(xs, s, right=True).clamp(1, len(xs) - 1)
        w = ((s - xs[i - 1]) / (xs[i] - xs[i - 1])).clamp(0, 1).reshape(-1, 1, 1)
        return ys[i - 1] + w * (ys[i] - ys[i - 1])

    def thresholds(self, levels: torch.Tensor) -> torch.Tensor:
        """float32 [len(levels), num_layers, len(PROJECTIONS)]: TEAL's threshold per level, layer and
        projection (a quantile of |x| there; level 0: 0)."""
        return quantile_values(self.counts, self.edges, self.level_quantiles(levels)).float()

    def check_fits(self, info: ModelInfo) -> None:
        if self.hidden_size != info.hidden_size or self.num_layers != info.num_layers:
            raise ArtifactError(
                f"the sparsity calibration was made for a model with hidden size {self.hidden_size} and "
                f"{self.num_layers} layers; the loaded model has {info.hidden_size} and {info.num_layers}"
            )


def default_path(model_dir: str | Path) -> Path:
    """Where `calibrate` writes without --out and the server looks without --sparsity-calibration."""
    return Path(model_dir) / ARTIFACT_NAME


def save_calibration(cal: SparsityCalibration, path: str | Path) -> None:
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": cal.model,
        "num_layers": str(cal.num_layers),
        "hidden_size": str(cal.hidden_size),
        "tokens": str(cal.tokens),
        "projections": ",".join(PROJECTIONS),
        "info": json.dumps(cal.info, sort_keys=True),
    }
    tensors = {"histogram": cal.counts.to(torch.int64).cpu().contiguous(), "edges": cal.edges.cpu().double()}
    if cal.grid is not None and cal.quantiles is not None:
        tensors |= {"teal.levels": cal.grid.cpu().double(), "teal.quantiles": cal.quantiles.cpu().double()}
    save_file(tensors, str(path), metadata=meta)


def load_calibration(path: str | Path) -> SparsityCalibration:
    """Read and check a calibration file; ArtifactError on anything that is not one."""
    meta, tensors = read_safetensors(path, ArtifactError)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a sparsity calibration (metadata format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"{path}: sparsity calibration version {meta.get('version')!r}; reads {VERSION}")
    if meta.get("projections") != ",".join(PROJECTIONS):
        raise ArtifactError(f"{path}: projections {meta.get('projections')!r}, expected {PROJECTIONS}")
    try:
        counts, edges = tensors["histogram"], tensors["edges"]
        cal = SparsityCalibration(
            counts=counts,
            edges=edges,
            model=meta.get("model", ""),
            hidden_size=int(meta["hidden_size"]),
            tokens=int(meta["tokens"]),
            info=json.loads(meta.get("info", "{}")),
            grid=tensors.get("teal.levels"),
            quantiles=tensors.get("teal.quantiles"),
        )
    except (KeyError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{path}: incomplete sparsity calibration ({type(e).__name__}: {e})") from None
    shape_ok = counts.dim() == 3 and counts.shape[1] == len(PROJECTIONS) and counts.dtype == torch.int64
    if not shape_ok or edges.dim() != 1 or counts.shape[2] != len(edges) + 1:
        raise ArtifactError(
            f"{path}: histogram {tuple(counts.shape)} does not fit edges {tuple(edges.shape)}"
        )
    if str(cal.num_layers) != meta.get("num_layers"):
        raise ArtifactError(
            f"{path}: {cal.num_layers} histogram layers, metadata says {meta.get('num_layers')}"
        )
    if not bool((edges[1:] > edges[:-1]).all()) or not bool(edges[0] > 0):
        raise ArtifactError(f"{path}: edges must be positive and increasing")
    if bool((counts < 0).any()) or bool((counts.sum(-1) == 0).any()):
        raise ArtifactError(f"{path}: every histogram needs entries, none negative")
    _check_correction(cal, path)
    return cal


def _check_correction(cal: SparsityCalibration, path: str | Path) -> None:
    grid, q = cal.grid, cal.quantiles
    if grid is None and q is None:
        return
    if grid is None or q is None or grid.dim() != 1 or q.shape != (len(grid), *cal.counts.shape[:-1]):
        raise ArtifactError(
            f"{path}: teal.levels and teal.quantiles must come together, [G] and [G, layers, 4]"
        )
    if not bool((grid > 0).all() and (grid < 1).all() and (grid[1:] > grid[:-1]).all()):
        raise ArtifactError(f"{path}: teal.levels must increase within (0, 1)")
    if not bool(((q >= 0) & (q <= 1)).all()):
        raise ArtifactError(f"{path}: teal.quantiles must lie in [0, 1]")
