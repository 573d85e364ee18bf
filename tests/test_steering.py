"""Steering against a transformers reference: a forward hook on model.layers[L] adding scale * d."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from actserve.interventions.base import InterventionError
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from tests.engine_utils import capture_logits, greedy, run

STEPS = 16
TEXTS = ["Once upon a time, there was a", "The dog was happy because", "Sam saw a big tree"]


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=256))


@pytest.fixture(scope="module")
def prompts(tinystories_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    return [tok.encode(t) for t in TEXTS]


def direction(layer_seed: int, hidden: int = 128) -> torch.Tensor:
    return torch.randn(hidden, generator=torch.Generator().manual_seed(layer_seed))


def spec(vectors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"steering": {"vectors": vectors}}


def vec(layers: dict[int, torch.Tensor], scale: float, **kw: Any) -> dict[str, Any]:
    return {"directions": {str(k): v.tolist() for k, v in layers.items()}, "scale": scale, **kw}


Edit = Callable[[torch.Tensor, bool], torch.Tensor]  # (layer output [1, T, H], is_prefill) -> new output


def hf_steered(
    ref: Any, prompt: list[int], edits: dict[int, list[Edit]]
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode of the transformers model with forward hooks on model.layers[L]."""
    handles = []
    for layer, fns in edits.items():

        def hook(_m: Any, _i: Any, out: Any, fns: list[Edit] = fns) -> Any:
            h = out[0] if isinstance(out, tuple) else out
            for fn in fns:
                h = fn(h, h.shape[1] > 1)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handles.append(ref.model.layers[layer].register_forward_hook(hook))
    try:
        out = ref.generate(
            torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return out.sequences[0, len(prompt) :].tolist(), [x[0] for x in out.logits]


def add(d: torch.Tensor, scale: float, phases: tuple[str, ...] = ("prompt", "generation")) -> Edit:
    def fn(h: torch.Tensor, prefill: bool) -> torch.Tensor:
        # with transformers' cache, the prefill forward holds the prompt and each decode forward one token
        return h + scale * d if ("prompt" if prefill else "generation") in phases else h

    return fn


def add_normalized(d: torch.Tensor, scale: float) -> Edit:
    def fn(h: torch.Tensor, _prefill: bool) -> torch.Tensor:
        new = h + scale * d
        return new * (h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True))

    return fn


def ours(
    eng: LLMEngine, prompts: list[list[int]], specs: list[Any], tag: str
) -> tuple[list[list[int]], dict]:
    with capture_logits() as seen:
        outs = run(eng, prompts, greedy(STEPS, min_tokens=STEPS), interventions=specs, tag=tag)
    return outs, seen


