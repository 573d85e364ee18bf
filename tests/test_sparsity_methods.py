"""CHESS, R-Sparse and CoreInfer (interventions/sparsity/{chess,r_sparse,coreinfer}.py) and the per-request
sparsity metrics, on TinyStories-656K in float32 on the CPU, calibrated on the FP4 bench's TinyStories
calibration split, checked on its held-out split against independent references (tests/sparsity_utils.py:
transformers with hooks doing what each paper describes): greedy tokens and logits; achieved sparsity
within 1 % of the level; mixed methods and levels equal solo runs, dense and level-0 rows bit-identical;
CoreInfer's masked path equals its gathered-weights path and its core set survives chunked prefill; the
achieved-sparsity histogram and requests by method; the artifact's new sections round-trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from actserve.interventions.base import InterventionCapacityError, InterventionError
from actserve.interventions.sparsity.artifact import ArtifactError, load_calibration, save_calibration
from actserve.interventions.sparsity.calibrate import read_texts, reallocate, spread, text_windows
from actserve.interventions.sparsity.coreinfer import TOKEN_FRACTION, core_size, gathered_ffn
from actserve.interventions.sparsity.plugin import SparsityPlugin, levels
from actserve.server.engine.llm_engine import LLMEngine
from tests.engine_utils import HFTeal, assert_steps_close, greedy, hf_generate, run_logged
from tests.sparsity_utils import HELDOUT, PLUGIN, HFChess, HFCoreInfer, HFRSparse, engine

STEPS = 6
CORRECTION_TOKENS = 1024  # the session calibration's --correction-tokens (tests/conftest.py)


def spec(method: str, level: float) -> dict[str, Any]:
    return {PLUGIN: {"method": method, "level": level}}


@pytest.fixture(scope="module")
def artifact(sparsity_calibration: Path) -> Path:
    return sparsity_calibration


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path, artifact: Path) -> LLMEngine:
    return engine(tinystories_dir, artifact)


@pytest.fixture(scope="module")
def plugin(eng: LLMEngine) -> SparsityPlugin:
    p = eng.registry.plugin(PLUGIN)
    assert isinstance(p, SparsityPlugin)
    return p


@pytest.fixture(scope="module")
def heldout() -> list[str]:
    return [json.loads(line)["text"] for line in HELDOUT.read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts(eng: LLMEngine, heldout: list[str]) -> list[list[int]]:
    """The openings (12-24 tokens) of five held-out stories: fixed, so a threshold tie shows every run."""
    return [list(eng.tokenizer(t)["input_ids"])[: 12 + 3 * i] for i, t in enumerate(heldout[:5])]


def ours(eng: LLMEngine, prompts: list[list[int]], specs: list[Any], tag: str) -> tuple[list, dict]:
    return run_logged(eng, prompts, greedy(STEPS, min_tokens=STEPS), specs, tag)


def chess_ref(plugin: SparsityPlugin, ref: Any, level: float, decode_only: bool) -> HFChess:
    assert plugin.calibration is not None and plugin.calibration.chess is not None
    table = plugin.tables["chess"][round(level * 100)].cpu()
    return HFChess(ref, table, plugin.calibration.chess.up_mean, decode_only)


def rsparse_ref(plugin: SparsityPlugin, ref: Any, level: float, decode_only: bool) -> HFRSparse:
    assert plugin.calibration is not None and plugin.calibration.rsparse is not None
    i = round(level * 100)
    ranks = plugin.hooks["r_sparse"].rank_table[i].cpu()
    alpha = plugin.calibration.rsparse.alpha
    return HFRSparse(ref, plugin.tables["r_sparse"][i].cpu(), ranks, alpha, decode_only)


@pytest.mark.parametrize("method", ["chess", "r_sparse"])
@pytest.mark.parametrize("level", [0.3, 0.6])
def test_threshold_methods_equal_transformers(
    eng: LLMEngine, plugin: SparsityPlugin, ref: Any, prompts: list[list[int]], method: str, level: float
) -> None:
    """Decode steps sparse by the method, the prompt dense (the first logits are the dense model's)."""
    (tokens,), seen = ours(eng, [prompts[0]], [spec(method, level)], tag="g")
    make = chess_ref if method == "chess" else rsparse_ref
    with make(plugin, ref, level, decode_only=True):
        ref_tokens, ref_logits = hf_generate(ref, prompts[0], STEPS)
    _, dense_logits = hf_generate(ref, prompts[0], STEPS)
    assert_steps_close(seen["g0"], ref_logits, 5e-5, f"{method} {level}")
    assert tokens == ref_tokens
    assert (seen["g0"][0] - dense_logits[0]).abs().max() < 5e-5  # the prompt ran dense
    assert (seen["g0"][1] - dense_logits[1]).abs().max() > 1e-3  # the decode did not


def test_rsparse_low_rank_path_at_every_projection_equals_transformers(
    tinystories_dir: Path, artifact: Path, ref: Any, prompts: list[list[int]], tmp_path: Path
) -> None:
    """The calibration picked alpha ~ 1 (little low-rank path) on this model: with alpha 0.6 written into
    the artifact every projection with a positive level takes rank > 0 at 0.4 (and scores by |x| times
    its column norms), and the engine still equals the reference."""
    cal = load_calibration(artifact)
    assert cal.rsparse is not None
    cal.rsparse.alpha.fill_(0.6)
    save_calibration(cal, tmp_path / "alpha.safetensors")
    low = engine(tinystories_dir, tmp_path / "alpha.safetensors", num_kv_blocks=64)
    plugin = low.registry.plugin(PLUGIN)
    assert isinstance(plugin, SparsityPlugin)
    at = cal.rsparse.site_levels(levels()[40:41])[0] > 0
    assert bool(at.any()) and bool((plugin.hooks["r_sparse"].rank_table[40][at] > 0).all())
    (tokens,), seen = ours(low, [prompts[2]], [spec("r_sparse", 0.4)], tag="lr")
    with rsparse_ref(plugin, ref, 0.4, decode_only=True):
        ref_tokens, ref_logits = hf_generate(ref, prompts[2], STEPS)
    assert_steps_close(seen["lr0"], ref_logits, 5e-5, "r_sparse alpha 0.6")
    assert tokens == ref_tokens


def test_rsparse_low_rank_path_is_used(plugin: SparsityPlugin) -> None:
    """The calibration kept factors and some projection's chosen rank is positive at 0.5 (otherwise the
    reference comparison would not test the low-rank path)."""
    cal = plugin.calibration
    assert cal is not None and cal.rsparse is not None
    ranks = cal.rsparse.ranks(levels())
    assert ranks[0].eq(0).all() and bool((ranks[50] > 0).any())
    for p, vs in cal.rsparse.vs.items():
        n_in, n_out, cap = cal.rsparse.shape(p)
        assert 0 < cap <= 0.125 * n_in * n_out / (n_in + n_out) and vs.shape == (2, n_in, cap)


@pytest.mark.parametrize("level", [0.3, 0.5])
def test_coreinfer_equals_transformers(
    eng: LLMEngine, ref: Any, prompts: list[list[int]], level: float
) -> None:
    """Core neurons from the prompt (plain-Python selection in the reference), decode on them only."""
    n = eng.model_info.intermediate_size
    (tokens,), seen = ours(eng, [prompts[1]], [spec("coreinfer", level)], tag="c")
    with HFCoreInfer(ref, core_size(level, n), TOKEN_FRACTION) as h:
        ref_tokens, ref_logits = hf_generate(ref, prompts[1], STEPS)
    assert_steps_close(seen["c0"], ref_logits, 5e-5, f"coreinfer {level}")
    assert tokens == ref_tokens
    assert all(int(m.sum()) == core_size(level, n) for m in h.core.values())
    # the teacher-forced form (bench/sparsity_quality.py's perplexity): the same logits in one forward
    p = len(prompts[1])
    with torch.inference_mode(), HFCoreInfer(ref, core_size(level, n), TOKEN_FRACTION, prompt_len=p):
        forced = ref(input_ids=torch.tensor([prompts[1] + tokens[:-1]])).logits[0, p - 1 :]
    assert_steps_close(seen["c0"], list(forced), 5e-5, f"coreinfer {level} teacher-forced")


def test_coreinfer_core_set_survives_chunked_prefill(
    tinystories_dir: Path, artifact: Path, eng: LLMEngine, prompts: list[list[int]]
) -> None:
    """A prompt prefilled in 5-token chunks (counts accumulated per chunk) gives the one-chunk outputs;
    a CoreInfer prompt never reuses cached blocks (its core set needs every prompt token)."""
    chunked = engine(tinystories_dir, artifact, max_num_batched_tokens=5, max_num_seqs=4)
    p = prompts[3]
    (a,), seen_a = ours(eng, [p], [spec("coreinfer", 0.5)], tag="u")
    (b,), seen_b = ours(chunked, [p], [spec("coreinfer", 0.5)], tag="k")
    assert a == b
    assert_steps_close(seen_b["k0"], seen_a["u0"], 2e-5, "chunked")
    cached = engine(tinystories_dir, artifact, block_size=4, enable_prefix_caching=True)
    ours(cached, [p], [None], tag="w")
    before = cached.blocks.hits
    (c,), _ = ours(cached, [p], [spec("coreinfer", 0.5)], tag="h")
    assert cached.blocks.hits == before and c == a
    ours(cached, [p], [spec("teal", 0.5)], tag="t")
    assert cached.blocks.hits > before  # the other methods share the dense prompt's blocks


def test_coreinfer_masked_path_equals_gathered_weights(eng: LLMEngine) -> None:
    """The masked FFN (down input zeroed outside the core) equals the gathered dense FFN over the core
    neurons only, in float64 on the model's layer-1 weights and random inputs."""
    mlp = eng.runner.model.model.layers[1].mlp
    gate_up, down = mlp.gate_up_proj.weight.double(), mlp.down_proj.weight.double()
    n = down.shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, gate_up.shape[1], generator=g, dtype=torch.float64)
    core = torch.randperm(n, generator=g)[: core_size(0.6, n)].sort().values
    h = F.linear(x, gate_up)
    masked_input = F.silu(h[:, :n]) * h[:, n:]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[core] = True
    masked = F.linear(masked_input.masked_fill(~keep, 0), down)
    assert torch.allclose(gathered_ffn(x, gate_up, down, core), masked, atol=1e-12, rtol=1e-12)


