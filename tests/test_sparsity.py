"""Activation sparsity (TEAL), the `sparsity` plugin (interventions/sparsity/), on TinyStories-656K in float32
on the CPU: calibrated with `actserve sparsity calibrate` on the FP4 bench's TinyStories calibration split,
checked on its held-out split (disjoint openings and seeds) against an independent reference, transformers
with forward pre-hooks that zero the entries below the same thresholds (tests/engine_utils.py `HFTeal`):
greedy tokens and logits; level 0 and dense rows bit-identical; mixed levels equal solo runs; achieved
sparsity within 1 % of the level; the prefix cache shared with dense prompts (the prompt runs dense); bad
specs are 400s naming the field; the artifact round-trips and bad ones are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from actserve.interventions.base import InterventionError
from actserve.interventions.sparsity.artifact import (
    ARTIFACT_NAME,
    ArtifactError,
    SparsityCalibration,
    cdf,
    load_calibration,
    log_edges,
    quantile_values,
    save_calibration,
)
from actserve.interventions.sparsity.plugin import INPUT, SparsityPlugin, TealHook, levels
from actserve.server.cli import build_parser, main, plugin_options
from actserve.server.contract import PROJECTIONS
from actserve.server.engine.llm_engine import LLMEngine
from tests.conftest import assert_refused, start_server
from tests.engine_utils import HFTeal, assert_steps_close, greedy, hf_generate, run, run_logged, text_after
from tests.sparsity_utils import CALIB, HELDOUT, PLUGIN, engine

STEPS = 6


def spec(level: Any, method: Any = "teal") -> dict[str, Any]:
    return {PLUGIN: {"method": method, "level": level}}


@pytest.fixture(scope="module")
def artifact(sparsity_calibration: Path) -> Path:
    return sparsity_calibration


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path, artifact: Path) -> LLMEngine:
    return engine(tinystories_dir, artifact)


@pytest.fixture(scope="module")
def heldout() -> list[str]:
    return [json.loads(line)["text"] for line in HELDOUT.read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts(eng: LLMEngine, heldout: list[str]) -> list[list[int]]:
    """The openings (12-20 tokens) of three held-out stories: fixed, so a threshold tie shows every run."""
    return [list(eng.tokenizer(t)["input_ids"])[: 12 + 4 * i] for i, t in enumerate(heldout[:3])]


def table(eng: LLMEngine) -> torch.Tensor:
    plugin = eng.registry.plugin(PLUGIN)
    assert isinstance(plugin, SparsityPlugin)
    return plugin.tables["teal"]


def ours(eng: LLMEngine, prompts: list[list[int]], specs: list[Any], tag: str) -> tuple[list, dict]:
    return run_logged(eng, prompts, greedy(STEPS, min_tokens=STEPS), specs, tag)


def test_quantiles_and_their_inverse() -> None:
    """A quantile lies where the histogram's counts say (linear within a bin), level 0 gives 0, and the
    CDF gives the quantile back."""
    edges = log_edges()
    counts = torch.zeros(2, len(edges) + 1, dtype=torch.int64)
    counts[0, 100], counts[0, 200] = 30, 70  # 30 % in bin 100, 70 % in bin 200
    counts[1, 0], counts[1, 50] = 50, 50  # half exact zeros (bin 0)
    q = torch.tensor([0.0, 0.15, 0.3, 0.65, 0.25], dtype=torch.float64)
    t = quantile_values(counts, edges, q)
    assert t[0].tolist() == [0.0, 0.0]
    expect = {  # bin i spans [edges[i-1], edges[i]); bin 0 [0, edges[0])
        (1, 0): (edges[99] + edges[100]) / 2, (2, 0): edges[100], (3, 0): (edges[199] + edges[200]) / 2,
        (4, 1): edges[0] / 2,
    }  # fmt: skip
    for at, value in expect.items():
        assert torch.isclose(t[at], value, rtol=1e-12), at
    assert torch.allclose(cdf(counts, edges, t[1:]), q[1:, None].expand(-1, 2), atol=1e-12)


def test_calibration_round_trips_and_bad_files_are_refused(
    artifact: Path, eng: LLMEngine, tmp_path: Path, tinystories_dir: Path
) -> None:
    cal = load_calibration(artifact)
    assert cal.model == "tinystories-656k" and cal.num_layers == 2 and cal.hidden_size == 128
    assert cal.tokens > 5000 and cal.info["source"]["text"] == [str(CALIB)]
    assert cal.grid is not None and cal.quantiles is not None and len(cal.grid) == 18
    assert cal.info["input_sizes"] == {"qkv_proj": 128, "o_proj": 128, "gate_up_proj": 128, "down_proj": 384}
    save_calibration(cal, tmp_path / "copy.safetensors")
    again = load_calibration(tmp_path / "copy.safetensors")
    assert torch.equal(again.counts, cal.counts) and torch.equal(again.quantiles, cal.quantiles)  # type: ignore[arg-type]
    assert again.info == cal.info and again.tokens == cal.tokens
    t = cal.thresholds(levels())
    assert torch.equal(t, again.thresholds(levels())) and torch.equal(t.to(table(eng).device), table(eng))
    # every site sparse at the top, none at 0; a site's own level never falls as the level rises (its
    # threshold may: the sparsity upstream shrinks its inputs, calibrate.py `correct`)
    assert t[0].eq(0).all() and (t >= 0).all() and (t[-1] > 0).all()
    assert cal.allocation is not None and (cal.allocation[1:] >= cal.allocation[:-1]).all()
    bad = tmp_path / "bad.safetensors"
    save_file({"histogram": cal.counts}, str(bad), metadata={"format": "actserve.asc"})
    with pytest.raises(ArtifactError, match="not a sparsity calibration"):
        load_calibration(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_calibration(tmp_path / "junk.safetensors")
    other = SparsityCalibration(cal.counts[:1], cal.edges, "x", 128, 10)  # one layer of the two
    save_calibration(other, tmp_path / "one_layer.safetensors")
    with pytest.raises(ArtifactError, match="1 layers; the loaded model has 128 and 2"):
        engine(tinystories_dir, tmp_path / "one_layer.safetensors", num_kv_blocks=64)
    old = tmp_path / "v2.safetensors"  # before the allocation: refused with the command that remakes it
    meta = {"format": "actserve.sparsity", "version": "2", "projections": ",".join(PROJECTIONS)}
    save_file({"histogram": cal.counts, "edges": cal.edges}, str(old), metadata=meta)
    with pytest.raises(ArtifactError, match="version '2'.*actserve sparsity calibrate"):
        load_calibration(old)


def test_hook_leaves_dense_and_level0_rows_bit_identical(eng: LLMEngine) -> None:
    """Rows at -1 and at level 0 keep every bit (-0.0, subnormals, NaN included); others lose exactly the
    entries below their threshold."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, generator=g) * torch.logspace(-40, 1, 128)
    x[:, :3] = torch.tensor([-0.0, float("nan"), 1e-45])
    rows = torch.tensor([[-1], [0], [30], [70]], dtype=torch.int32)
    hook = TealHook(table(eng), set())
    y = hook.apply(1, "o_proj", x, {INPUT: rows})
    assert torch.equal(y[:2].view(torch.int32), x[:2].view(torch.int32))
    for r, level in ((2, 30), (3, 70)):
        thr = table(eng)[level, 1, 1]
        keep = ~(x[r].abs() < thr)
        assert torch.equal(y[r][keep].view(torch.int32), x[r][keep].view(torch.int32))
        assert y[r][~keep].eq(0).all() and (~keep).sum() > 10