def assert_matches(eng: LLMEngine, ref: Any, prompt: list[int], s: Any, edits: dict[int, list[Edit]]) -> None:
    (tokens,), seen = ours(eng, [prompt], [s], tag="m")
    ref_tokens, ref_logits = hf_steered(ref, prompt, edits)
    for step, (a, b) in enumerate(zip(seen["m0"], ref_logits, strict=True)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
    assert tokens == ref_tokens


@pytest.mark.parametrize("layer", [0, 1])
def test_equals_transformers_hook(eng: LLMEngine, ref: Any, prompts: list[list[int]], layer: int) -> None:
    d = direction(layer)
    assert_matches(eng, ref, prompts[0], spec([vec({layer: d}, 3.0)]), {layer: [add(d, 3.0)]})


@pytest.mark.parametrize("phases", [("prompt",), ("generation",)])
def test_phases(eng: LLMEngine, ref: Any, prompts: list[list[int]], phases: tuple[str, ...]) -> None:
    d = direction(7)
    s = spec([vec({1: d}, 6.0, phases=list(phases))])
    assert_matches(eng, ref, prompts[1], s, {1: [add(d, 6.0, phases)]})


def test_several_vectors_and_normalize(eng: LLMEngine, ref: Any, prompts: list[list[int]]) -> None:
    d0, d1, d2 = direction(1), direction(2), direction(3)
    s = spec([vec({0: d0, 1: d1}, 2.0), vec({1: d2}, -3.0, normalize=True)])
    edits = {0: [add(d0, 2.0)], 1: [add(d1, 2.0), add_normalized(d2, -3.0)]}
    assert_matches(eng, ref, prompts[2], s, edits)


def test_scale_zero_changes_nothing(eng: LLMEngine, prompts: list[list[int]]) -> None:
    plain, plain_logits = ours(eng, prompts, [None] * 3, tag="p")
    zero, zero_logits = ours(
        eng, prompts, [spec([vec({0: direction(5), 1: direction(6)}, 0.0)])] * 3, tag="z"
    )
    assert zero == plain
    for i in range(3):
        assert all(
            torch.equal(a, b) for a, b in zip(plain_logits[f"p{i}"], zero_logits[f"z{i}"], strict=True)
        )


def test_mixed_batch_is_invariant(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """A steered row returns the same tokens alone and batched; unsteered neighbours too."""
    s = spec([vec({1: direction(11)}, 30.0)])
    steered_alone, steered_alone_logits = ours(eng, [prompts[0]], [s], tag="a")
    plain_alone = [ours(eng, [p], [None], tag=f"u{i}-")[0][0] for i, p in enumerate(prompts)]
    other = spec([vec({0: direction(12)}, -5.0)])
    mixed, mixed_logits = ours(eng, prompts + [prompts[0]], [s, None, None, other], tag="x")
    assert mixed[0] == steered_alone[0]
    assert mixed[1:3] == plain_alone[1:3]
    for a, b in zip(steered_alone_logits["a0"], mixed_logits["x0"], strict=True):
        assert (a - b).abs().max().item() < 1e-4  # CPU matmuls of other widths may round differently
    assert mixed[0] != plain_alone[0]  # the steering did act
    assert mixed[3] != mixed[0]  # a different vector on the same prompt gives a different output


def test_unsteered_rows_bit_identical_beside_steered(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """Same batch shape with and without a steered neighbour: plain rows' logits are bit-identical."""
    s = spec([vec({0: direction(21), 1: direction(22)}, 4.0, normalize=True)])
    _, plain = ours(eng, prompts, [None, None, None], tag="n")
    _, mixed = ours(eng, prompts, [None, s, None], tag="s")
    for i in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(plain[f"n{i}"], mixed[f"s{i}"], strict=True))
    assert not torch.equal(plain["n1"][0], mixed["s1"][0])


def test_release_returns_slots(eng: LLMEngine, prompts: list[list[int]]) -> None:
    plugin = eng.registry.plugins["steering"]
    free = len(plugin._free)
    ours(eng, prompts, [spec([vec({0: direction(1)}, 1.0), vec({1: direction(2)}, 1.0)])] * 3, tag="r")
    assert len(plugin._free) == free


@pytest.mark.parametrize(
    ("bad", "param"),
    [
        (vec({0: torch.ones(5)}, 1.0), "interventions.steering.vectors[0].directions.0"),
        (vec({2: torch.ones(128)}, 1.0), "interventions.steering.vectors[0].directions.2"),
        (vec({-1: torch.ones(128)}, 1.0), "interventions.steering.vectors[0].directions.-1"),
        (
            {**vec({0: torch.ones(128)}, 1.0), "scale": float("nan")},
            "interventions.steering.vectors[0].scale",
        ),
        ({"name": "happy", "scale": 1.0}, "interventions.steering.vectors[0].name"),
        ({**vec({0: torch.ones(128)}, 1.0), "phases": []}, "interventions.steering.vectors[0].phases"),
        ({**vec({0: torch.ones(128)}, 1.0), "colour": 1}, "interventions.steering.vectors[0].colour"),
    ],
)
def test_invalid_specs_name_the_field(eng: LLMEngine, bad: dict[str, Any], param: str) -> None:
    plugin = eng.registry.plugins["steering"]
    free = len(plugin._free)
    with pytest.raises(InterventionError) as e:
        eng.registry.prepare(spec([bad]))
    assert e.value.param == param
    assert len(plugin._free) == free  # a rejected request holds no slot


def test_vector_order_kept_in_mixed_batches(eng: LLMEngine, ref: Any, prompts: list[list[int]]) -> None:
    """A neighbour that touches a layer only with its second vector must not reorder this row's vectors."""
    a = spec([vec({0: direction(31)}, 2.0), vec({1: direction(32)}, 2.0)])
    d1, d2 = direction(33), direction(34)
    b = spec([vec({1: d1}, 9.0), vec({1: d2}, -9.0, normalize=True)])
    (_, mixed_b), seen = ours(eng, [prompts[0], prompts[1]], [a, b], tag="o")
    ref_tokens, ref_logits = hf_steered(ref, prompts[1], {1: [add(d1, 9.0), add_normalized(d2, -9.0)]})
    for step, (x, y) in enumerate(zip(seen["o1"], ref_logits, strict=True)):
        assert (x - y).abs().max().item() < 1e-4, f"step {step}"
    assert mixed_b == ref_tokens


@pytest.mark.parametrize(
    ("make", "param", "match"),
    [
        (
            lambda: [{"directions": {str(i): [] for i in range(1_000_000)}}],
            "interventions.steering.vectors[0].directions",
            "1000000 layer keys; this model has 2 layers, so at most 2 keys in \\[0, 1\\]",
        ),
        (
            lambda: [{"directions": {"1": [0.0] * 2_000_000}}],
            "interventions.steering.vectors[0].directions.1",
            "length 2000000, expected hidden_size = 128",
        ),
        (
            lambda: [{"name": f"v{i}"} for i in range(1_000_000)],
            "interventions.steering.vectors",
            "1000000 vectors \\(named and inline together\\); at most 8",
        ),
        (
            lambda: [{"name": "x" * 1_000_000}],
            "interventions.steering.vectors[0].name",
            "1000000 characters; a vector name has at most 128",
        ),
        (
            lambda: [{"directions": {"7" * 10_000: [0.0] * 128}}],
            "interventions.steering.vectors[0].directions." + "7" * 24 + "...",
            "layer keys are integers in \\[0, 1\\]",
        ),
        (
            lambda: [{"directions": {"٣": [0.0] * 128}}],
            "interventions.steering.vectors[0].directions.٣",
            "layer keys are integers",
        ),
    ],
)
def test_oversized_specs_are_refused_before_per_element_work(
    eng: LLMEngine, make: Any, param: str, match: str
) -> None:
    """A spec is refused by its counts and lengths first, at a cost bounded by the allowed spec: the
    1e6-key spec took 5.9 s through the schema. (Generous bound: 1 s; the checks take microseconds.)"""
    vectors = make()
    start = time.perf_counter()
    with pytest.raises(InterventionError, match=match) as e:
        eng.registry.prepare(spec(vectors))
    assert time.perf_counter() - start < 1.0
    assert e.value.param == param and len(str(e.value)) < 400


def test_slots_in_use_gauge_follows_prepare_and_release(eng: LLMEngine) -> None:
    """actserve_intervention_gauge{intervention="steering"}: slots held by prepared plans, back once released;
    the engine exports the plugin's levels under that name."""
    plugin = eng.registry.plugins["steering"]
    before = plugin.gauges()
    assert before["slots"] == plugin.table.shape[0]
    plans = eng.registry.prepare(spec([vec({0: direction(3)}, 1.0), vec({1: direction(4)}, 1.0)]))
    assert plugin.gauges()["slots_in_use"] == before["slots_in_use"] + 2
    eng.registry.release(plans)
    assert plugin.gauges() == before
    eng.metrics.set_plugin_gauges(eng.registry.gauges())
    got = eng.metrics.registry.get_sample_value(
        "actserve_intervention_gauge",
        {"model_name": eng.model_name, "intervention": "steering", "gauge": "slots"},
    )
    assert got == before["slots"]
