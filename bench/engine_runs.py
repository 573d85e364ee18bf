"""Drive an in-process LLMEngine the way the server does (add, then step until done) and time it."""

from __future__ import annotations

import time
from typing import Any

import torch

from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.offline import make_sequences, run_sequences
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence

_counter = [0]


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=g).tolist()


def generate(
    engine: LLMEngine,
    prompts: list[list[int]],
    max_tokens: int,
    interventions: list[dict[str, Any] | None] | None = None,
    step_ms: list[float] | None = None,
) -> tuple[float, list[list[int]]]:
    """Submit everything at once, run to completion; (seconds, output tokens per prompt).

    Intervention specs are validated and prepared before the clock starts: in the server that happens
    on the API thread, per request, not in the engine loop being measured here."""
    _counter[0] += 1
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    seqs = make_sequences(engine, prompts, params, interventions, tag=f"b{_counter[0]}-")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = run_sequences(engine, seqs, step_ms)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, outs


def time_to_first_token(engine: LLMEngine, prompt: list[int]) -> float:
    """Seconds from submission to the first sampled token of one request on an idle engine."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _counter[0] += 1
    engine.add(Sequence(f"t{_counter[0]}", prompt, SamplingParams(max_tokens=1, temperature=0.0), []))
    while engine.has_work():
        if engine.step():
            break
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    while engine.has_work():
        engine.step()
    return dt
