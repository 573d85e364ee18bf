"""Run a batch of sequences to completion on an in-process engine (benchmarks, evaluation, vector
building): everything is submitted at once and the engine batches it continuously, as the server does."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from actserve.server.engine.engine_client import EngineRequestError
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.outputs import check_fits
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence


def make_sequences(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    interventions: list[dict[str, Any] | None] | None = None,
    tag: str = "g",
) -> list[Sequence]:
    """One sequence per prompt, checked against the context (raises RequestRejected), interventions
    validated and prepared (raises InterventionError)."""
    seqs = []
    for i, p in enumerate(prompts):
        resolved = dataclasses.replace(
            params, max_tokens=check_fits(engine.max_model_len, len(p), params.max_tokens)
        )
        plans = engine.registry.prepare(interventions[i] if interventions else None)
        seqs.append(Sequence(f"{tag}{i}", list(p), resolved, [], interventions=plans))
    return seqs


def run_sequences(
    engine: LLMEngine,
    seqs: list[Sequence],
    step_ms: list[float] | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[list[int]]:
    """Add all, step until the engine is idle; each sequence's generated token ids. `step_ms` receives
    every step's wall time (benchmarks: prefill vs steady decode); `progress(n)` hears of the n tokens
    each step made (a progress bar). A sequence the engine failed raises EngineRequestError once the
    others are done (the engine itself goes on)."""
    for seq in seqs:
        engine.add(seq)
    out: dict[str, list[int]] = {s.seq_id: [] for s in seqs}
    errors: list[str] = []
    while engine.has_work():
        t = time.perf_counter()
        made = 0
        for o in engine.step():
            out[o.seq_id].extend(o.token_ids)
            made += len(o.token_ids)
            if o.error is not None:
                errors.append(f"{o.seq_id}: {o.error}")
        if step_ms is not None:
            step_ms.append(1e3 * (time.perf_counter() - t))
        if progress is not None:
            progress(made)
    if errors:
        raise EngineRequestError("; ".join(errors))
    return [out[s.seq_id] for s in seqs]


def generate(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    interventions: list[dict[str, Any] | None] | None = None,
    tag: str = "g",
) -> list[list[int]]:
    return run_sequences(engine, make_sequences(engine, prompts, params, interventions, tag))
