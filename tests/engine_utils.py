"""Helpers for engine-level tests: run sequences to completion and capture the logits the sampler saw."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from actserve.server.engine import model_runner
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.offline import generate
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def run(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    interventions: list[dict[str, Any] | None] | None = None,
    tag: str = "r",
) -> list[list[int]]:
    """Submit all prompts at once and step until done; returns each sequence's output tokens."""
    return generate(engine, prompts, params, interventions, tag)


@contextmanager
def capture_logits() -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record, per sequence id, the logits row the sampler received at each step."""
    seen: dict[str, list[torch.Tensor]] = {}
    original = model_runner.launch_sampling

    def spy(logits: torch.Tensor, seqs: list[Sequence]) -> Any:
        for row, seq in zip(logits, seqs, strict=True):
            seen.setdefault(seq.seq_id, []).append(row.detach().clone())
        return original(logits, seqs)

    model_runner.launch_sampling = spy
    try:
        yield seen
    finally:
        model_runner.launch_sampling = original


def run_logged(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    interventions: list[dict[str, Any] | None] | None = None,
    tag: str = "r",
) -> tuple[list[list[int]], dict[str, list[torch.Tensor]]]:
    """`run`, with the logits rows the sampler saw per sequence id (`capture_logits`)."""
    with capture_logits() as seen:
        out = run(engine, prompts, params, interventions, tag)
    return out, seen


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `cond` until it holds or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()
