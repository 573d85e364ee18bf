"""Calibration for the sparsity plugin: histograms of |x| at every projection input of every decoder
layer (the down projection's input is silu(gate)·up), over calibration text, through the engine's own
forwards (`ModelRunner.collect` with a linear-input hook), so the statistics are of exactly the tensors
the plugin's hook will threshold, in the serving dtype.

Three steps:
1. dense: the model as is; each site's histogram (the artifact's `histogram`). Its level-quantiles are
   TEAL's thresholds as the paper computes them.
2. allocation (allocation.py, probe.py): each site's own level at each grid level (0.05 ... 0.90), from
   one forward per site and probe level over the last `probe_tokens` tokens of the text, with only that
   site sparsified (its KL to dense), and a greedy that spends the level where it costs least.
3. correction: zeroing a site's inputs changes the inputs of every later site (sparser q/k/v give
   smaller attention outputs, so o_proj's inputs shrink, and so on), so dense quantiles overshoot: on
   TinyStories-656K's held-out text they gave 51.8 % zeros at level 0.5 and 74.6 % at 0.7. So for each
   grid level a sample of the text runs as one forward with every site at its allocated level, and each
   site's threshold is fixed, in forward order, as that quantile of the inputs it sees there, all
   earlier sites already thresholded: exact for the sample, in one run. The artifact keeps each as the
   dense histogram's quantile it equals (`teal.quantiles`); levels between grid levels are interpolated
   in that quantile (histograms.py `corrected_quantiles`). The quantiles are kept as measured, not made
   monotone in the level: a site whose own level stays while the sites before it drop more sees smaller
   inputs, and its threshold falls (`correct`).

`reallocate` makes steps 2 and 3 again from a calibration's kept probe costs (a change to either, without
the dense passes and the probes, which are most of the time).

Calibration text: given files (`--text`: JSON lines with a "text" field, or plain text), or by default
the model's own samples (temperature 1.0, a fixed seed) continuing a few fixed, varied openings; no
corpus can be downloaded where actserve is built, and a model's own text is text it meets at decode.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from actserve.interventions.sparsity.allocation import (
    PROBE_LEVELS,
    cost_curves,
    greedy_allocation,
    site_weights,
)
from actserve.interventions.sparsity.artifact import (
    BINS_PER_OCTAVE,
    EDGE_EXPONENTS,
    SparsityCalibration,
    bin_index,
    cdf,
    log_edges,
    quantile_values,
)
from actserve.interventions.sparsity.calibrate_methods import (
    ALPHAS,
    SEARCH_LEVELS,
    AlphaSearch,
    Chain,
    ChessScores,
    ScoreHistograms,
    SequentialChess,
    SequentialRSparse,
    UpMean,
    column_norms,
)
from actserve.interventions.sparsity.chess import SITES as SITES_CHESS
from actserve.interventions.sparsity.chess import ChessStats
from actserve.interventions.sparsity.probe import Prober, probe_text
from actserve.interventions.steering.train import chunks
from actserve.server.contract import PROJECTIONS
from actserve.server.engine.offline import make_sequences, run_sequences
from actserve.server.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from actserve.interventions.base import ModelInfo

log = logging.getLogger(__name__)
# the levels the correction is measured at; levels between are interpolated
CORRECTION_GRID = torch.arange(1, 19, dtype=torch.float64) * 0.05  # 0.05, 0.10, ..., 0.90
METHODS = ("chess", "r_sparse")  # calibrated beside TEAL, whose histograms every calibration makes
PROBE_TOKENS = 512  # the text each allocation probe reads (probe.py)
# what the model continues when no text is given: varied registers, none of them the bench's held-out text
OPENINGS = (
    "Once upon a time",
    "The history of the old bridge begins",
    "To bake bread at home, you need",
    "Q: Why is the sky blue?\nA:",
    "Dear Anna,\nThank you for your letter.",
    "In this chapter we will learn how",
    "The meeting started at nine, and",
    "Here are three tips for a good night's sleep:",
)


class _AllSites:
    """A linear-input hook at every projection of every layer."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.edges = log_edges().to(device)
        self.bins = len(self.edges) + 1
        self._sites = {(layer, p) for layer in range(num_layers) for p in PROJECTIONS}
        self.input_sizes: dict[str, int] = {}

    def sites(self) -> set[tuple[int, str]]:
        return self._sites

    def histogram(self, proj: str, x: torch.Tensor) -> torch.Tensor:
        self.input_sizes[proj] = x.shape[1]
        return torch.bincount(bin_index(x).flatten(), minlength=self.bins)


