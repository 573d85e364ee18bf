"""The sparsity plugin's per-site allocation (interventions/sparsity/allocation.py, probe.py): cost curves
against a float64 plain-Python interpolation; the greedy against a brute-force search over every
allocation of a small model (float64, random convex costs); CHESS's coupled sites; the probes' KL and
thresholds against transformers with the same single site thresholded (TinyStories-656K, float32), and
the probes one method takes from another's."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from actserve.interventions.sparsity.allocation import (
    MAX_SITE_LEVEL,
    PROBE_LEVELS,
    STEP,
    allocated_levels,
    cost_curves,
    greedy_allocation,
    site_weights,
)
from actserve.interventions.sparsity.artifact import load_calibration
from actserve.interventions.sparsity.calibrate import CORRECTION_GRID, SequentialThresholds
from actserve.interventions.sparsity.calibrate_methods import SequentialChess, SequentialRSparse
from actserve.interventions.sparsity.probe import Prober, probe_text
from actserve.server.contract import PROJECTIONS
from tests.engine_utils import HFTeal
from tests.sparsity_utils import CALIB, engine

K = round(MAX_SITE_LEVEL / STEP)


def random_convex(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """float64 [*shape, K + 1]: 0 at level 0, increasing, with increasing increments."""
    steps = torch.rand(*shape, K, generator=gen, dtype=torch.float64).sort(-1).values + 1e-3
    return torch.cat([torch.zeros(*shape, 1, dtype=torch.float64), steps.cumsum(-1)], -1)


def test_cost_curves_interpolate_in_log_log() -> None:
    """Between two probe levels the power law through their costs; below the first and above the last,
    the power law of the nearest two (exponent at least 1); 0 at level 0; then each increment raised to
    the largest before it (non-decreasing increments, so the greedy sees convex costs)."""
    gen = torch.Generator().manual_seed(1)
    costs = (torch.rand(3, len(PROBE_LEVELS), generator=gen, dtype=torch.float64) * 3).cumsum(-1) * 1e-3
    curves = cost_curves(costs)
    p = PROBE_LEVELS

    def law(c: list[float], x: float, i: int, j: int, anchor: int) -> float:
        k = math.log(c[j] / c[i]) / math.log(p[j] / p[i])
        k = max(k, 1.0) if not p[0] <= x <= p[-1] else k
        return c[anchor] * (x / p[anchor]) ** k

    for r in range(3):
        c = costs[r].tolist()
        raw = [0.0]
        for k in range(1, K + 1):
            x = k * STEP
            i = max(1, min(len(p) - 1, sum(v < x - 1e-12 for v in p)))
            raw.append(law(c, x, i - 1, i, i if x > p[-1] else i - 1))
        expect, top = [0.0], 0.0
        for a, b in itertools.pairwise(raw):
            top = max(top, b - a, 0.0)
            expect.append(expect[-1] + top)
        assert torch.allclose(curves[r], torch.tensor(expect, dtype=torch.float64), rtol=1e-9, atol=0), r
    convex = torch.tensor([[1e-4, 1e-3, 4e-3, 1.5e-2]], dtype=torch.float64)  # a power law: kept as measured
    at = [round(v / STEP) for v in p]
    assert torch.allclose(cost_curves(convex)[0, at], convex[0], rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_brute_force_on_convex_costs(seed: int) -> None:
    """Two layers of two sites of equal weight: every grid level is a whole number of steps, and the
    greedy's allocation costs what the cheapest of all allocations with that share costs (float64); its
    share is the level and no site's level falls as the level rises."""
    gen = torch.Generator().manual_seed(seed)
    curves = random_convex(gen, 2, 2)
    w = torch.ones(2, dtype=torch.float64)
    alloc = greedy_allocation(curves, w, CORRECTION_GRID)
    idx = torch.tensor(list(itertools.product(range(K + 1), repeat=4)))  # every allocation, in steps
    flat = curves.reshape(4, K + 1)
    cost_all = sum(flat[i, idx[:, i]] for i in range(4))
    for g, level in enumerate(CORRECTION_GRID.tolist()):
        steps = round(level * 4 / STEP)
        best = float(cost_all[idx.sum(1) == steps].min())
        got = alloc[g].reshape(-1) / STEP
        assert torch.allclose(got, got.round(), atol=1e-9)
        cost = float(sum(flat[i, int(round(float(got[i])))] for i in range(4)))
        assert math.isclose(cost, best, rel_tol=1e-12, abs_tol=1e-15), (level, cost, best)
        assert math.isclose(float(alloc[g].mean()), level, rel_tol=1e-12)
    assert (alloc.diff(dim=0) >= -1e-12).all()