def teal_ref(plugin: SparsityPlugin, ref: Any, level: float, decode_only: bool) -> HFTeal:
    return HFTeal(ref, plugin.tables["teal"][round(level * 100)].cpu(), decode_only)


def achieved(
    plugin: SparsityPlugin,
    ref: Any,
    seqs: list[list[int]],
    methods: tuple[str, ...],
    levels_: tuple[float, ...],
) -> dict[tuple[str, float], float]:
    """(method, level) -> the reference's achieved sparsity over `seqs`, every position sparse."""
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    make = {"teal": teal_ref, "chess": chess_ref, "r_sparse": rsparse_ref}
    got = {}
    for method in methods:
        for level in levels_:
            with torch.inference_mode(), make[method](plugin, ref, level, decode_only=False) as h:
                h.valid = mask.reshape(-1).bool()
                ref(input_ids=ids, attention_mask=mask)
            got[(method, level)] = round(h.sparsity(), 4)
    return got


def test_achieved_sparsity_on_heldout_text(plugin: SparsityPlugin, ref: Any, heldout: list[str]) -> None:
    """Over held-out stories (every position sparse, as each decode step is), CHESS's zero fraction of its
    three thresholded tensors and R-Sparse's saved share of multiply-adds, averaged over layers and
    sites, are within 0.01 of the level, between grid levels too (0.33)."""
    tok = AutoTokenizer.from_pretrained(ref.name_or_path)
    seqs = [tok(t).input_ids[:200] for t in heldout[:24]]
    got = achieved(plugin, ref, seqs, ("chess", "r_sparse"), (0.25, 0.33, 0.4, 0.5, 0.7))
    assert all(abs(a - level) <= 0.01 for (_, level), a in got.items()), got