class HistogramRecorder(_AllSites):
    """Adds each input's |x| histogram to `counts` [layers, 4, bins + 2]; changes nothing."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        super().__init__(num_layers, device)
        self.counts = torch.zeros(num_layers, len(PROJECTIONS), self.bins, dtype=torch.int64, device=device)

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: Any) -> torch.Tensor:
        self.counts[layer, PROJECTIONS.index(proj)] += self.histogram(proj, x)
        return x


class SequentialThresholds(_AllSites):
    """At per-site levels `targets[self.level]` ([G, layers, 4]): the first time a site sees that level,
    its threshold becomes its target quantile of this forward's inputs there (`table` [G, layers, 4]; a
    target of 0: none); then inputs below it are zeroed, so every later site of the forward sees the
    sparsified model."""

    def __init__(self, targets: torch.Tensor, device: torch.device) -> None:
        super().__init__(targets.shape[1], device)
        self.targets = targets.to(torch.float64)
        self.table = torch.zeros(targets.shape, dtype=torch.float64)
        self.done = torch.zeros(self.table.shape, dtype=torch.bool)
        self.level = 0

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: Any) -> torch.Tensor:
        g, p = self.level, PROJECTIONS.index(proj)
        if not self.done[g, layer, p]:
            target = self.targets[g, layer, p : p + 1]
            if float(target) > 0:
                hist = self.histogram(proj, x).cpu()
                self.table[g, layer, p] = quantile_values(hist, self.edges.cpu(), target)[0]
            self.done[g, layer, p] = True
        thr = float(self.table[g, layer, p])
        return x.masked_fill(x.abs() < thr, 0) if thr > 0 else x


def read_texts(paths: list[Path]) -> list[str]:
    """Documents of the files: a `.jsonl` file's lines' "text" fields, any other file whole."""
    docs: list[str] = []
    for path in paths:
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            docs += [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
        else:
            docs.append(raw)
    return docs


def text_windows(tokenizer: Any, docs: list[str], window: int) -> list[list[int]]:
    """Each document's tokens cut into windows of at most `window` (pieces under 2 tokens dropped)."""
    out = []
    for doc in docs:
        ids = list(tokenizer(doc)["input_ids"])
        out += [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 2]
    return out


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # None: tqdm's own choice (on for a terminal)


def generated_windows(
    engine: Any, samples: int, tokens: int, seed: int, progress: bool | None
) -> list[list[int]]:
    """`samples` sequences of the model's own text: OPENINGS in turn, each continued by up to `tokens`
    sampled tokens (temperature 1.0, seed `seed` + i); prompt and continuation together."""
    prompts = [list(engine.tokenizer(OPENINGS[i % len(OPENINGS)])["input_ids"]) for i in range(samples)]
    params = SamplingParams(max_tokens=tokens, temperature=1.0)
    seqs = [
        make_sequences(engine, [p], dataclasses.replace(params, seed=seed + i), tag=f"calib{i}_")[0]
        for i, p in enumerate(prompts)
    ]
    with tqdm(total=samples * tokens, desc="generating", unit="tok", disable=_disable(progress)) as bar:
        outs = run_sequences(engine, seqs, progress=bar.update)
    return [p + o for p, o in zip(prompts, outs, strict=True)]


