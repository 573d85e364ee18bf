"""Per-request FP4 weights, the `precision` plugin (interventions/precision/), on TinyStories-656K in
float32 on the CPU: an FP4 row equals transformers whose projections hold dequantize(quantize(W))
(kernels/fp4_ref.py); mixed batches equal solo runs; bf16 rows keep the bits of a server without
--precisions; the prefix cache keeps FP4 and bf16 prompts apart; bad specs are 400s naming the field;
the copies' bytes are in weights_bytes before the KV cache is sized and in the metrics, and FP4 requests
are counted by kind. Prompts are drawn afresh each run (the seed is in the failure messages)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from actserve.interventions.base import InterventionError
from actserve.interventions.precision.plugin import FP4_KINDS, PrecisionPlugin
from actserve.kernels.fp4_ref import GROUP, dequantize, quantize_rtn
from actserve.server.cli import build_parser, plugin_options
from actserve.server.engine import model_setup
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.models.builder import LoadConfig, LoadedModel
from actserve.server.models.formats import weight_bytes
from tests.conftest import assert_refused, start_server
from tests.engine_utils import greedy, hf_generate, hf_swapped, run_logged, text_after

STEPS = 6
BS = 4  # KV block size of the prefix-cache engines
PLUGIN = "precision"
PROJS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
SEED = random.randrange(2**31)


def engine(model: Path, precisions: str | list[str] | None, **kw: Any) -> LLMEngine:
    """Prefix caching off unless asked: the module's engines see the same prompts in several tests, and a
    prefix hit computes a prompt in a different split (equal to 1e-5, not bit for bit)."""
    options = {PLUGIN: {"precisions": precisions}} if precisions is not None else {}
    cfg = {"num_kv_blocks": 256, "enable_prefix_caching": False, **kw}
    return LLMEngine(EngineConfig(model=str(model), device="cpu", plugin_options=options, **cfg))


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path) -> LLMEngine:
    return engine(tinystories_dir, ["bf16", "nvfp4", "mxfp4"])


@pytest.fixture(scope="module")
def bare(tinystories_dir: Path) -> LLMEngine:
    """A server's engine without --precisions (the plugin loaded, no FP4 copy)."""
    return engine(tinystories_dir, None)


