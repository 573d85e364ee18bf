"""Overlapped and chained engine steps (the CUDA default) give exactly the sequential engine's outputs.

Forced on for the CPU here: step N+1 is launched before step N is post-processed, and a chained step
takes its input tokens from the previous step's sampled tensor before they reach the host."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence
from tests.engine_utils import greedy, run

TEXTS = [
    "Once upon a time, there was a",
    "The dog ran to the",
    "Tom had a red ball. He",
    "One day, a big bird",
]


@pytest.fixture(scope="module")
def prompts(tinystories_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    return [tok.encode(t) for t in TEXTS]


def engines(model_dir: Path, **kw: object) -> tuple[LLMEngine, LLMEngine]:
    make = lambda overlap: LLMEngine(EngineConfig(model=str(model_dir), overlap_steps=overlap, **kw))  # noqa: E731
    return make(False), make(True)


def texts(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple]:
    seqs = [Sequence(f"s{i}", p, q, []) for i, (p, q) in enumerate(zip(prompts, params, strict=True))]
    for s in seqs:
        engine.add(s)
    outs: dict[str, list] = {s.seq_id: [] for s in seqs}
    while engine.has_work():
        for o in engine.step():
            outs[o.seq_id].append(o)
    result = []
    for s in seqs:
        chunks = outs[s.seq_id]
        result.append(
            (
                "".join(c.text for c in chunks),
                sum((c.token_ids for c in chunks), []),
                chunks[-1].finish_reason,
            )
        )
    return result


def test_greedy_and_steering_unchanged(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    seq_engine, ovl_engine = engines(tinystories_dir, num_kv_blocks=128, block_size=8)
    d = [0.2 * ((i * 37) % 11 - 5) for i in range(128)]
    specs = [None, {"steering": {"vectors": [{"directions": {"1": d}, "scale": 4.0}]}}, None, None]
    assert run(ovl_engine, prompts, greedy(40), specs) == run(seq_engine, prompts, greedy(40), specs)
    assert ovl_engine.chained_steps > 0
    assert ovl_engine.blocks.num_free == ovl_engine.blocks.num_blocks


def test_stops_and_sampling_unchanged(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    seq_engine, ovl_engine = engines(tinystories_dir, num_kv_blocks=128)
    params = [
        SamplingParams(max_tokens=60, temperature=0.0),  # may stop on EOS
        SamplingParams(max_tokens=30, temperature=0.0, stop=[" the", "."]),  # stop string ends it late
        SamplingParams(max_tokens=25, temperature=0.8, seed=3),  # seeded sampling across chained steps
        SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.3),  # never chained
    ]
    want = texts(seq_engine, prompts, params)
    got = texts(ovl_engine, prompts, params)
    assert got == want
    assert want[1][2] == "stop"


def test_preemption_with_overlap(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    batch = prompts * 3
    seq_engine, _ = engines(tinystories_dir, num_kv_blocks=256, block_size=8, max_model_len=96)
    _, small = engines(tinystories_dir, num_kv_blocks=14, block_size=8, max_model_len=96)
    assert run(small, batch, greedy(40)) == run(seq_engine, batch, greedy(40))
    assert small.scheduler.num_preemptions > 0
