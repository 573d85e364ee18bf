"""The runner's collect mode (the one forward driver for residual reads and teacher-forced logits): on a
live engine it borrows free KV blocks and gives every one back, and the running sequences decode exactly
as they would without it (greedy, CPU float32, exact logits)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from actserve.interventions.steering.hidden import collect_residuals
from actserve.interventions.steering.train import TrainingError, train_vector
from actserve.server.api.errors import APIError
from actserve.server.api.steering_train_route import _residuals
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.model_runner import NotEnoughBlocks
from actserve.server.engine.offline import make_sequences
from tests.engine_utils import capture_logits, greedy, run

STORY = "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog. "


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64))


def kv_at(eng: LLMEngine, blocks: list[int]) -> list[torch.Tensor]:
    bs = eng.block_size
    slots = (torch.tensor(blocks).unsqueeze(1) * bs + torch.arange(bs)).flatten()
    return [kv[:, slots].clone() for kv in eng.runner.kv_caches]


@pytest.fixture(scope="module", params=[False, True], ids=["sequential", "overlapped"])
def live(tinystories_dir: Path, request: pytest.FixtureRequest) -> LLMEngine:
    """Sequential steps (the CPU default) and overlapped ones (the CUDA default, forced on here): then a
    step is in flight, chained ahead, while collect runs between steps, as on a GPU server."""
    return LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64, overlap_steps=request.param))


def test_collect_on_a_live_engine_leaves_running_sequences_identical(live: LLMEngine) -> None:
    eng = live
    tok = eng.tokenizer
    prompts = [tok.encode(t) for t in ("Once upon a time", "The dog ran to the", "Tom and Sue went")]
    texts = [
        tok.encode(STORY * k) for k in (15, 20, 10, 25, 15, 20)
    ]  # 6 texts needing more blocks than are free
    layers = [0, 1]
    logit_positions = [range(5, len(t) - 1) for t in texts]
    with capture_logits() as seen:
        want = run(eng, prompts, greedy(24), tag="a")  # no collect call
        assert eng.blocks.num_free == eng.blocks.num_blocks
        seqs = make_sequences(eng, prompts, greedy(24), tag="b")
        out: dict[str, list[int]] = {s.seq_id: [] for s in seqs}
        for s in seqs:
            eng.add(s)
        for _ in range(4):  # prefill + 3 decode steps: every sequence holds blocks and is mid-generation
            for o in eng.step():
                out[o.seq_id].extend(o.token_ids)
        held = [b for s in seqs for b in s.block_table]
        assert held and all(not s.is_finished for s in seqs)
        assert (eng._inflight is not None) == eng.overlap  # overlapped: the next step is already launched
        free_before, held_kv = list(eng.blocks.free), kv_at(eng, held)
        free_kv = kv_at(eng, free_before)
        forwards = eng.runner.collect_forwards
        need = sum(-(-len(t) // eng.block_size) for t in texts)
        assert need > len(free_before)  # collect has to cut the call into several forwards
        got = eng.runner.collect(texts, layers, position="mean", logit_positions=logit_positions)
        assert eng.runner.collect_forwards - forwards >= 2
        assert list(eng.blocks.free) == free_before  # every borrowed block back, in the same order
        assert all(torch.equal(a, b) for a, b in zip(held_kv, kv_at(eng, held), strict=True))
        assert any(not torch.equal(a, b) for a, b in zip(free_kv, kv_at(eng, free_before), strict=True))
        while eng.has_work():
            for o in eng.step():
                out[o.seq_id].extend(o.token_ids)
    assert [out[s.seq_id] for s in seqs] == want
    for i in range(len(prompts)):
        assert len(seen[f"a{i}"]) == len(seen[f"b{i}"]) == 24
        assert all(torch.equal(x, y) for x, y in zip(seen[f"a{i}"], seen[f"b{i}"], strict=True))
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert (eng.chained_steps > 0) == eng.overlap

    # what collect read on the busy engine = the same call on the idle engine (other packing)
    assert got.residuals is not None and got.logits is not None
    assert got.residuals.shape == (len(texts), len(layers), eng.model_info.hidden_size)
    assert got.logits.shape == (sum(map(len, logit_positions)), eng.model_info.vocab_size)
    idle = eng.runner.collect(texts, layers, position="mean", logit_positions=logit_positions)
    assert idle.residuals is not None and idle.logits is not None
    assert torch.allclose(got.residuals, idle.residuals, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.logits, idle.logits, atol=1e-4, rtol=1e-5)
    # and one sequence per forward gives the same logits rows, in sequence order
    alone = torch.cat(
        [
            eng.runner.collect([t], logit_positions=[r]).logits
            for t, r in zip(texts, logit_positions, strict=True)
        ]
    )
    assert torch.allclose(idle.logits, alone, atol=1e-4, rtol=1e-5)


def test_collect_refuses_when_blocks_are_short_and_keeps_the_pool(eng: LLMEngine) -> None:
    tok = eng.tokenizer
    long, short = tok.encode(STORY * 5), tok.encode("A happy dog")
    assert len(long) > 2 * eng.block_size
    taken = eng.blocks.borrow(eng.blocks.num_free - 2)  # running requests hold all but 2 blocks
    try:
        free = list(eng.blocks.free)
        with pytest.raises(NotEnoughBlocks, match=r"needs \d+ KV blocks, but only 2 of 64 are free"):
            collect_residuals(eng.runner, [short, long], [0])
        assert list(eng.blocks.free) == free
        one = collect_residuals(eng.runner, [short, short], [1])  # fits: one forward per sequence
        assert list(eng.blocks.free) == free
    finally:
        eng.blocks.give_back(taken)
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert torch.equal(one[0], one[1])
    with pytest.raises(ValueError, match="out of range"):
        collect_residuals(eng.runner, [short], [2])
    with pytest.raises(ValueError, match="empty prompt"):
        collect_residuals(eng.runner, [short, []], [0])
    too_long = tok.encode(STORY * 60)
    assert len(too_long) > eng.max_model_len
    with pytest.raises(ValueError, match="maximum length of 512"):
        collect_residuals(eng.runner, [short, too_long], [0])
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_transformers_fallback_refuses_collect(tinystories_dir: Path) -> None:
    fb = LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64, force_transformers=True))
    with pytest.raises(NotImplementedError, match="native"):
        collect_residuals(fb.runner, [fb.tokenizer.encode("A dog")], [0])
    with pytest.raises(TrainingError) as e:  # the callers check first and name the field
        train_vector(fb.runner, fb.tokenizer, ["happy"], ["sad"])
    assert e.value.param == "model"


def test_training_route_answers_503_when_the_cache_is_full(eng: LLMEngine) -> None:
    class Client:  # run_in_engine as the thread front-end does it: on the engine, between steps
        async def run_in_engine(self, fn: Any, *args: Any) -> Any:
            return fn(eng, *args)

    prompts = [eng.tokenizer.encode(STORY * 5)]
    taken = eng.blocks.borrow(eng.blocks.num_free - 1)
    try:
        with pytest.raises(APIError) as e:
            asyncio.run(_residuals(Client(), prompts, [0], "last"))  # type: ignore[arg-type]
    finally:
        eng.blocks.give_back(taken)
    assert e.value.status == 503 and "only 1 of 64 are free" in e.value.message
    h, calls = asyncio.run(_residuals(Client(), prompts, [0], "last"))  # type: ignore[arg-type]
    assert calls == 1 and torch.equal(h, collect_residuals(eng.runner, prompts, [0]))