def test_achieved_sparsity_on_the_correction_sample_is_the_level(
    plugin: SparsityPlugin, eng: LLMEngine, ref: Any
) -> None:
    """On the correction's own sample (calibrate.py step 3: each site's threshold measured there, every
    earlier site sparse), each calibrated method's achieved sparsity at grid levels is the level to within
    the histograms' interpolation in a bin (0.002): every site drops its allocated share, so the model
    saves the allocation's. Thresholds held up to their running maximum over the grid (the rule before)
    drop more where a site's level rises less than the sparsity upstream shrinks its inputs (TEAL: 0.704
    at 0.70 here)."""
    cal = plugin.calibration
    assert cal is not None
    source = cal.info["source"]
    seqs = text_windows(eng.tokenizer, read_texts([Path(t) for t in source["text"]]), source["window"])
    sample = spread(seqs, CORRECTION_TOKENS)
    assert sum(map(len, sample)) == cal.info["correction"]["tokens"]
    got = achieved(plugin, ref, sample, ("teal", "chess", "r_sparse"), (0.25, 0.4, 0.5, 0.7))
    assert all(abs(a - level) <= 0.002 for (_, level), a in got.items()), got


def test_reallocate_remakes_the_allocation_and_correction(tinystories_dir: Path, artifact: Path) -> None:
    """From the calibration's kept probe costs, histograms and statistics, `reallocate` (the bench's
    --calibration-cache) makes the allocation and the correction of a full calibration again: the same
    tables for every method."""
    cal = load_calibration(artifact)
    bare = engine(tinystories_dir, None)
    source = cal.info["source"]
    seqs = text_windows(bare.tokenizer, read_texts([Path(t) for t in source["text"]]), source["window"])
    again = reallocate(bare, cal, seqs, CORRECTION_TOKENS, progress=False)
    assert again.info == cal.info and again is not cal
    lv = levels()
    assert torch.allclose(again.thresholds(lv), cal.thresholds(lv), rtol=1e-6, atol=0)
    assert again.chess is not None and cal.chess is not None
    a, b = (
        again.chess.thresholds(lv, again.counts, again.edges),
        cal.chess.thresholds(lv, cal.counts, cal.edges),
    )
    assert torch.allclose(a, b, rtol=1e-6, atol=0)
    assert again.rsparse is not None and cal.rsparse is not None
    assert torch.allclose(
        again.rsparse.thresholds(lv, again.edges), cal.rsparse.thresholds(lv, cal.edges), rtol=1e-6
    )
    assert torch.equal(again.rsparse.ranks(lv), cal.rsparse.ranks(lv))
    for x, y in ((again.allocation, cal.allocation), (again.chess.allocation, cal.chess.allocation)):
        assert x is not None and y is not None and torch.equal(x, y)


