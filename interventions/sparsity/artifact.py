"""The sparsity calibration artifact: histograms of |x| at every projection input, one safetensors file.

Tensors: `histogram` int64 [num_layers, 4, bins + 2] (projections in PROJECTIONS order: qkv_proj, o_proj,
gate_up_proj, down_proj; bin 0 holds |x| < edges[0], exact zeros included, bin i in 1..bins holds
edges[i-1] <= |x| < edges[i], the last bin |x| >= edges[-1]) and `edges` float64 [bins + 1], fixed and
log-spaced: the dense model's inputs. Optional, together: `teal.levels` float64 [G] (the correction's
grid, 0.05 ... 0.90) and `teal.quantiles` float64 [G, num_layers, 4]: at level levels[g], the dense
histogram's quantile that the site's threshold equals once the sparsity upstream is accounted for
(calibrate.py), at the site's own allocated level (`teal.allocation` float64 [G, num_layers, 4], kept for
the record; allocation.py); without them a level's thresholds are the dense quantiles (TEAL's rule with
every site at the level). Metadata
(strings): `format` = "actserve.sparsity", `version`, `model`, `num_layers`, `hidden_size`, `tokens`
(calibration tokens), `projections` and `info` (JSON: how it was made).

Optional sections, each from its method's calibration (version 3; a version-1 file is TEAL's only;
version 2, before the allocation and CHESS's down site, is refused with the command that remakes it):
`chess.*` (chess.py `ChessStats`: E|up| per FFN channel, the dense histogram of CHESS's FFN score, its
corrected quantiles and allocation over its four sites) and `r_sparse.*` (r_sparse.py `RSparseStats`: per
projection the weight's column norms and top singular components, the sparse share alpha, the dense
histogram of its score, its corrected quantiles and allocation, which its ranks are computed from).

Why histograms rather than thresholds: a threshold for any level is a quantile of them (below), so the
file keeps what was measured, not a level table.

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
from actserve.interventions.sparsity.allocation import check_allocation
from actserve.interventions.sparsity.chess import ChessStats
from actserve.interventions.sparsity.histograms import (
    BINS_PER_OCTAVE,
    EDGE_EXPONENTS,
    bin_index,
    cdf,
    corrected_quantiles,
    log_edges,
    quantile_values,
)
from actserve.interventions.sparsity.r_sparse import RSparseStats
from actserve.server.contract import PROJECTIONS, ModelInfo

__all__ = [  # the histogram helpers are re-exported: callers read them as part of the artifact's format
    "ARTIFACT_NAME", "ArtifactError", "BINS_PER_OCTAVE", "EDGE_EXPONENTS", "SparsityCalibration", "bin_index",
    "cdf", "default_path", "load_calibration", "log_edges", "quantile_values", "save_calibration",
]  # fmt: skip

FORMAT = "actserve.sparsity"
VERSION = "3"
READS = ("1", "3")  # version 1: TEAL only; 2: before the per-site allocation and CHESS's down site
ARTIFACT_NAME = "actserve-sparsity.safetensors"


class ArtifactError(ValueError):
    """A file that is not a sparsity calibration, or one made for a model of another shape."""


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
    # each site's level at grid[g] (allocation.py; the correction's thresholds are those quantiles)
    allocation: torch.Tensor | None = None  # float64 [G, num_layers, len(PROJECTIONS)]
    chess: ChessStats | None = None  # CHESS's statistics (chess.py), when calibrated for it
    rsparse: RSparseStats | None = None  # R-Sparse's factors and statistics (r_sparse.py), likewise

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[0])

    def level_quantiles(self, levels: torch.Tensor) -> torch.Tensor:
        """float64 [len(levels), num_layers, len(PROJECTIONS)]: the dense quantile each site thresholds
        at for each level: the level itself without a correction, else the correction interpolated
        linearly between its grid levels (through 0 at level 0)."""
        sites = self.counts.shape[:-1]
        base = levels.to(torch.float64).reshape(-1, 1, 1).expand(-1, *sites)
        grid = self.grid
        base_grid = None if grid is None else grid.to(torch.float64).reshape(-1, 1, 1).expand(-1, *sites)
        return corrected_quantiles(levels, base, grid, self.quantiles, base_grid)

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
    if cal.allocation is not None:
        tensors["teal.allocation"] = cal.allocation.cpu().double()
    for section in (cal.chess, cal.rsparse):
        if section is not None:
            tensors |= section.tensors()
    save_file(tensors, str(path), metadata=meta)


def load_calibration(path: str | Path) -> SparsityCalibration:
    """Read and check a calibration file; ArtifactError on anything that is not one."""
    meta, tensors = read_safetensors(path, ArtifactError)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a sparsity calibration (metadata format {meta.get('format')!r})")
    if meta.get("version") not in READS:
        again = " (made before the per-site allocation: run `actserve sparsity calibrate` again)"
        raise ArtifactError(
            f"{path}: sparsity calibration version {meta.get('version')!r}; reads {', '.join(READS)}"
            + (again if meta.get("version") == "2" else "")
        )
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
            allocation=tensors.get("teal.allocation"),
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
    try:
        if cal.allocation is not None:
            check_allocation(cal.allocation, cal.grid, cal.num_layers, len(PROJECTIONS), "teal")
        cal.chess = ChessStats.read(tensors, cal.num_layers, counts.shape[2])
        cal.rsparse = RSparseStats.read(tensors, cal.num_layers, counts.shape[2])
    except ValueError as e:
        raise ArtifactError(f"{path}: {e}") from None
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
