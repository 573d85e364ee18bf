"""kv_retrieval in the engine (docs/architecture.md §10, "KV retrieval"; docs/api.md): on TinyStories with
4-token KV blocks (blocks fill and leave the window within a few steps), prompts prefilled in chunks.

- a budget that covers the whole context changes nothing: each method equals full attention (logits to
  1e-5, tokens), also with the host tier on (cold blocks offloaded and recalled every step);
- a small budget acts, and a batch mixing methods, budgets and a plain row equals each request alone;
- with the host tier a small budget reads what it reads without it (tokens and logits bit for bit): each
  layer's chosen cold blocks come back within the step; its copies are bit-exact and its accounting
  (blocks by tier, bytes, blocks recalled) adds up;
- bad specs are 400s naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from actserve.interventions.base import InterventionError
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.kv_tier import HostTier
from actserve.server.engine.llm_engine import LLMEngine
from tests.conftest import start_server
from tests.engine_utils import greedy, run_logged

BS = 4
STEPS = 12
METHODS = ("actqkv", "infllm", "quest")


def engine(model_dir: Path, **kw: Any) -> LLMEngine:
    # no prefix cache: runs of the same prompt are compared bit for bit across configurations
    cfg: dict[str, Any] = {
        "device": "cpu",
        "num_kv_blocks": 256,
        "block_size": BS,
        "enable_prefix_caching": False,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 24,  # prompts of 60-90 tokens prefill in chunks
        **kw,
    }
    return LLMEngine(EngineConfig(model=str(model_dir), **cfg))


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path) -> LLMEngine:
    return engine(tinystories_dir)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 2000, (n,), generator=g).tolist() for n in (90, 61, 77, 70)]


def spec(method: str, budget: int, sink: int = 4, window: int = 8, lag: int = 1) -> dict[str, Any]:
    return {
        "kv_retrieval": {
            "method": method,
            "budget_tokens": budget,
            "sink_tokens": sink,
            "window_tokens": window,
            "lag": lag,
        }
    }


def logits_close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all((x - y).abs().max().item() < tol for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def plain(eng: LLMEngine, prompts: list[list[int]]) -> tuple[list[int], list[torch.Tensor]]:
    (tokens,), seen = run_logged(eng, [prompts[0]], greedy(STEPS), [None], "plain")
    return tokens, seen["plain0"]


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("method", METHODS)
def test_covering_budget_equals_full_attention(
    eng: LLMEngine, prompts: list[list[int]], plain: tuple[list[int], list[torch.Tensor]], method: str,
    lag: int,
) -> None:  # fmt: skip
    """Also one step stale (lag 1): the window is current, a covered context reads its whole table."""
    specs = [spec(method, 4096, lag=lag)]
    (tokens,), seen = run_logged(eng, [prompts[0]], greedy(STEPS), specs, f"c{method}{lag}")
    assert tokens == plain[0]
    assert logits_close(seen[f"c{method}{lag}0"], plain[1])


def test_small_budget_acts_and_mixed_batch_equals_solo(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """actqkv, quest and infllm rows of different budgets, windows and lags beside a plain row (all four
    prompts prefilled in chunks in the same steps) == each request alone (tokens; logits to 1e-4, the
    float32 rounding of batched matmuls, which the plain row shows as much), and != full attention."""
    specs = [spec("actqkv", 32), None, spec("quest", 40, sink=8, window=4, lag=0), spec("infllm", 28, sink=0)]
    batched, seen = run_logged(eng, prompts, greedy(STEPS), specs, "m")
    for i, (p, s) in enumerate(zip(prompts, specs, strict=True)):
        (solo,), solo_seen = run_logged(eng, [p], greedy(STEPS), [s], f"s{i}_")
        assert batched[i] == solo, i
        assert logits_close(seen[f"m{i}"], solo_seen[f"s{i}_0"], 1e-4), i
        if s is not None:
            _, full = run_logged(eng, [p], greedy(STEPS), [None], f"f{i}_")
            assert not logits_close(seen[f"m{i}"], full[f"f{i}_0"], 1e-3), i  # retrieval acted


def test_host_tier_with_covering_budget_equals_full_attention(
    tinystories_dir: Path, prompts: list[list[int]], plain: tuple[list[int], list[torch.Tensor]]
) -> None:
    """Cold blocks move to the host after the first decode step and come back (recalled into the slot's
    reserved blocks) for every step that chose them: with a budget covering the context every block is
    chosen, so the output is full attention's; the accounting returns to zero once the request ends."""
    eng = engine(tinystories_dir, kv_offload_gb=0.001)
    tier, blocks = eng.host_tier, eng.blocks
    assert tier is not None and blocks.num_host_blocks > 0
    held: list[tuple[int, int]] = []
    step = eng.step

    def spy() -> Any:
        out = step()
        held.append((blocks.num_gpu_used, blocks.num_host_used))
        return out

    eng.step = spy  # type: ignore[method-assign]
    for method in METHODS:
        (tokens,), seen = run_logged(eng, [prompts[0]], greedy(STEPS), [spec(method, 4096)], f"o{method}")
        assert tokens == plain[0], method
        assert logits_close(seen[f"o{method}0"], plain[1]), method
    assert tier.bytes_to_host > 0 and tier.bytes_to_device > 0
    assert max(h for _, h in held) > 0  # blocks lived on the host ...
    ctx = -(-(len(prompts[0]) + STEPS) // BS)
    assert all(g + h <= ctx + 1 for g, h in held)  # ... instead of on the GPU, never both
    assert blocks.num_host_used == 0 and blocks.num_gpu_used == 0
    text = eng.metrics.registry.get_sample_value
    assert (
        text("actserve_kv_transfer_bytes_total", {"model_name": eng.model_name, "direction": "to_host"}) > 0
    )
    assert text("actserve_intervention_stat_total", {
        "model_name": eng.model_name, "intervention": "kv_retrieval", "stat": "recalled_blocks",
    }) > 0  # fmt: skip


def test_host_tier_with_small_budget_equals_no_tier(
    eng: LLMEngine, tinystories_dir: Path, prompts: list[list[int]]
) -> None:
    """With a small budget each layer reads the blocks it chooses at this step, the cold ones recalled
    from the host into its slot's reserved blocks: a mixed batch gives the tokens and logits of the same
    batch without the tier (the same K/V in the same order) and frees every block of both tiers. Lag 1
    rows (actqkv, infllm) recall the next step's blocks after the layer's attention; a lag 0 row (quest)
    beside them recalls within the step."""
    specs = [spec("actqkv", 32), None, spec("quest", 40, sink=8, window=4, lag=0), spec("infllm", 28, sink=0)]
    want, want_seen = run_logged(eng, prompts, greedy(STEPS), specs, "u")
    tiered = engine(tinystories_dir, kv_offload_gb=0.001)
    out, seen = run_logged(tiered, prompts, greedy(STEPS), specs, "u")
    assert out == want
    for i in range(4):
        assert all(torch.equal(a, b) for a, b in zip(seen[f"u{i}"], want_seen[f"u{i}"], strict=True)), i
    tier = tiered.host_tier
    assert tier is not None and tier.bytes_to_device > 0
    plugin = tiered.registry.plugin("kv_retrieval")
    assert plugin is not None
    stats = plugin.stats()
    assert 0 < stats["recalled_blocks"] < stats["retrieved_blocks"]  # a block held is not copied again
    assert tier.bytes_to_device == stats["recalled_blocks"] * tier.layer_block_bytes
    assert tiered.blocks.num_host_used == 0 and tiered.blocks.num_gpu_used == 0


def test_host_tier_round_trip_is_bit_exact() -> None:
    g = torch.Generator().manual_seed(2)
    caches = [torch.randn(2, 12 * BS, 3, 8, generator=g) for _ in range(2)]
    before = [c.clone() for c in caches]
    tier = HostTier(caches, BS, num_blocks=6, host_base=100)
    tier.offload([2, 5, 7], [100, 101, 104])
    for c in caches:
        c.zero_()

    def ids(*x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32)

    # layer 1: host blocks 104 and 100 into GPU blocks 9 and 11 (one row); layer 0: 101 into 3
    tier.recall(1, ids([104, 100]), ids([9, 11]), torch.tensor([2], dtype=torch.int32))
    tier.recall(0, ids([101, 0], [0, 0]), ids([3, 0], [0, 0]), torch.tensor([1, 0], dtype=torch.int32))
    view = [c.view(2, -1, BS, 3, 8) for c in caches]
    was = [c.view(2, -1, BS, 3, 8) for c in before]
    assert torch.equal(view[1][:, 9], was[1][:, 7]) and torch.equal(view[0][:, 3], was[0][:, 5])
    assert torch.equal(view[1][:, 11], was[1][:, 2])
    assert int(view[0].count_nonzero()) == int(view[0][:, 3].numel())  # nothing else was written
    assert (
        tier.bytes_to_host == 3 * 2 * tier.layer_block_bytes
        and tier.bytes_to_device == 3 * tier.layer_block_bytes
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"method": "streaming"}, "interventions.kv_retrieval.method"),
        ({"budget_tokens": 2}, "interventions.kv_retrieval.budget_tokens"),
        ({"budget_tokens": 10**6}, "interventions.kv_retrieval.budget_tokens"),
        (
            {"budget_tokens": 64, "sink_tokens": 32, "window_tokens": 32},
            "interventions.kv_retrieval.budget_tokens",
        ),
        ({"sink_tokens": -1}, "interventions.kv_retrieval.sink_tokens"),
        ({"window_tokens": 0}, "interventions.kv_retrieval.window_tokens"),
        ({"budget_tokens": "2048"}, "interventions.kv_retrieval.budget_tokens"),
        ({"top_k": 3}, "interventions.kv_retrieval.top_k"),
        ({"lag": 2}, "interventions.kv_retrieval.lag"),
        ({"lag": -1}, "interventions.kv_retrieval.lag"),
        ({"lag": "1"}, "interventions.kv_retrieval.lag"),
    ],
)
def test_bad_specs_name_the_field(eng: LLMEngine, body: dict[str, Any], field: str) -> None:
    with pytest.raises(InterventionError) as err:
        eng.registry.prepare({"kv_retrieval": body})
    assert err.value.param == field
    if body.get("lag") in (2, -1):  # the allowed values are named
        assert "must be 0" in str(err.value) and "or 1" in str(err.value)
    assert field.rsplit(".", 1)[-1] in str(err.value)


