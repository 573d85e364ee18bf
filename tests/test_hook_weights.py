"""The linear-weights hook point (docs/architecture.md §6) through the third-party-style test plugin
`test_perturbed_weights` (tests/plugins/actserve_test_plugins): a request's rows use a perturbed copy W'
of one projection's weight, installed at start as the plugin's own weight format. Checked against
transformers with that layer's weights swapped for the same W'."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from actserve_test_plugins.perturbed_weights import DEFAULT_SCALE, KEY, PerturbedFormat, perturbed_weight
from transformers import AutoModelForCausalLM, AutoTokenizer

from actserve.interventions import registry as registry_module
from actserve.interventions.base import InterventionError
from actserve.server.contract.weights import FormatRequest
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.models.formats import install_formats
from tests.conftest import start_server
from tests.engine_utils import HF_MODULES, greedy, hf_generate, hf_swapped, run_logged

STEPS = 8
TEXTS = ["Once upon a time, there was a", "The dog was happy because", "Sam saw a big tree", "Lily"]
PLUGIN = "test_perturbed_weights"
PROJS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=256))


@pytest.fixture(scope="module")
def ref(tinystories_dir: Path) -> Any:
    """This module's own transformers model (not the session's `ref`): its tests swap weights in it."""
    return AutoModelForCausalLM.from_pretrained(tinystories_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tinystories_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    return [tok.encode(t) for t in TEXTS]


def ours(
    eng: LLMEngine, prompts: list[list[int]], specs: list[Any], tag: str
) -> tuple[list[list[int]], dict]:
    """STEPS greedy tokens each (min_tokens as transformers' min_new_tokens) and the logits seen."""
    return run_logged(eng, prompts, greedy(STEPS, min_tokens=STEPS), specs, tag)


def spec(layer: int, proj: str) -> dict[str, Any]:
    return {PLUGIN: {"layer": layer, "projection": proj}}


def swapped(ref: Any, layer: int, proj: str) -> AbstractContextManager[None]:
    """transformers with (layer, proj)'s weights replaced by W'."""
    return hf_swapped(ref, [(layer, proj)], lambda w, i, p: perturbed_weight(w, i, p, DEFAULT_SCALE))


def test_formats_installed_at_the_default_sites(eng: LLMEngine) -> None:
    """Every projection of layers 0 and 1 holds the perturbed copy, on the model's device and dtype, equal
    to what `perturbed_weight` makes from the primary weight; the hook lists them for CUDA graphs."""
    model = eng.loaded.model
    for layer in (0, 1):
        for proj in PROJS:
            lin = model.projection(layer, proj)
            assert set(lin.formats) == {"", KEY}
            w = getattr(lin, f"{KEY}_weight")
            assert w.dtype == lin.weight.dtype and w.device == lin.weight.device
            assert torch.equal(w, perturbed_weight(lin.weight, layer, proj, DEFAULT_SCALE))
    plugin = eng.registry.plugin(PLUGIN)
    assert plugin is not None and plugin.graph_safe
    hooks = plugin.graph_hooks().weights
    assert hooks is not None and set(hooks.sites()) == {(i, p) for i in (0, 1) for p in PROJS}


@pytest.mark.parametrize("proj", PROJS)
@pytest.mark.parametrize("layer", [0, 1])
def test_perturbed_row_equals_transformers_with_swapped_weights(
    eng: LLMEngine, ref: Any, prompts: list[list[int]], layer: int, proj: str
) -> None:
    (tokens,), seen = ours(eng, [prompts[0]], [spec(layer, proj)], tag="w")
    with swapped(ref, layer, proj):
        ref_tokens, ref_logits = hf_generate(ref, prompts[0], STEPS)
    _, plain_logits = hf_generate(ref, prompts[0], STEPS)
    assert (ref_logits[0] - plain_logits[0]).abs().max().item() > 1e-2  # the perturbation acts
    for step, (a, b) in enumerate(zip(seen["w0"], ref_logits, strict=True)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
    assert tokens == ref_tokens


@pytest.mark.parametrize("proj", ["down_proj", "o_proj"])
def test_with_a_linear_input_hook_at_the_same_site(
    eng: LLMEngine, ref: Any, prompts: list[list[int]], proj: str
) -> None:
    """Input hook first, then the perturbed matmul: == transformers with W' and the channels zeroed."""
    channels = [0, 3, 17, 40]
    both = {**spec(1, proj), "test_zero_channels": {"layer": 1, "projection": proj, "channels": channels}}
    (tokens,), seen = ours(eng, [prompts[3]], [both], tag="zw")

    def pre(_m: Any, args: tuple) -> tuple:
        x = args[0].clone()
        x[..., channels] = 0
        return (x, *args[1:])

    block, (name,) = HF_MODULES[proj]
    handle = getattr(getattr(ref.model.layers[1], block), name).register_forward_pre_hook(pre)
    try:
        with swapped(ref, 1, proj):
            ref_tokens, ref_logits = hf_generate(ref, prompts[3], STEPS)
    finally:
        handle.remove()
    for step, (a, b) in enumerate(zip(seen["zw0"], ref_logits, strict=True)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
    assert tokens == ref_tokens


MIXED = [spec(0, "qkv_proj"), None, spec(1, "down_proj"), spec(0, "gate_up_proj")]


def test_mixed_batch_equals_each_request_solo(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """Rows at different sites and a plain row together == each alone (tokens exact; logits within 1e-4,
    as CPU matmuls of other widths may round differently)."""
    batched, seen = ours(eng, prompts, MIXED, tag="m")
    for i, (p, s) in enumerate(zip(prompts, MIXED, strict=True)):
        (solo,), solo_seen = ours(eng, [p], [s], tag=f"s{i}_")
        assert batched[i] == solo, i
        for a, b in zip(seen[f"m{i}"], solo_seen[f"s{i}_0"], strict=True):
            assert (a - b).abs().max().item() < 1e-4, i


def test_plain_rows_bit_identical_to_an_engine_without_the_plugin(
    eng: LLMEngine, tinystories_dir: Path, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    found = registry_module.discover()
    monkeypatch.setattr(registry_module, "discover", lambda: {k: v for k, v in found.items() if k != PLUGIN})
    bare = LLMEngine(EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=256))
    assert PLUGIN not in bare.registry.plugins
    assert set(bare.loaded.model.projection(0, "o_proj").formats) == {""}
    without, without_seen = ours(bare, prompts, [None] * 4, tag="b")
    mixed, mixed_seen = ours(eng, prompts, MIXED, tag="x")
    assert mixed[1] == without[1]
    for a, b in zip(mixed_seen["x1"], without_seen["b1"], strict=True):
        assert torch.equal(a, b)
    for i in (0, 2, 3):  # the perturbed rows did change
        assert (mixed_seen[f"x{i}"][0] - without_seen[f"b{i}"][0]).abs().max().item() > 1e-3, i


def _request(layer: int, proj: str) -> FormatRequest:
    return FormatRequest("extra", frozenset({(layer, proj)}), partial(PerturbedFormat, 0, "o_proj", 0.1))


@pytest.mark.parametrize(
    ("req", "words"),
    [
        (_request(2, "o_proj"), ["plugin 'p'", "layer 2", "out of range"]),
        (_request(0, "up_proj"), ["plugin 'p'", "unknown projection 'up_proj'"]),
        (FormatRequest(KEY, frozenset({(0, "o_proj")}), partial(PerturbedFormat, 0, "o_proj", 0.1)),
         ["plugin 'p'", f"'{KEY}' already on this layer"]),
        (FormatRequest("a.b", frozenset({(0, "o_proj")}), PerturbedFormat), ["not an identifier"]),
    ],
)  # fmt: skip
def test_install_errors_name_the_plugin_and_the_site(
    eng: LLMEngine, req: FormatRequest, words: list[str]
) -> None:
    with pytest.raises(ValueError) as e:
        install_formats(eng.loaded.model, {"p": [req]}, torch.float32)
    for w in words:
        assert w in str(e.value)


def test_engine_refuses_to_start_with_a_bad_site(tinystories_dir: Path) -> None:
    config = EngineConfig(
        model=str(tinystories_dir), device="cpu", num_kv_blocks=64, plugin_options={PLUGIN: {"layers": [5]}}
    )
    with pytest.raises(ValueError, match=f"plugin '{PLUGIN}'.*layer 5.*out of range"):
        LLMEngine(config)


def test_prepare_refusals(tinystories_dir: Path, eng: LLMEngine) -> None:
    with pytest.raises(InterventionError) as e:
        eng.registry.prepare(spec(2, "o_proj"))
    assert e.value.param == f"interventions.{PLUGIN}.layer"
    few = LLMEngine(
        EngineConfig(
            model=str(tinystories_dir), device="cpu", num_kv_blocks=64,
            plugin_options={PLUGIN: {"layers": [1], "projections": ["down_proj"]}},
        )
    )  # fmt: skip
    assert set(few.loaded.model.projection(0, "down_proj").formats) == {""}
    assert set(few.loaded.model.projection(1, "down_proj").formats) == {"", KEY}
    few.registry.prepare(spec(1, "down_proj"))
    with pytest.raises(InterventionError, match="no perturbed copy") as e:
        few.registry.prepare(spec(0, "down_proj"))
    assert e.value.param == f"interventions.{PLUGIN}.layer"


def test_transformers_fallback_skips_install_and_refuses(
    tinystories_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        fallback = LLMEngine(
            EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=64, force_transformers=True)
        )
    assert any(PLUGIN in r.getMessage() and "not installed" in r.getMessage() for r in caplog.records)
    with pytest.raises(InterventionError, match="native") as e:
        fallback.registry.prepare(spec(0, "o_proj"))
    assert e.value.param == f"interventions.{PLUGIN}"


def test_over_http(tinystories_dir: Path, eng: LLMEngine, prompts: list[list[int]]) -> None:
    """Listed, served (same tokens as the engine), a bad layer is a 400 naming the field."""
    server = start_server(tinystories_dir, num_kv_blocks=256)
    try:
        listed = {d["name"]: d for d in httpx.get(f"{server.url}/v1/interventions").json()["data"]}
        assert listed[PLUGIN]["hook_points"] == ["linear_weights"]
        body = {"model": "tinystories-656k", "prompt": TEXTS[1], "max_tokens": STEPS, "temperature": 0,
                "interventions": spec(1, "gate_up_proj")}  # fmt: skip
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        (tokens,), _ = ours(eng, [prompts[1]], [spec(1, "gate_up_proj")], tag="h")
        tok = AutoTokenizer.from_pretrained(tinystories_dir)
        assert r.json()["choices"][0]["text"] == tok.decode(tokens)
        r = httpx.post(f"{server.url}/v1/completions", json={**body, "interventions": spec(9, "o_proj")})
        assert r.status_code == 400 and f"interventions.{PLUGIN}.layer" in r.text
    finally:
        server.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("layer", "proj"), [(1, "down_proj"), (0, "qkv_proj")])
def test_cuda_perturbed_rows_beside_plain_rows(
    tinystories_dir: Path, prompts: list[list[int]], layer: int, proj: str
) -> None:
    """bf16 on CUDA (eager): plain rows beside a perturbed row keep the bits of the same batch without
    it; the perturbed row is close to a float32 CPU run of the same request (relative norm < 3 %)."""
    cuda = LLMEngine(
        EngineConfig(model=str(tinystories_dir), dtype="bfloat16", enforce_eager=True, num_kv_blocks=256)
    )
    s = spec(layer, proj)
    plain, plain_seen = ours(cuda, prompts, [None] * 4, tag="cp")
    mixed, mixed_seen = ours(cuda, prompts, [None, s, None, None], tag="cm")
    for i in (0, 2, 3):
        assert mixed[i] == plain[i]
        for a, b in zip(mixed_seen[f"cm{i}"], plain_seen[f"cp{i}"], strict=True):
            assert torch.equal(a, b), i
    assert (mixed_seen["cm1"][0] - plain_seen["cp1"][0]).abs().max().item() > 1e-2
    cpu = LLMEngine(EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=256))
    _, cpu_seen = ours(cpu, [prompts[1]], [s], tag="cc")
    got, want = mixed_seen["cm1"][0].float().cpu(), cpu_seen["cc0"][0]
    assert ((got - want).norm() / want.norm()).item() < 0.03