@pytest.mark.parametrize("level", [0.3, 0.6])
def test_greedy_tokens_and_logits_equal_transformers_with_thresholds(
    eng: LLMEngine, ref: Any, prompts: list[list[int]], level: float
) -> None:
    """Decode steps sparse, the prompt dense: the first token's logits are the dense model's."""
    (tokens,), seen = ours(eng, [prompts[0]], [spec(level)], tag="g")
    with HFTeal(ref, table(eng)[round(level * 100)], decode_only=True):
        ref_tokens, ref_logits = hf_generate(ref, prompts[0], STEPS)
    _, dense_logits = hf_generate(ref, prompts[0], STEPS)
    assert_steps_close(seen["g0"], ref_logits, 5e-5, f"level {level}")
    assert tokens == ref_tokens
    assert (seen["g0"][0] - dense_logits[0]).abs().max() < 5e-5  # the prompt ran dense
    assert (seen["g0"][1] - dense_logits[1]).abs().max() > 1e-3  # the decode did not


def test_level0_and_dense_rows_bit_identical_in_a_sparse_batch(
    eng: LLMEngine, prompts: list[list[int]]
) -> None:
    """In a batch with a sparse row, the plain row and the level-0 row (no plan: a plain request) have the
    logits of the same batch without any sparsity, bit for bit."""
    mixed, mixed_seen = ours(eng, prompts, [spec(0.5), None, spec(0)], tag="m")
    plain, plain_seen = ours(eng, prompts, [None, None, None], tag="p")
    for i in (1, 2):
        assert mixed[i] == plain[i]
        for a, b in zip(mixed_seen[f"m{i}"], plain_seen[f"p{i}"], strict=True):
            assert torch.equal(a, b), i
    assert eng.registry.prepare(spec(0)) == {} and eng.registry.prepare(spec(0.0)) == {}