def spread(token_lists: list[list[int]], tokens: int) -> list[list[int]]:
    """Every k-th sequence, k chosen so that about `tokens` tokens remain (at least one sequence): a
    sample of the whole text, not of its first documents."""
    total = sum(map(len, token_lists))
    return token_lists[:: max(1, -(-total // tokens))]


def calibrate(
    engine: Any,
    token_lists: list[list[int]],
    batch_tokens: int = 4096,
    progress: bool | None = None,
    info: dict[str, Any] | None = None,
    correction_tokens: int | None = 2048,
    grid: torch.Tensor = CORRECTION_GRID,
    methods: tuple[str, ...] = (),
    rank_fraction: float = 0.125,
    probe_tokens: int | None = PROBE_TOKENS,
) -> SparsityCalibration:
    """The dense model's histograms of every projection input over `token_lists` (each a fresh
    sequence, forwards of at most `batch_tokens` tokens), then the correction (module doc) on about
    `correction_tokens` of those tokens (every k-th sequence), one forward per grid level (None: no
    correction, TEAL's dense quantiles). `methods`: which of METHODS (CHESS, R-Sparse) to calibrate beside
    TEAL (calibrate_methods.py; the CLI's default is both); `rank_fraction`: R-Sparse's stored factors, at
    most that share of each weight; `probe_tokens`: the text the allocation's probes read (None or 0:
    every site at the level itself, no probes; needs the correction)."""
    mi = engine.model_info
    if mi.implementation != "native":
        raise ValueError(f"sparsity calibration needs the native model implementation ({mi.fallback_reason})")
    if not token_lists:
        raise ValueError("no calibration text")
    if probe_tokens is not None and (probe_tokens == 1 or probe_tokens < 0):
        raise ValueError(f"probe tokens: 0 (no allocation) or at least 2, not {probe_tokens}")
    if probe_tokens and correction_tokens is None:
        raise ValueError(
            "probe tokens need the correction (its thresholds are fixed at the allocated levels)"
        )
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown calibration methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    runner = engine.runner
    dense = HistogramRecorder(mi.num_layers, mi.device)
    observers: list[Any] = [dense]
    up = UpMean(mi.num_layers, mi.intermediate_size, mi.device) if "chess" in methods else None
    scores = None
    if "r_sparse" in methods:
        weights = {
            (layer, p): runner.model.projection(layer, p).dense_weight().detach()
            for layer in range(mi.num_layers)
            for p in PROJECTIONS
        }
        scores = ScoreHistograms(column_norms(weights, mi.num_layers), mi.num_layers, mi.device)
    observers += [h for h in (up, scores) if h is not None]
    _passes(runner, token_lists, Chain(observers, mi.num_layers, mi.device), batch_tokens, "dense", progress)
    counts = dense.counts.cpu()
    lo, hi = EDGE_EXPONENTS
    meta = {
        "sequences": len(token_lists),
        "dtype": str(mi.dtype).removeprefix("torch."),
        "device": mi.device.type,
        "input_sizes": dense.input_sizes,
        "bins": {"log2_range": [lo, hi], "per_octave": BINS_PER_OCTAVE},
        "methods": ["teal", *[m for m in METHODS if m in methods]],
        **(info or {}),
    }
    tokens = int(counts[0, 0].sum()) // dense.input_sizes[PROJECTIONS[0]]
    cal = SparsityCalibration(counts, dense.edges.cpu(), mi.name, mi.hidden_size, tokens, meta)
    if up is not None:
        chess_scores = ChessScores(up.mean(), mi.device)
        _passes(runner, token_lists, chess_scores, batch_tokens, "chess", progress)
        cal.chess = ChessStats(up.mean().cpu(), chess_scores.counts.cpu())
    sample = spread(token_lists, correction_tokens or 2048)
    n = sum(map(len, sample))
    if scores is not None:
        search = AlphaSearch(weights, scores.colnorm, mi.num_layers, rank_fraction, mi.device)
        runner.collect(sample, linear=search, max_tokens=n)
        cal.rsparse = search.stats(scores.counts, counts)
        chosen = dict(zip(PROJECTIONS, cal.rsparse.alpha.mean(0).tolist(), strict=True))
        meta["r_sparse"] = {
            "rank_fraction": rank_fraction, "alphas": list(ALPHAS), "search_levels": list(SEARCH_LEVELS),
            "search_tokens": n, "alpha_mean_by_projection": chosen,
        }  # fmt: skip
    if correction_tokens is None:
        return cal
    shapes = _shapes(mi)
    q_size = shapes[1]
    alloc = {m: uniform(grid, mi.num_layers, 4) for m in ("teal", *(k for k in METHODS if k in methods))}
    if probe_tokens:
        costs = _probe_costs(runner, cal, token_lists, probe_tokens, q_size, mi.device, progress)
        alloc = _allocations(cal, costs, grid, shapes)
    correct(runner, cal, sample, alloc, grid, q_size, mi.device, progress)
    return cal


def reallocate(
    engine: Any,
    cal: SparsityCalibration,
    token_lists: list[list[int]],
    correction_tokens: int = 2048,
    grid: torch.Tensor = CORRECTION_GRID,
    progress: bool | None = None,
) -> SparsityCalibration:
    """`cal` (made by `calibrate` on `token_lists` with probes) with its allocation and correction made
    again from the probe costs it keeps (`info["allocation"]["probe_kl"]`), its dense histograms and its
    methods' statistics: steps 2 and 3 without the dense passes and the probes (the probes are most of a
    calibration's time), for a change to the allocation or the correction."""
    kept = cal.info.get("allocation", {}).get("probe_kl")
    if kept is None:
        raise ValueError("the calibration keeps no probe costs (made without probes)")
    mi = engine.model_info
    shapes = _shapes(mi)
    q_size = shapes[1]
    costs = {m: torch.tensor(c, dtype=torch.float64) for m, c in kept.items()}
    out = dataclasses.replace(
        cal,
        info=json.loads(json.dumps(cal.info)),
        chess=None if cal.chess is None else dataclasses.replace(cal.chess),
        rsparse=None if cal.rsparse is None else dataclasses.replace(cal.rsparse),
    )
    alloc = _allocations(out, costs, grid, shapes)
    sample = spread(token_lists, correction_tokens)
    correct(engine.runner, out, sample, alloc, grid, q_size, mi.device, progress)
    return out


def correct(
    runner: Any,
    cal: SparsityCalibration,
    sample: list[list[int]],
    alloc: dict[str, torch.Tensor],
    grid: torch.Tensor,
    q_size: int,
    device: torch.device,
    progress: bool | None,
) -> None:
    """Step 3 (module doc) into `cal`: per calibrated method, one forward of `sample` per grid level with
    every site at its allocated level (`alloc`: method -> [G, layers, 4]); each site's threshold, as a
    quantile of its dense histogram, is what that forward measured. Not made monotone in the level: at a
    site whose own level rises less than the sparsity upstream of it shrinks its inputs, the threshold
    that keeps its level falls, and holding it up (a running maximum) drops more than the allocation
    asks (TinyStories-656K at 0.70, on this sample: 0.704)."""
    forwards = runner.collect_forwards
    seq = SequentialThresholds(alloc["teal"], device)
    _levels(runner, sample, seq, grid, "correction (teal)", progress)
    cal.grid, cal.quantiles = grid.clone(), cdf(cal.counts, cal.edges, seq.table)
    cal.allocation = alloc["teal"]
    if cal.chess is not None:
        chess = SequentialChess(alloc["chess"], cal.chess.up_mean, q_size, device)
        _levels(runner, sample, chess, grid, "correction (chess)", progress)
        cal.chess.grid, cal.chess.allocation = grid.clone(), alloc["chess"]
        cal.chess.quantiles = cdf(cal.chess.site_counts(cal.counts), cal.edges, chess.table)
    if cal.rsparse is not None:
        cal.rsparse.grid, cal.rsparse.allocation = grid.clone(), alloc["r_sparse"]
        rs = SequentialRSparse(alloc["r_sparse"], cal.rsparse, device)
        _levels(runner, sample, rs, grid, "correction (r_sparse)", progress)
        cal.rsparse.quantiles = cdf(cal.rsparse.counts, cal.edges, rs.table)
    runs = 1 + (cal.chess is not None) + (cal.rsparse is not None)
    if runner.collect_forwards - forwards > runs * len(grid):  # too few free KV blocks for one forward
        log.warning("the correction's sample took more than one forward per level: exact on the first only")
    n = sum(map(len, sample))
    cal.info["correction"] = {"tokens": n, "grid": [round(float(g), 4) for g in grid]}


def _shapes(mi: ModelInfo) -> tuple[int, int, int, int]:
    """The allocation's site sizes: hidden, q, k/v and intermediate (the model's ModelInfo)."""
    return mi.hidden_size, mi.num_heads * mi.head_dim, mi.num_kv_heads * mi.head_dim, mi.intermediate_size


def uniform(grid: torch.Tensor, num_layers: int, sites: int) -> torch.Tensor:
    """float64 [G, layers, sites]: every site at the level itself (the papers' rule, no allocation)."""
    return grid.to(torch.float64).reshape(-1, 1, 1).expand(-1, num_layers, sites).clone()


def _probe_costs(
    runner: Any,
    cal: SparsityCalibration,
    token_lists: list[list[int]],
    probe_tokens: int,
    q_size: int,
    device: torch.device,
    progress: bool | None,
) -> dict[str, torch.Tensor]:
    """Per calibrated method, the probe costs [layers, 4, len(PROBE_LEVELS)] (probe.py) over the last
    `probe_tokens` tokens of the text. Where a method drops the same entries as TEAL at a site, it takes
    TEAL's probe: CHESS's o and down sites (the same threshold on the same input), and R-Sparse's
    projections whose alpha is 1 (|x| alone, no low-rank part)."""
    layers = cal.num_layers
    prober = Prober(runner, probe_text(token_lists, probe_tokens))
    disable = _disable(progress)
    every = torch.ones(layers, 4, dtype=torch.bool)
    teal = prober.costs(lambda t: SequentialThresholds(t, device), every, "teal", disable)
    costs = {"teal": teal}
    if cal.chess is not None:
        up_mean = cal.chess.up_mean
        own = every.clone()
        own[:, [SITES_CHESS.index("o"), SITES_CHESS.index("down")]] = False
        chess = prober.costs(lambda t: SequentialChess(t, up_mean, q_size, device), own, "chess", disable)
        costs["chess"] = torch.where(own.unsqueeze(-1), chess, teal)
    if cal.rsparse is not None:
        rsparse = cal.rsparse
        own = rsparse.alpha < 1  # where alpha = 1, R-Sparse drops by |x| with no low-rank part: TEAL's probe
        rs = prober.costs(lambda t: SequentialRSparse(t, rsparse, device), own, "r_sparse", disable)
        costs["r_sparse"] = torch.where(own.unsqueeze(-1), rs, teal)
    cal.info["allocation"] = {"probe_tokens": prober.tokens}
    return costs


def _allocations(
    cal: SparsityCalibration,
    costs: dict[str, torch.Tensor],
    grid: torch.Tensor,
    shapes: tuple[int, int, int, int],
) -> dict[str, torch.Tensor]:
    """Per method of `costs` (its probe costs), each site's level at each grid level (allocation.py);
    the costs and a summary go to `cal.info["allocation"]`. `shapes`: hidden, q, k/v and intermediate
    sizes."""
    out = {}
    for m, c in costs.items():
        coupled = (SITES_CHESS.index("ffn"), SITES_CHESS.index("down")) if m == "chess" else None
        out[m] = greedy_allocation(cost_curves(c), site_weights(m, *shapes), grid, coupled)
    at = int(torch.argmin((grid - 0.4).abs()))
    cal.info["allocation"] = {
        "probe_tokens": cal.info.get("allocation", {}).get("probe_tokens"),
        "probe_levels": list(PROBE_LEVELS),
        "probe_kl": {m: c.tolist() for m, c in costs.items()},
        f"mean_level_by_site_at_{float(grid[at]):.2f}": {m: a[at].mean(0).tolist() for m, a in out.items()},
    }  # fmt: skip
    return out


def _passes(
    runner: Any, token_lists: list[list[int]], hook: Any, batch_tokens: int, what: str, progress: bool | None
) -> None:
    """`hook` over every calibration sequence, in forwards of at most `batch_tokens` tokens."""
    with tqdm(total=sum(map(len, token_lists)), desc=what, unit="tok", disable=_disable(progress)) as bar:
        for start, end in chunks(token_lists, batch_tokens):
            runner.collect(token_lists[start:end], linear=hook, max_tokens=batch_tokens)
            bar.update(sum(map(len, token_lists[start:end])))


def _levels(
    runner: Any, sample: list[list[int]], hook: Any, grid: torch.Tensor, what: str, progress: bool | None
) -> None:
    """One forward of the sample per grid level, `hook.level` set to it."""
    n = sum(map(len, sample))
    for g in tqdm(range(len(grid)), desc=what, unit="level", disable=_disable(progress)):
        hook.level = g
        runner.collect(sample, linear=hook, max_tokens=n)
