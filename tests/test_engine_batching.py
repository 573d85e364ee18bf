"""Continuous batching: results do not depend on batch company, preemption, or arrival time."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.outputs import RequestRejected, check_fits
from actserve.server.engine.sequence import Sequence
from tests.engine_utils import greedy, run

TEXTS = [
    "Once upon a time, there was a little girl named",
    "The dog ran to the park and",
    "Tom had a red ball. He",
    "One day, a big bird",
    "Lily and her mom went to the store to buy",
    "There was a cat who liked to sleep in the sun. One day",
    "Max found a shiny stone",
    "The little fish swam",
]


@pytest.fixture(scope="module")
def prompts(tinystories_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    return [tok.encode(t) for t in TEXTS]


def engine(model_dir: Path, **kw: object) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), **kw))  # type: ignore[arg-type]


def test_concurrent_equals_alone(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    eng = engine(tinystories_dir, num_kv_blocks=256)
    alone = [run(eng, [p], greedy(40), tag=f"a{i}-")[0] for i, p in enumerate(prompts)]
    together = run(eng, prompts, greedy(40), tag="t")
    assert together == alone
    assert len({tuple(t) for t in together}) == len(prompts)  # really different requests


def test_preemption_keeps_results(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    """Too few KV blocks for everyone: sequences get preempted, recomputed, and still match."""
    big = engine(tinystories_dir, num_kv_blocks=256, block_size=8, max_model_len=160)
    long_prompt = sum(prompts, [])[:100]
    batch = [long_prompt] + prompts
    alone = [run(big, [p], greedy(50), tag=f"a{i}-")[0] for i, p in enumerate(batch)]
    small = engine(tinystories_dir, num_kv_blocks=24, block_size=8, max_model_len=160)
    together = run(small, batch, greedy(50), tag="p")
    assert small.scheduler.num_preemptions > 0
    assert together == alone
    assert small.blocks.num_free == small.blocks.num_blocks  # every block came back


def test_new_request_joins_running_batch(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    eng = engine(tinystories_dir, num_kv_blocks=256)
    first = Sequence("first", prompts[0], greedy(30), [])
    eng.add(first)
    for _ in range(3):
        eng.step()
    assert len(first.output_token_ids) == 3
    eng.add(Sequence("second", prompts[1], greedy(30), []))
    outs = {o.seq_id for o in eng.step()}
    assert outs == {"first", "second"}  # the newcomer prefilled in the same step as the decode
    assert len(first.output_token_ids) == 4


def test_max_num_seqs_bounds_the_batch(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    eng = engine(tinystories_dir, num_kv_blocks=256, max_num_seqs=3)
    for i, p in enumerate(prompts):
        eng.add(Sequence(f"s{i}", p, greedy(5), []))
    sizes = []
    while eng.has_work():
        eng.step()
        sizes.append(len(eng.scheduler.running))
    assert max(sizes) == 3


def test_never_fitting_request_is_rejected(tinystories_dir: Path) -> None:
    eng = engine(tinystories_dir, num_kv_blocks=256, max_model_len=64)
    with pytest.raises(RequestRejected) as e:
        check_fits(eng.max_model_len, 60, 10)
    assert e.value.param == "max_tokens" and "64" in str(e.value)
    with pytest.raises(RequestRejected) as e:
        check_fits(eng.max_model_len, 65, None)
    assert e.value.param == "prompt"
    assert check_fits(eng.max_model_len, 10, None) == 54
    # the engine trusts checked sequences; one that was not is refused at `add` (its request only fails)
    for bad in ([1] * 60, [1] * 65, []):
        with pytest.raises(RequestRejected, match="not checked against the context"):
            eng.add(Sequence("bad", bad, greedy(10), []))
    with pytest.raises(RequestRejected):
        eng.add(Sequence("none", [1] * 4, greedy(None), []))  # type: ignore[arg-type]
    assert not eng.has_work()
    eng.add(Sequence("ok", [1] * 4, greedy(10), []))
    assert eng.has_work()


def test_abort_frees_blocks(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    eng = engine(tinystories_dir, num_kv_blocks=64)
    eng.add(Sequence("x", prompts[0], greedy(100), []))
    eng.step()
    assert eng.blocks.num_free < eng.blocks.num_blocks
    out = eng.abort("x")
    assert out is not None and out.finish_reason == "abort"
    assert eng.blocks.num_free == eng.blocks.num_blocks and not eng.has_work()