@pytest.fixture(scope="module")
def ref(tinystories_dir: Path) -> Any:
    """This module's own transformers model (not the session's `ref`): its tests swap weights in it."""
    return AutoModelForCausalLM.from_pretrained(tinystories_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Four random prompts of 9-30 tokens (ids 3-2047, past TinyStories' special tokens)."""
    g = torch.Generator().manual_seed(SEED)
    lengths = torch.randint(9, 31, (4,), generator=g).tolist()
    return [torch.randint(3, 2048, (n,), generator=g).tolist() for n in lengths]


def spec(weights: Any) -> dict[str, Any]:
    return {PLUGIN: {"weights": weights}}


def ours(eng: LLMEngine, prompts: list[list[int]], specs: list[Any], tag: str) -> tuple[list, dict]:
    return run_logged(eng, prompts, greedy(STEPS, min_tokens=STEPS), specs, tag)


def fp4_weight(kind: str) -> Any:
    """W -> dequantize(quantize_rtn(W)) of the packed matrix our layer holds ([q; k; v], [gate; up])."""
    return lambda w, _layer, _proj: dequantize(quantize_rtn(w.float(), kind))  # type: ignore[arg-type]


def test_copies_installed_everywhere_and_only_when_asked(eng: LLMEngine, bare: LLMEngine) -> None:
    """Both FP4 copies on every projection of every layer (the graph hooks list them all); none without
    --precisions."""
    model = eng.loaded.model
    for layer in range(eng.model_info.num_layers):
        for proj in PROJS:
            assert {"", *FP4_KINDS} <= set(model.projection(layer, proj).formats)
            assert not set(bare.loaded.model.projection(layer, proj).formats) & set(FP4_KINDS)
    plugin = eng.registry.plugin(PLUGIN)
    assert isinstance(plugin, PrecisionPlugin) and plugin.graph_safe
    hook = plugin.graph_hooks().weights
    assert hook is not None
    assert hook.sites() == {(i, p): FP4_KINDS for i in range(eng.model_info.num_layers) for p in PROJS}
    bare_plugin = bare.registry.plugin(PLUGIN)
    assert bare_plugin is not None and bare_plugin.graph_hooks().weights is None


@pytest.mark.parametrize("kind", FP4_KINDS)
def test_fp4_row_equals_transformers_with_dequantized_weights(
    eng: LLMEngine, ref: Any, prompts: list[list[int]], kind: str
) -> None:
    sites = [(i, p) for i in range(eng.model_info.num_layers) for p in PROJS]
    (tokens,), seen = ours(eng, [prompts[0]], [spec(kind)], tag="f")
    with hf_swapped(ref, sites, fp4_weight(kind)):
        ref_tokens, ref_logits = hf_generate(ref, prompts[0], STEPS)
    _, plain_logits = hf_generate(ref, prompts[0], STEPS)
    assert (ref_logits[0] - plain_logits[0]).abs().max().item() > 1e-2  # FP4 rounding shows
    for step, (a, b) in enumerate(zip(seen["f0"], ref_logits, strict=True)):
        assert (a - b).abs().max().item() < 5e-5, f"seed {SEED} step {step}"
    assert tokens == ref_tokens, SEED


MIXED = [spec("nvfp4"), spec("bf16"), None, spec("mxfp4")]


def test_mixed_batch_equals_each_request_solo(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """nvfp4, bf16, plain and mxfp4 rows in one batch == each alone: tokens exact, logits within 2e-5 (CPU
    matmuls of other batch widths may round differently)."""
    batched, seen = ours(eng, prompts, MIXED, tag="m")
    for i, (p, s) in enumerate(zip(prompts, MIXED, strict=True)):
        (solo,), solo_seen = ours(eng, [p], [s], tag=f"s{i}_")
        assert batched[i] == solo, (SEED, i)
        for a, b in zip(seen[f"m{i}"], solo_seen[f"s{i}_0"], strict=True):
            assert (a - b).abs().max().item() < 2e-5, (SEED, i)


def test_bf16_rows_bit_identical_to_a_server_without_precisions(
    eng: LLMEngine, bare: LLMEngine, prompts: list[list[int]]
) -> None:
    without, without_seen = ours(bare, prompts, [None] * 4, tag="b")
    mixed, mixed_seen = ours(eng, prompts, MIXED, tag="x")
    for i in (1, 2):  # "bf16" and no field at all
        assert mixed[i] == without[i]
        for a, b in zip(mixed_seen[f"x{i}"], without_seen[f"b{i}"], strict=True):
            assert torch.equal(a, b), (SEED, i)
    for i in (0, 3):  # the FP4 rows did change
        assert (mixed_seen[f"x{i}"][0] - without_seen[f"b{i}"][0]).abs().max().item() > 1e-3, (SEED, i)


def test_prefix_cache_keeps_precisions_apart(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    """An nvfp4 prompt never reuses bf16 blocks nor the reverse; equal precisions share (bf16 with plain);
    every output equals the cache-off engine's."""
    eng = engine(tinystories_dir, ["nvfp4", "mxfp4"], block_size=BS, enable_prefix_caching=True)
    off = engine(tinystories_dir, ["nvfp4", "mxfp4"], block_size=BS, enable_prefix_caching=False)
    a, b = prompts[0] + prompts[1], prompts[2] + prompts[3]  # >= 18 tokens: at least 4 full blocks
    full = {id(p): (len(p) - 1) // BS * BS for p in (a, b)}

    def go(p: list[int], s: Any, tag: str) -> int:
        hits0 = eng.blocks.hits
        (out,), _ = ours(eng, [p], [s], tag)
        assert out == ours(off, [p], [s], tag + "off")[0][0], (SEED, tag)
        return eng.blocks.hits - hits0

    assert go(a, spec("bf16"), "a1") == 0
    assert go(a, spec("nvfp4"), "a2") == 0  # nvfp4 after bf16: no reuse
    assert go(a, spec("nvfp4"), "a3") == full[id(a)]  # nvfp4 after nvfp4: shared
    assert go(a, spec("mxfp4"), "a4") == 0
    assert go(a, None, "a5") == full[id(a)]  # plain reuses the bf16 prompt's blocks
    assert go(b, spec("nvfp4"), "b1") == 0
    assert go(b, spec("bf16"), "b2") == 0  # bf16 after nvfp4: no reuse
    assert go(b, spec("nvfp4"), "b3") == full[id(b)]


def test_prepare_refusals(eng: LLMEngine, bare: LLMEngine) -> None:
    """Without --precisions an FP4 request names the field and what is loaded; bf16 and none pass as
    plain requests (no plan)."""
    field = f"interventions.{PLUGIN}.weights"
    for weights in ("bf16", "none"):
        assert bare.registry.prepare(spec(weights)) == {} == eng.registry.prepare(spec(weights))
    for kind in FP4_KINDS:
        with pytest.raises(InterventionError, match=f"{kind} weights are not loaded.*loaded: bf16 ") as e:
            bare.registry.prepare(spec(kind))
        assert e.value.param == field
        assert eng.registry.prepare(spec(kind)) == {PLUGIN: kind}
    # "fp4": the loaded copy, NVFP4 first; refused where none is loaded
    assert eng.registry.prepare(spec("fp4")) == {PLUGIN: "nvfp4"}
    with pytest.raises(InterventionError, match="fp4 weights are not loaded.*loaded: bf16 ") as e:
        bare.registry.prepare(spec("fp4"))
    assert e.value.param == field


def test_unknown_names_refused_at_start(tinystories_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp8'; known: bf16, nvfp4, mxfp4"):
        engine(tinystories_dir, ["bf16", "fp8"], num_kv_blocks=64)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--precisions", "nvfp4,int4"])
    args = build_parser().parse_args(["serve", "--precisions", "bf16, mxfp4"])
    assert plugin_options(args)[PLUGIN] == {"precisions": "bf16, mxfp4"}
    assert engine(tinystories_dir, "bf16, mxfp4", num_kv_blocks=64).registry.prepare(spec("mxfp4"))
    assert PLUGIN not in plugin_options(build_parser().parse_args(["serve"]))


def test_transformers_fallback_refuses_fp4(tinystories_dir: Path) -> None:
    fallback = engine(tinystories_dir, ["nvfp4"], num_kv_blocks=64, force_transformers=True)
    with pytest.raises(InterventionError, match="native") as e:
        fallback.registry.prepare(spec("nvfp4"))
    assert e.value.param == f"interventions.{PLUGIN}.weights"
    fallback.registry.prepare(spec("bf16"))


def test_over_http(tinystories_dir: Path, eng: LLMEngine, prompts: list[list[int]]) -> None:
    """Served (nvfp4 gives the engine's tokens); every bad spec is a 400 naming its field."""
    options = {PLUGIN: {"precisions": ["nvfp4"]}}
    server = start_server(tinystories_dir, num_kv_blocks=256, plugin_options=options)
    field = f"interventions.{PLUGIN}.weights"
    try:
        listed = {d["name"]: d for d in httpx.get(f"{server.url}/v1/interventions").json()["data"]}
        assert listed[PLUGIN]["hook_points"] == ["linear_weights"]
        tok = AutoTokenizer.from_pretrained(tinystories_dir)
        body = {"model": "tinystories-656k", "prompt": prompts[1], "max_tokens": STEPS, "temperature": 0,
                "min_tokens": STEPS, "interventions": spec("nvfp4")}  # fmt: skip
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        (tokens,), _ = ours(eng, [prompts[1]], [spec("nvfp4")], tag="h")
        assert r.json()["choices"][0]["text"] == text_after(tok, prompts[1], tokens), SEED
        plain = httpx.post(f"{server.url}/v1/completions", json={**body, "interventions": None}, timeout=60)
        as_bf16 = httpx.post(f"{server.url}/v1/completions", json={**body, "interventions": spec("bf16")})
        assert as_bf16.status_code == 200, as_bf16.text
        assert as_bf16.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
        bad = [
            (spec("fp8"), field, ["'bf16'", "'none'", "'nvfp4'", "'mxfp4'"]),
            (spec(4), field, ["'bf16'", "'nvfp4'"]),
            (spec(None), field, []),
            (spec("mxfp4"), field, ["not loaded", "loaded: bf16, nvfp4"]),
            ({PLUGIN: {}}, field, ["required"]),
            ({PLUGIN: {"weights": "nvfp4", "kv": "fp8"}}, f"interventions.{PLUGIN}.kv", []),
            ({PLUGIN: "nvfp4"}, f"interventions.{PLUGIN}", []),
        ]
        assert_refused(server.url, body, bad)
    finally:
        server.stop()


# ------------------------------------------------------------------------------- memory and metrics


def copy_bytes(model: Path, kind: str) -> int:
    """One FP4 copy's bytes from the config's shapes alone, per decoder projection as the layers merge
    them (q/k/v, o, gate/up, down: [N, K]): N*K/2 of codes, a one-byte scale per group of K, and for
    NVFP4 one float32 global scale per projection."""
    c = AutoConfig.from_pretrained(model)
    h, i, d = c.hidden_size, c.intermediate_size, c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    shapes = [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)] * c.num_hidden_layers
    return sum(n * k // 2 + n * k // GROUP[kind] + (4 if kind == "nvfp4" else 0) for n, k in shapes)


def checkpoint_bytes(model: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(model / "model.safetensors").values())


def test_weight_bytes_by_format(tinystories_dir: Path, eng: LLMEngine, bare: LLMEngine) -> None:
    """Each copy's packed codes and scales under its kind, everything else under its dtype; the parts add
    up to weights_bytes, which grows by exactly the copies. (Without --precisions: the checkpoint's float32
    tensors, plus any dense copy another plugin installs: the tests' `test_perturbed_weights` does.)"""
    dense = bare.loaded.weights_by_format["float32"]
    assert bare.loaded.weights_by_format == {"float32": dense} and bare.loaded.weights_bytes == dense
    assert dense >= checkpoint_bytes(tinystories_dir)
    nv, mx = copy_bytes(tinystories_dir, "nvfp4"), copy_bytes(tinystories_dir, "mxfp4")
    assert eng.loaded.weights_by_format == {"float32": dense, "nvfp4": nv, "mxfp4": mx}
    assert eng.loaded.weights_bytes == dense + nv + mx


def test_kv_cache_is_sized_after_the_copies(tinystories_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the KV cache gets what --gpu-memory-utilization leaves after `torch.cuda.memory_allocated()`
    at `size_kv_cache` (and the profiled step): the copies must be on the model by then. They are: what
    the model holds when the engine sizes the cache is what it holds when it serves, copies included."""
    held: list[dict[str, int]] = []
    size = model_setup.size_kv_cache  # where the engine's start (every rank's) sizes it

    def spy(loaded: LoadedModel, config: LoadConfig) -> LoadedModel:
        held.append(weight_bytes(loaded.model))
        return size(loaded, config)

    monkeypatch.setattr(model_setup, "size_kv_cache", spy)
    e = engine(tinystories_dir, ["bf16", "nvfp4"], num_kv_blocks=64)
    assert held == [e.loaded.weights_by_format]
    assert held[0]["nvfp4"] == copy_bytes(tinystories_dir, "nvfp4")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels without model_name): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def test_metrics_count_requests_by_kind_and_weight_bytes_by_format(
    tinystories_dir: Path, bare: LLMEngine
) -> None:
    """actserve_intervention_requests_total{intervention="precision", value=<kind>} counts each admitted
    sequence by the copy it runs on ("fp4" under the kind it picked, each of n choices); bf16 and plain
    requests add nothing there. actserve_weight_bytes{format} holds the copies and sums to the total."""
    options = {PLUGIN: {"precisions": ["nvfp4", "mxfp4"]}}
    server = start_server(tinystories_dir, num_kv_blocks=256, plugin_options=options)
    counter = "actserve_intervention_requests_total"
    try:
        before = scrape(server.url)
        sent = [("nvfp4", 1), ("fp4", 1), ("mxfp4", 2), ("bf16", 1), (None, 1)]
        for weights, n in sent:
            body = {"model": "tinystories-656k", "prompt": "Once upon", "max_tokens": 2, "n": n,
                    "interventions": None if weights is None else spec(weights)}  # fmt: skip
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
        after = scrape(server.url)
        counted = {k[1]: v - before.get(k, 0.0) for k, v in after.items() if k[0] == counter}
        assert counted == {
            (("intervention", PLUGIN), ("value", "nvfp4")): 2,
            (("intervention", PLUGIN), ("value", "mxfp4")): 2,
        }
        gauge = {dict(k[1])["format"]: v for k, v in after.items() if k[0] == "actserve_weight_bytes"}
        nv, mx = copy_bytes(tinystories_dir, "nvfp4"), copy_bytes(tinystories_dir, "mxfp4")
        assert gauge == {"float32": bare.loaded.weights_bytes, "nvfp4": nv, "mxfp4": mx}
    finally:
        server.stop()