def test_mixed_levels_equal_each_request_solo(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """Dense, 0.3 and 0.6 in one batch == each alone: tokens exact, logits within 2e-5 (CPU matmuls of
    other batch widths may round differently)."""
    specs = [None, spec(0.3), spec(0.6)]
    batched, seen = ours(eng, prompts, specs, tag="x")
    for i, (p, s) in enumerate(zip(prompts, specs, strict=True)):
        (solo,), solo_seen = ours(eng, [p], [s], tag=f"s{i}_")
        assert batched[i] == solo, i
        assert_steps_close(seen[f"x{i}"], solo_seen[f"s{i}_0"], 2e-5, f"row {i}")


def test_achieved_sparsity_on_heldout_text(eng: LLMEngine, ref: Any, heldout: list[str]) -> None:
    """Over held-out stories (every position sparse, as each decode step is), the share of the projections'
    multiply-adds skipped (each site's zero fraction weighed by its weights; the sites have levels of
    their own, allocation.py) is within 0.01 of the level, between grid levels too (0.33)."""
    tok = AutoTokenizer.from_pretrained(eng.model_info.path)
    seqs = [tok(t).input_ids[:200] for t in heldout[:24]]
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    got = {}
    for level in (0.25, 0.33, 0.4, 0.5, 0.7):
        with torch.inference_mode(), HFTeal(ref, table(eng)[round(level * 100)]) as h:
            h.valid = mask.reshape(-1).bool()
            ref(input_ids=ids, attention_mask=mask)
        got[level] = h.sparsity()
    assert all(abs(a - level) <= 0.01 for level, a in got.items()), got


def test_prompt_kv_shared_with_dense_requests(
    tinystories_dir: Path, artifact: Path, prompts: list[list[int]]
) -> None:
    """The prompt runs dense, so a sparse request reuses a dense prompt's blocks and the reverse, with the
    outputs of a cache-off engine."""
    on = engine(tinystories_dir, artifact, block_size=4, enable_prefix_caching=True)
    off = engine(tinystories_dir, artifact, block_size=4)
    p = prompts[2]
    full = (len(p) - 1) // 4 * 4
    for i, (s, hits) in enumerate([(None, 0), (spec(0.5), full), (spec(0.7), full), (None, full)]):
        before = on.blocks.hits
        (out,), _ = ours(on, [p], [s], f"c{i}")
        assert on.blocks.hits - before == hits, i
        assert out == ours(off, [p], [s], f"o{i}")[0][0], i


def test_default_location_generated_text_and_refusals(
    tinystories_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    """Without --out the calibration lands beside the model, where the engine finds it; without --text the
    model's own samples are the text. An engine without one refuses sparse requests saying how to make one;
    the transformers fallback refuses them too."""
    model = tmp_path / "tiny"
    shutil.copytree(tinystories_dir, model)
    bare = engine(model, None, num_kv_blocks=64)
    with pytest.raises(
        InterventionError, match="actserve sparsity calibrate --model .*--sparsity-calibration"
    ) as e:
        bare.registry.prepare(spec(0.5))
    assert e.value.param == f"interventions.{PLUGIN}"
    argv = ["sparsity", "calibrate", "--model", str(model), "--device", "cpu", "--samples", "2"]
    assert main([*argv, "--sample-tokens", "24", "--correction-tokens", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(model / ARTIFACT_NAME) and printed["source"]["generated"]["samples"] == 2
    cal = load_calibration(model / ARTIFACT_NAME)
    assert cal.grid is None and 40 < cal.tokens <= 2 * (24 + 12)
    found = engine(model, None, num_kv_blocks=64)
    assert found.registry.prepare(spec(0.5)) == {PLUGIN: found.registry.prepare(spec(0.5))[PLUGIN]}
    fallback = engine(model, None, num_kv_blocks=64, force_transformers=True)
    with pytest.raises(InterventionError, match="native") as e:
        fallback.registry.prepare(spec(0.5))
    assert e.value.param == f"interventions.{PLUGIN}"


def test_cli_flag() -> None:
    args = build_parser().parse_args(["serve", "--sparsity-calibration", "/x/cal.safetensors"])
    assert plugin_options(args)[PLUGIN] == {"calibration": "/x/cal.safetensors"}
    args = build_parser().parse_args(["serve", "--sparsity-coreinfer-slots", "0"])
    assert plugin_options(args)[PLUGIN] == {"coreinfer_slots": 0}
    assert PLUGIN not in plugin_options(build_parser().parse_args(["serve"]))


def test_over_http(tinystories_dir: Path, artifact: Path, eng: LLMEngine, prompts: list[list[int]]) -> None:
    """Served (0.5 gives the engine's tokens, level 0 the plain ones); every bad spec is a 400 naming its
    field; unbuilt methods are named as such."""
    server = start_server(
        tinystories_dir, num_kv_blocks=256, plugin_options={PLUGIN: {"calibration": str(artifact)}}
    )
    field = f"interventions.{PLUGIN}"
    try:
        listed = {d["name"]: d for d in httpx.get(f"{server.url}/v1/interventions").json()["data"]}
        assert listed[PLUGIN]["hook_points"] == ["linear_input", "linear_output"]
        shown = listed[PLUGIN]["schema"]["x-actserve-calibration"]
        assert shown["file"] == str(artifact) and shown["tokens"] > 5000 and shown["corrected"]
        tok = AutoTokenizer.from_pretrained(tinystories_dir)
        body = {"model": "tinystories-656k", "prompt": prompts[1], "max_tokens": STEPS, "temperature": 0,
                "min_tokens": STEPS, "interventions": spec(0.5)}  # fmt: skip
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        (tokens,), _ = ours(eng, [prompts[1]], [spec(0.5)], tag="h")
        assert r.json()["choices"][0]["text"] == text_after(tok, prompts[1], tokens)
        plain = httpx.post(f"{server.url}/v1/completions", json={**body, "interventions": None}, timeout=60)
        zero = httpx.post(f"{server.url}/v1/completions", json={**body, "interventions": spec(0)}, timeout=60)
        assert zero.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
        bad = [
            (spec(0.95), f"{field}.level", ["less than or equal to 0.9"]),
            (spec(-0.1), f"{field}.level", ["greater than or equal to 0"]),
            (spec(0.555), f"{field}.level", ["multiple of 0.01"]),
            (spec("half"), f"{field}.level", []),
            (spec(0.5, "magic"), f"{field}.method", ["'teal'", "'chess'", "'r_sparse'", "'coreinfer'"]),
            ({PLUGIN: {"level": 0.5}}, f"{field}.method", ["required"]),
            ({PLUGIN: {"method": "teal"}}, f"{field}.level", ["required"]),
            ({PLUGIN: {"method": "teal", "level": 0.5, "layers": [1]}}, f"{field}.layers", []),
            ({PLUGIN: 0.5}, field, []),
        ]
        assert_refused(server.url, body, bad)
    finally:
        server.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparse_rows_replay_cuda_graphs(tinystories_dir: Path, tmp_path: Path, heldout: list[str]) -> None:
    """bf16 on CUDA, calibrated there: decode steps mixing dense, level-0 and sparse rows of the four
    methods at several levels replay CUDA graphs (no eager decode step), give the eager engine's tokens
    (all rows but one at least: bf16 graph and eager kernels may round apart), and the dense rows keep the
    tokens of an all-dense batch."""
    out = tmp_path / "cal.safetensors"
    argv = [
        "sparsity",
        "calibrate",
        "--model",
        str(tinystories_dir),
        "--device",
        "cuda",
        "--dtype",
        "bfloat16",
    ]
    assert main([*argv, "--text", str(CALIB), "--out", str(out), "--correction-tokens", "1024"]) == 0

    def cuda_engine(eager: bool) -> LLMEngine:
        return engine(tinystories_dir, out, device="cuda", dtype="bfloat16", enforce_eager=eager)

    fast, slow = cuda_engine(False), cuda_engine(True)
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    prompts = [tok(t).input_ids[:16] for t in heldout[:8]]
    specs = [None, spec(0.3), spec(0.6), None, spec(0.4, "chess"), spec(0), spec(0.5, "r_sparse")]
    specs.append(spec(0.5, "coreinfer"))
    params = greedy(24, min_tokens=24)
    eager0, graph0 = fast.runner.eager_decode_steps, fast.runner.graph_steps
    a = run(fast, prompts, params, specs, tag="g")
    assert fast.runner.eager_decode_steps == eager0 and fast.runner.graph_steps > graph0
    b = run(slow, prompts, params, specs, tag="e")
    assert sum(x == y for x, y in zip(a, b, strict=True)) >= len(specs) - 1
    plain = run(fast, prompts, params, [None] * len(specs), tag="p")
    assert [a[i] for i in (0, 3, 5)] == [plain[i] for i in (0, 3, 5)]
    assert any(a[i] != plain[i] for i in (1, 2, 4, 6, 7))
