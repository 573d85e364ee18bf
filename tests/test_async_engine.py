"""AsyncEngine: deltas that pile up for a slow consumer arrive merged, and nothing is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from transformers import AutoTokenizer

from actserve.server.engine.async_engine import AsyncEngine
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.sequence import Sequence
from tests.engine_utils import greedy, run


def test_slow_consumer_gets_merged_deltas(tinystories_dir: Path) -> None:
    prompt = AutoTokenizer.from_pretrained(tinystories_dir).encode("Once upon a time")
    reference = run(
        LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64)), [prompt], greedy(40)
    )[0]
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64)))

    async def consume() -> tuple[list[int], str, int]:
        tokens, text, chunks = [], "", 0
        async for out in engine.generate(Sequence("slow", prompt, greedy(40), [])):
            tokens += out.token_ids
            text += out.text
            chunks += 1
            await asyncio.sleep(0.05)  # slower than the engine produces tokens
        return tokens, text, chunks

    try:
        tokens, text, chunks = asyncio.run(consume())
    finally:
        engine.shutdown()
    assert tokens == reference
    assert text == engine.engine.tokenizer.decode(reference)
    assert chunks < 40  # backlog was merged