def test_mixed_methods_and_levels_equal_solo_and_dense_rows_keep_their_bits(
    eng: LLMEngine, prompts: list[list[int]]
) -> None:
    """One batch of all four methods at different levels, a dense row and a level-0 row: each sparse row
    equals its solo run (tokens exact, logits within 2e-5: CPU matmuls of other batch widths may round
    differently), the dense and level-0 rows equal an all-dense batch bit for bit."""
    specs = [spec("teal", 0.3), spec("chess", 0.5), None, spec("r_sparse", 0.4), spec("coreinfer", 0.5)]
    specs = [*specs, spec("chess", 0)]
    ps = [*prompts, prompts[0]]
    batched, seen = ours(eng, ps, specs, tag="x")
    plain, plain_seen = ours(eng, ps, [None] * len(ps), tag="p")
    for i in (2, 5):
        assert batched[i] == plain[i]
        for a, b in zip(seen[f"x{i}"], plain_seen[f"p{i}"], strict=True):
            assert torch.equal(a, b), i
    for i in (0, 1, 3, 4):
        (solo,), solo_seen = ours(eng, [ps[i]], [specs[i]], tag=f"s{i}_")
        assert batched[i] == solo, i
        assert_steps_close(seen[f"x{i}"], solo_seen[f"s{i}_0"], 2e-5, f"row {i}")
        assert batched[i] != plain[i], i


def metric(eng: LLMEngine, name: str, **labels: str) -> float | None:
    return eng.metrics.registry.get_sample_value(name, {"model_name": eng.model_name, **labels})


def test_achieved_sparsity_histogram_and_requests_by_method(
    tinystories_dir: Path, artifact: Path, plugin: SparsityPlugin, ref: Any, prompts: list[list[int]]
) -> None:
    """Each finished request observes its achieved sparsity once: the share of its decode's multiply-adds
    at the method's sites saved, each zero input entry weighed by the weight column it stands for
    (R-Sparse: less its low-rank cost), as the references count it over the same decode steps; requests
    are counted by method."""
    fresh = engine(tinystories_dir, artifact)
    p = prompts[2]
    n = fresh.model_info.intermediate_size
    refs = {
        "teal": lambda: HFTeal(ref, plugin.tables["teal"][40].cpu(), decode_only=True),
        "chess": lambda: chess_ref(plugin, ref, 0.4, decode_only=True),
        "r_sparse": lambda: rsparse_ref(plugin, ref, 0.4, decode_only=True),
        "coreinfer": lambda: HFCoreInfer(ref, core_size(0.4, n), TOKEN_FRACTION),
    }
    for method, make in refs.items():
        ours(fresh, [p], [spec(method, 0.4)], tag=method)
        with make() as h:
            hf_generate(ref, p, STEPS)
        expect = h.pooled()
        total = metric(fresh, "actserve_sparsity_achieved_ratio_sum", method=method)
        assert metric(fresh, "actserve_sparsity_achieved_ratio_count", method=method) == 1.0
        assert total is not None and abs(total - expect) < 1e-3, (method, total, expect)
        assert 0.3 < total < 0.5
        key = {"intervention": PLUGIN, "value": method}
        assert metric(fresh, "actserve_intervention_requests_total", **key) == 1.0


