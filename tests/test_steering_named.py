"""Named vectors and token windows in the engine, against transformers forward hooks (as test_steering)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from actserve.interventions.base import InterventionError, RowSpan
from actserve.interventions.steering.plugin import PreparedVector, row_ranges
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from tests.test_steering import TEXTS, Edit, assert_matches, direction, ours, spec, vec


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=256))


@pytest.fixture(scope="module")
def prompts(tinystories_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    return [tok.encode(t) for t in TEXTS]


def windowed(d: torch.Tensor, scale: float, phases: tuple[str, ...], start: int, end: int | None) -> Edit:
    """Reference: prompt positions p, or the k-th decode forward (generated token k), in [start, end)."""
    step = {"k": 0}
    stop = end if end is not None else 10**9

    def fn(h: torch.Tensor, prefill: bool) -> torch.Tensor:
        h = h.clone()
        if prefill:
            if "prompt" in phases:
                h[:, start:stop] += scale * d
        else:
            if "generation" in phases and start <= step["k"] < stop:
                h = h + scale * d
            step["k"] += 1
        return h

    return fn


@pytest.mark.parametrize(
    ("phases", "window"),
    [
        (("generation",), (2, 6)),
        (("prompt",), (1, 3)),
        (("prompt", "generation"), (0, 2)),
        (("generation",), (3, None)),
    ],
)
def test_window_equals_transformers_hook(
    eng: LLMEngine, ref: Any, prompts: list[list[int]], phases: tuple[str, ...], window: tuple
) -> None:
    d = direction(41)  # layer 0: its output at every position feeds layer 1's KV, so each row counts
    s = spec([vec({0: d}, 8.0, phases=list(phases), window=list(window))])
    assert_matches(eng, ref, prompts[0], s, {0: [windowed(d, 8.0, phases, *window)]})


def test_window_changes_only_what_it_covers(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """Generation window [5, 7): the first 6 tokens (sampled before token 5 is steered) are untouched."""
    plain, plain_logits = ours(eng, [prompts[1]], [None], tag="wp")
    s = spec([vec({1: direction(42)}, 30.0, phases=["generation"], window=[5, 7])])
    steered, steered_logits = ours(eng, [prompts[1]], [s], tag="ws")
    assert steered[0][:6] == plain[0][:6] and steered[0] != plain[0]
    for a, b in zip(plain_logits["wp0"][:6], steered_logits["ws0"][:6], strict=True):
        assert torch.equal(a, b)


def test_row_ranges_in_packed_steps() -> None:
    """Prefill, a recompute after preemption (prompt and generated rows in one span) and a decode step."""

    def pv(prompt: bool, generation: bool, window: tuple[int, int | None] | None) -> PreparedVector:
        return PreparedVector(torch.zeros(1), [0], 1.0, prompt, generation, False, window)

    prefill = RowSpan(None, 10, 5, 0, 5)  # rows 10..14 hold prompt positions 0..4
    recompute = RowSpan(None, 0, 8, 0, 5)  # 5 prompt positions, then generated tokens 0..2
    decode = RowSpan(None, 3, 1, 9, 5)  # one row: generated token 4
    both = pv(True, True, (1, 3))
    assert row_ranges(prefill, both) == [(11, 13)]
    assert row_ranges(recompute, both) == [(1, 3), (6, 8)]
    assert row_ranges(decode, both) == []
    assert row_ranges(decode, pv(False, True, (4, 5))) == [(3, 4)]
    assert row_ranges(recompute, pv(False, True, None)) == [(5, 8)]
    assert row_ranges(recompute, pv(True, False, None)) == [(0, 5)]
    assert row_ranges(recompute, pv(True, True, (2, None))) == [(2, 5), (7, 8)]


def test_named_equals_inline(eng: LLMEngine, prompts: list[list[int]]) -> None:
    d0, d1 = direction(51), direction(52)
    lib = eng.registry.plugins["steering"].library
    lib.add(lib.build("calm", {0: d0, 1: d1}), replace=True)
    opts = {"phases": ["generation"], "normalize": True, "window": [1, 9]}
    named = spec([{"name": "calm", "scale": 5.0, **opts}])
    inline = spec([vec({0: d0, 1: d1}, 5.0, **opts)])
    a, a_logits = ours(eng, prompts, [named, None, named], tag="n")
    b, b_logits = ours(eng, prompts, [inline, None, inline], tag="i")
    assert a == b
    for i in range(3):
        assert all(torch.equal(x, y) for x, y in zip(a_logits[f"n{i}"], b_logits[f"i{i}"], strict=True))


def test_plan_keeps_its_copy_after_delete(eng: LLMEngine) -> None:
    lib = eng.registry.plugins["steering"].library
    d = direction(61)
    lib.add(lib.build("brief", {1: d}), replace=True)
    plans = eng.registry.prepare(spec([{"name": "brief", "scale": 2.0}]))
    lib.delete("brief")
    lib.add(lib.build("brief", {0: direction(62)}))  # same name, other data
    try:
        prepared = plans["steering"].vectors[0]
        assert prepared.layers == [1] and torch.equal(prepared.data[1], d)
    finally:
        eng.registry.release(plans)
        lib.delete("brief")
    with pytest.raises(InterventionError) as e:
        eng.registry.prepare(spec([{"name": "brief", "scale": 2.0}]))
    assert e.value.param == "interventions.steering.vectors[0].name"