def test_greedy_shares_are_exact_with_unequal_weights_and_chess_coupling() -> None:
    """With the models' own weights, the multiply-add share of the allocation equals each grid level (a
    step crossing a level is taken in part); CHESS's down site never below its FFN-channel site; levels
    between grid levels interpolate linearly."""
    gen = torch.Generator().manual_seed(3)
    for method, coupled in (("teal", None), ("chess", (2, 3))):
        w = site_weights(method, 576, 576, 192, 1536)
        alloc = greedy_allocation(random_convex(gen, 5, 4), w, CORRECTION_GRID, coupled)
        share = (alloc * w).sum((1, 2)) / (5 * w.sum())
        assert torch.allclose(share, CORRECTION_GRID, rtol=0, atol=1e-12), method
        assert (alloc.diff(dim=0) >= -1e-12).all() and (alloc <= MAX_SITE_LEVEL + 1e-12).all()
        if coupled:
            assert (alloc[..., 3] >= alloc[..., 2] - 1e-12).all()
            assert (alloc[..., 3] > alloc[..., 2] + 1e-9).any()  # the down threshold is used somewhere
        mid = allocated_levels(torch.tensor([0.0, 0.125, 0.9], dtype=torch.float64), CORRECTION_GRID, alloc)
        assert mid[0].eq(0).all() and torch.allclose(mid[2], alloc[-1], atol=1e-12)
        assert torch.allclose(mid[1], (alloc[1] + alloc[2]) / 2, atol=1e-12)


def test_probe_text_is_the_last_tokens() -> None:
    seqs = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert probe_text(seqs, 5) == [[4, 5, 6], [8, 9]]
    assert probe_text(seqs, 100) == seqs


@pytest.fixture(scope="module")
def tiny(tinystories_dir: Path) -> Any:
    return engine(tinystories_dir, None, num_kv_blocks=64)


@pytest.mark.parametrize(("layer", "proj", "level"), [(0, "qkv_proj", 0.4), (1, "down_proj", 0.6)])
def test_probe_equals_transformers_with_that_site_thresholded(
    tiny: Any, ref: Any, layer: int, proj: str, level: float
) -> None:
    """A TEAL probe: only that site thresholded, at the `level`-quantile of its own inputs (within a
    histogram bin); its KL to dense equals transformers' with the same threshold at that site (KL in
    float64 from transformers' float32 logits)."""
    seq = list(range(3, 99))
    prober = Prober(tiny.runner, [seq])
    target = torch.zeros(1, 2, 4, dtype=torch.float64)
    target[0, layer, PROJECTIONS.index(proj)] = level
    hook = SequentialThresholds(target, tiny.model_info.device)
    kl = prober.kl(hook)
    thr = hook.table[0].float()
    assert int((thr > 0).sum()) == 1
    ids = torch.tensor([seq])
    with torch.inference_mode():
        dense = ref(input_ids=ids).logits[0].double().log_softmax(-1)
        with HFTeal(ref, thr) as h:
            sparse = ref(input_ids=ids).logits[0].double().log_softmax(-1)
    expect = float((dense.exp() * (dense - sparse)).sum(-1).mean())
    assert expect > 1e-4 and math.isclose(kl, expect, rel_tol=2e-3), (kl, expect)
    z, n = h.counts[(layer, proj)]
    assert abs(z / n - level) < 0.02  # the quantile of a histogram of 64 bins per octave