def test_artifact_sections_round_trip_and_bad_ones_are_refused(
    artifact: Path, tmp_path: Path, tinystories_dir: Path
) -> None:
    cal = load_calibration(artifact)
    assert (
        cal.chess is not None
        and cal.rsparse is not None
        and cal.info["methods"] == ["teal", "chess", "r_sparse"]
    )
    save_calibration(cal, tmp_path / "copy.safetensors")
    again = load_calibration(tmp_path / "copy.safetensors")
    assert again.chess is not None and again.rsparse is not None
    lv = levels()
    assert torch.equal(
        again.chess.thresholds(lv, again.counts, again.edges), cal.chess.thresholds(lv, cal.counts, cal.edges)
    )
    assert torch.equal(again.rsparse.thresholds(lv, again.edges), cal.rsparse.thresholds(lv, cal.edges))
    assert torch.equal(again.rsparse.ranks(lv), cal.rsparse.ranks(lv))
    for a, b in ((again.allocation, cal.allocation), (again.chess.allocation, cal.chess.allocation)):
        assert a is not None and b is not None and torch.equal(a, b)
    t = cal.chess.thresholds(lv, cal.counts, cal.edges)
    # q, o and the FFN's lambda are set at the top, none at 0 (a site's threshold may fall as the level
    # rises, where the sparsity upstream shrinks its inputs); the down input's threshold is what the
    # allocation adds beyond the channel mask's zeros, and may fall back to 0
    assert t[0].eq(0).all() and (t >= 0).all() and (t[-1, :, :3] > 0).all() and (t[40] > 0).any(dim=-1).all()
    assert cal.chess.allocation is not None and (cal.chess.allocation[1:] >= cal.chess.allocation[:-1]).all()
    bad = cal.chess
    cal.chess = type(bad)(bad.up_mean[:, :5], bad.counts, bad.grid, bad.quantiles)
    cal.chess.counts = bad.counts[:1]
    save_calibration(cal, tmp_path / "bad.safetensors")
    with pytest.raises(ArtifactError, match="chess"):
        load_calibration(tmp_path / "bad.safetensors")
    cal.chess, cal.rsparse = None, None  # TEAL only: the other calibrated methods are refused
    save_calibration(cal, tmp_path / "teal.safetensors")
    only = engine(tinystories_dir, tmp_path / "teal.safetensors", num_kv_blocks=64)
    with pytest.raises(InterventionError, match="has no chess tables") as e:
        only.registry.prepare(spec("chess", 0.5))
    assert e.value.param == f"interventions.{PLUGIN}"
    assert only.registry.prepare(spec("coreinfer", 0.5))  # needs no calibration


def test_slots_are_returned_and_their_exhaustion_is_a_capacity_error(
    eng: LLMEngine, plugin: SparsityPlugin
) -> None:
    """CoreInfer's core tables have fewer slots than requests; running out is a 503-type error; a request
    whose later intervention is refused gives its sparsity slot back."""
    free, free_core = len(plugin._free), len(plugin._free_core)
    held = [eng.registry.prepare(spec("coreinfer", 0.5)) for _ in range(free_core)]
    with pytest.raises(InterventionCapacityError, match="CoreInfer"):
        eng.registry.prepare(spec("coreinfer", 0.5))
    for plans in held:
        eng.registry.release(plans)
    with pytest.raises(InterventionError):
        eng.registry.prepare({**spec("teal", 0.5), "no_such_plugin": {}})
    assert (len(plugin._free), len(plugin._free_core)) == (free, free_core)
    off = SparsityPlugin(eng.model_info)
    off.configure({"coreinfer_slots": 0})
    assert off.core is None
    with pytest.raises(InterventionError, match="CoreInfer is off"):
        off.prepare(off.parse(spec("coreinfer", 0.5)[PLUGIN], "p"), "p")
    with pytest.raises(ValueError, match="coreinfer_slots"):
        off.configure({"coreinfer_slots": -1})