def test_budget_error_explains_the_rounding(eng: LLMEngine) -> None:
    """sink 30 -> 8 blocks, window 37 -> 10 blocks (rounded up), so the budget needs 19 blocks; 79 tokens
    round down to 19 blocks, 75 to 18."""
    with pytest.raises(InterventionError, match=r"at least 76: .* whole KV blocks of 4 tokens .*down: 18"):
        eng.registry.prepare({"kv_retrieval": {"budget_tokens": 75, "sink_tokens": 30, "window_tokens": 37}})
    plans = eng.registry.prepare(
        {"kv_retrieval": {"budget_tokens": 79, "sink_tokens": 30, "window_tokens": 37}}
    )
    plan = plans["kv_retrieval"]
    assert (plan.sink, plan.window, plan.retrieve) == (8, 10, 1)
    eng.registry.release(plans)


def test_http_bad_spec_is_400_and_good_spec_generates(tinystories_dir: Path) -> None:
    server = start_server(tinystories_dir, num_kv_blocks=256, engine_process="off")
    try:
        url = f"{server.url}/v1/completions"
        bad = {
            "prompt": "Once upon a time",
            "max_tokens": 4,
            "interventions": {"kv_retrieval": {"budget_tokens": 1}},
        }
        r = httpx.post(url, json=bad, timeout=60)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "interventions.kv_retrieval.budget_tokens"
        ask = {"method": "quest", "budget_tokens": 64, "sink_tokens": 16, "window_tokens": 16}
        good = {**bad, "interventions": {"kv_retrieval": ask}}
        r = httpx.post(url, json=good, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
