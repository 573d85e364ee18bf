"""bench/moe_bounds.py: the offloaded run's bound from the cache's counters, and no bound (None, with a
note) where the counters lost their statistics (issue 15's H200 run: every counter 0, which made the
bound the all-resident speed) or contradict themselves."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import pytest


def load() -> Any:
    path = Path(__file__).resolve().parents[1] / "bench" / "moe_bounds.py"
    spec = importlib.util.spec_from_file_location("moe_bounds", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(tok_s: float, lookups: float, hit_rate: float, expert_bytes: float) -> dict[str, float]:
    """bench decode()'s per-token figures for a run whose counters saw `lookups` per token."""
    misses = lookups * (1 - hit_rate)
    return {
        "tok_s": tok_s, "lookups_per_token": lookups, "misses_per_token": misses, "hit_rate": hit_rate,
        "pcie_bytes_per_token": misses * expert_bytes, "cpu_experts_per_token": 0.0,
    }  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_bound_from_trusted_counters(seed: int) -> None:
    """Counted lookups as the tokens made them: copy bound = bandwidth / PCIe bytes, bound = the smaller
    of it and the all-resident speed; fractions are tok/s over each."""
    rng = random.Random(seed)
    mb = load()
    expected = rng.choice([2, 8]) * rng.randint(3, 48)
    h2d, resident = rng.uniform(20e9, 60e9), rng.uniform(100, 1500)
    hit_rate, expert_bytes = rng.uniform(0.05, 0.95), rng.uniform(1e6, 4e8)
    r = run(rng.uniform(10, 1000), expected, hit_rate, expert_bytes)
    got = mb.offload_bound(r, h2d, resident, expected)
    copy = h2d / (expected * (1 - hit_rate) * expert_bytes)  # the bytes the missed experts weigh
    assert got["copy_bound_tok_s"] == pytest.approx(copy)
    assert got["bound_tok_s"] == pytest.approx(copy if copy < resident else resident)
    assert got["bound_frac"] == pytest.approx(r["tok_s"] / got["bound_tok_s"])
    assert got["copy_bound_frac"] == pytest.approx(r["tok_s"] / copy)
    assert got["bound_note"] is None
    # every lookup a hit: no PCIe bytes, and then (only then) the all-resident speed is the bound
    hit = mb.offload_bound(run(r["tok_s"], expected, 1.0, 1e6), h2d, resident, expected)
    assert hit["bound_tok_s"] == resident and hit["copy_bound_tok_s"] is None and hit["bound_note"]
    # or every miss computed on the CPU (no copy, no zero-copy read)
    cpu = {**run(r["tok_s"], expected, hit_rate, expert_bytes), "pcie_bytes_per_token": 0.0}
    cpu["cpu_experts_per_token"] = cpu["misses_per_token"]
    got = mb.offload_bound(cpu, h2d, resident, expected)
    assert got["bound_tok_s"] == resident and got["bound_frac"] == pytest.approx(r["tok_s"] / resident)


@pytest.mark.parametrize("seed", range(5))
def test_no_bound_when_counters_lost_or_inconsistent(seed: int) -> None:
    """Counters that saw no lookups (the H200 rows: all 0), too few, misses without PCIe bytes, or none
    at all: bound_frac None and a note naming the cause, never the all-resident speed as the bound."""
    rng = random.Random(100 + seed)
    mb = load()
    expected = rng.choice([2, 8]) * rng.randint(3, 48)
    h2d, resident, tok_s = rng.uniform(20e9, 60e9), rng.uniform(100, 1500), rng.uniform(10, 1000)
    zero = {"tok_s": tok_s, "lookups_per_token": 0.0, "misses_per_token": 0.0, "hit_rate": 0.0,
            "pcie_bytes_per_token": 0.0}  # fmt: skip
    few = run(tok_s, expected * rng.uniform(0.05, 0.8), 0.5, 1e7)
    no_bytes = {**run(tok_s, expected, 0.5, 1e7), "pcie_bytes_per_token": 0.0}
    no_bytes["cpu_experts_per_token"] = no_bytes["misses_per_token"] / 2  # half of them copied, unseen
    cases = [(zero, "lookups"), (few, "lookups"), (no_bytes, "no PCIe bytes")]
    cases.append(({"tok_s": tok_s}, "no expert"))
    for r, why in cases:
        got = mb.offload_bound(r, h2d, resident, expected)
        assert got["bound_frac"] is None and got["bound_tok_s"] is None, r
        assert got["copy_bound_frac"] is None
        assert why in got["bound_note"], got["bound_note"]