def test_shared_probes_drop_what_teal_drops(tiny: Any, sparsity_calibration: Path) -> None:
    """The probes the calibration takes from TEAL's: CHESS at its o site, R-Sparse at a projection whose
    alpha is 1, give TEAL's KL there, bit for bit; elsewhere they differ (CHESS's q site keeps k and v)."""
    cal = load_calibration(sparsity_calibration)
    assert cal.chess is not None and cal.rsparse is not None
    dev = tiny.model_info.device
    prober = Prober(tiny.runner, [list(range(5, 70))])
    q_size = tiny.model_info.num_heads * tiny.model_info.head_dim

    def probe(make: Any, layer: int, site: int) -> float:
        target = torch.zeros(1, 2, 4, dtype=torch.float64)
        target[0, layer, site] = 0.6
        return prober.kl(make(target))

    def teal(t: torch.Tensor) -> Any:
        return SequentialThresholds(t, dev)

    def chess(t: torch.Tensor) -> Any:
        return SequentialChess(t, cal.chess.up_mean, q_size, dev)  # type: ignore[union-attr]

    def rsparse(t: torch.Tensor) -> Any:
        return SequentialRSparse(t, cal.rsparse, dev)  # type: ignore[arg-type]

    assert probe(chess, 1, 1) == probe(teal, 1, 1)
    layer, p = (int(v) for v in (cal.rsparse.alpha == 1).nonzero()[0])
    assert probe(rsparse, layer, p) == probe(teal, layer, p)
    assert probe(chess, 0, 0) != probe(teal, 0, 0)


def test_cli_probe_tokens(tinystories_dir: Path, ref: Any, tmp_path: Path, capsys: Any) -> None:
    """`actserve sparsity calibrate --probe-tokens N`: the probes read the text's last N tokens and each
    grid level's allocation saves that share of the multiply-adds (weights from transformers' config),
    not every site at the level; `--probe-tokens 0` puts every site at the level (no probes); a bad value,
    or probes without the correction, is refused naming the flag."""
    from actserve.server.cli import main

    text = tmp_path / "calib.jsonl"
    text.write_text("".join(CALIB.read_text().splitlines(keepends=True)[:6]))
    argv = ["sparsity", "calibrate", "--model", str(tinystories_dir), "--device", "cpu", "--text", str(text)]
    argv += ["--methods", "none", "--correction-tokens", "256"]
    n = int(torch.randint(40, 90, (1,)))
    grid = torch.arange(1, 19, dtype=torch.float64) * 0.05
    c = ref.config
    h, q, kv, inter = (
        c.hidden_size,
        c.hidden_size,
        c.num_key_value_heads * c.hidden_size // c.num_attention_heads,
        c.intermediate_size,
    )
    w = torch.tensor([h * (q + 2 * kv), q * h, 2 * inter * h, inter * h], dtype=torch.float64)
    for tokens in (n, 0):
        out = tmp_path / f"p{tokens}.safetensors"
        assert main([*argv, "--probe-tokens", str(tokens), "--out", str(out)]) == 0
        cal = load_calibration(out)
        assert cal.allocation is not None and cal.grid is not None
        assert torch.allclose(cal.grid, grid)
        share = (cal.allocation * w).sum((1, 2)) / (c.num_hidden_layers * w.sum())
        assert torch.allclose(share, grid, atol=1e-9)
        uniform = torch.allclose(cal.allocation, grid.reshape(-1, 1, 1).expand_as(cal.allocation))
        if tokens:
            assert cal.info["allocation"]["probe_tokens"] == n and not uniform
        else:
            assert "allocation" not in cal.info and uniform
    capsys.readouterr()
    for bad, said in (("1", "--probe-tokens 0 or at least 2"), ("-3", "--probe-tokens 0 or at least 2")):
        assert main([*argv, "--probe-tokens", bad]) == 2
        assert said in capsys.readouterr().err
    assert main([*argv[:-1], "0", "--probe-tokens", "64"]) == 2
    assert "--probe-tokens needs the correction" in capsys.readouterr().err
