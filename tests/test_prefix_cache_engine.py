"""Prefix caching in the engine (CPU float32, TinyStories): a hit gives a miss's tokens and logits; the
key keeps prompt-phase interventions apart (and lets generation-only ones share); eviction and preemption
keep every output right; the counters and `cached_tokens` move by exactly the reused tokens. The
reference is the same engine with the cache off (the native path itself is checked against transformers
elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from tests.conftest import start_server
from tests.engine_utils import capture_logits, greedy, run

BS = 4
STEPS = 6


def engine(tinystories_dir: Path, caching: bool = True, blocks: int = 256, **kw: Any) -> LLMEngine:
    cfg = EngineConfig(
        model=str(tinystories_dir), device="cpu", block_size=BS, num_kv_blocks=blocks,
        enable_prefix_caching=caching, **kw,
    )  # fmt: skip
    return LLMEngine(cfg)


@pytest.fixture(scope="module")
def prompt(tinystories_dir: Path) -> list[int]:
    g = torch.Generator().manual_seed(5)
    return torch.randint(10, 500, (30,), generator=g).tolist()


def steer(scale: float, phases: list[str]) -> dict[str, Any]:
    d = (torch.randn(128, generator=torch.Generator().manual_seed(9)) * 2).tolist()
    return {"steering": {"vectors": [{"directions": {"1": d}, "scale": scale, "phases": phases}]}}


def go(eng: LLMEngine, prompts: list[list[int]], specs: list[Any] | None, tag: str) -> tuple[list, dict, int]:
    """Tokens, captured logits and the prefix-cache hits this run added."""
    hits0 = eng.blocks.hits
    with capture_logits() as seen:
        out = run(eng, prompts, greedy(STEPS), interventions=specs, tag=tag)
    return out, seen, eng.blocks.hits - hits0


def test_hit_equals_miss_and_counts_exact_tokens(tinystories_dir: Path, prompt: list[int]) -> None:
    eng = engine(tinystories_dir)
    miss, miss_seen, hits = go(eng, [prompt], None, "a")
    assert hits == 0 and eng.blocks.queries == len(prompt)
    hit, hit_seen, hits = go(eng, [prompt], None, "b")
    assert hits == (len(prompt) - 1) // BS * BS == 28  # every full block before the last prompt token
    assert eng.blocks.queries == 2 * len(prompt)
    assert hit == miss
    for x, y in zip(hit_seen["b0"], miss_seen["a0"], strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    longer = prompt + [7, 8, 9, 10, 11]  # shares the first 28 tokens' blocks (and now 32)
    _, _, hits = go(eng, [longer], None, "c")
    assert hits == 28
    cold, _, _ = go(engine(tinystories_dir, caching=False), [longer], None, "d")
    assert go(eng, [longer], None, "e")[0] == cold


def test_prompt_phase_interventions_key_the_cache(tinystories_dir: Path, prompt: list[int]) -> None:
    eng, off = engine(tinystories_dir), engine(tinystories_dir, caching=False)
    both, gen = steer(4.0, ["prompt", "generation"]), steer(4.0, ["generation"])
    out, _, hits = go(eng, [prompt], [both], "s1")  # steered first: nothing to reuse
    assert hits == 0 and out == go(off, [prompt], [both], "r1")[0]
    out, _, hits = go(eng, [prompt], None, "p1")  # plain after steered: must not reuse steered KV
    assert hits == 0 and out == go(off, [prompt], None, "r2")[0]
    out, _, hits = go(eng, [prompt], [both], "s2")  # the same steering: its own blocks
    assert hits == 28 and out == go(off, [prompt], [both], "r3")[0]
    out, _, hits = go(eng, [prompt], [steer(5.0, ["prompt"])], "s3")  # another scale: no reuse
    assert hits == 0
    out, _, hits = go(eng, [prompt], [gen], "g1")  # generation-only: the plain prompt's KV is right
    assert hits == 28 and out == go(off, [prompt], [gen], "r4")[0]
    assert out != go(off, [prompt], None, "r5")[0]  # and the steering still acts


def test_eviction_and_preemption_keep_outputs(tinystories_dir: Path) -> None:
    """A KV cache too small for the batch: cached blocks are evicted and sequences preempted while
    prompts share prefixes; every output equals the cache-off engine's with plenty of blocks."""
    g = torch.Generator().manual_seed(11)
    base = torch.randint(10, 500, (24,), generator=g).tolist()
    prompts = [base[: 12 + 2 * i] + torch.randint(10, 500, (5,), generator=g).tolist() for i in range(6)]
    eng = engine(tinystories_dir, blocks=24, max_num_seqs=6, max_model_len=64)
    ref = engine(tinystories_dir, caching=False)
    want = run(ref, prompts, greedy(16), tag="w")
    for rnd in range(3):
        assert run(eng, prompts, greedy(16), tag=f"x{rnd}") == want, rnd
    assert eng.scheduler.num_preemptions > 0
    assert eng.blocks.hits > 0
    assert eng.blocks.num_free == eng.blocks.num_blocks  # every reference returned


def test_cached_tokens_in_usage_and_metrics(tinystories_dir: Path) -> None:
    server = start_server(tinystories_dir, device="cpu", block_size=BS, num_kv_blocks=128)
    try:
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        body = {
            "model": model,
            "prompt": "Once upon a time, there was a little girl named Lily. She",
            "max_tokens": 3,
            "temperature": 0,
        }
        first = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        second = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        n = first["usage"]["prompt_tokens"]
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // BS * BS
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        metrics = httpx.get(f"{server.url}/metrics").text
        values = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("actserve_prefix_cache_")
        }
        assert values["actserve_prefix_cache_queries_total"] == 2 * n
        assert values["actserve_prefix_cache_hits_total"] == (n - 1) // BS * BS
    finally:
        server.stop()


def test_prompt_logprobs_of_a_cached_prompt_are_whole(tinystories_dir: Path, prompt: list[int]) -> None:
    """A cached block keeps K/V, not its tokens' logits: a request asking for prompt logprobs of a prompt
    already cached gets every position, equal to an uncached server's, and reuses no block."""
    from actserve.server.engine.offline import make_sequences, run_sequences

    def logprobs(eng: LLMEngine, tag: str) -> tuple[list[Any], int]:
        hits0 = eng.blocks.hits
        (seq,) = make_sequences(eng, [prompt], greedy(2, prompt_logprobs=1), tag=tag)
        run_sequences(eng, [seq])
        assert seq.prompt_logprobs is not None and len(seq.prompt_logprobs) == len(prompt)
        return seq.prompt_logprobs, eng.blocks.hits - hits0

    eng = engine(tinystories_dir)
    run(eng, [prompt], greedy(2), tag="warm")  # the prompt's blocks are now cached
    got, hits = logprobs(eng, "lp")
    want, _ = logprobs(engine(tinystories_dir, caching=False), "cold")
    assert hits == 0 and got[0] is None and want[0] is None
    for a, b in zip(got[1:], want[1:], strict=True):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5
    assert go(eng, [prompt], None, "after")[2] > 0  # plain requests still hit
