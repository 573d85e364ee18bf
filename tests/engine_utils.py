"""Helpers for engine-level tests: run sequences to completion, capture the logits the sampler saw, and
the transformers reference with some projections' weights swapped (what a weight format should compute)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
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


# our projection -> transformers' (block, modules packed into it, in order)
HF_MODULES = {
    "qkv_proj": ("self_attn", ["q_proj", "k_proj", "v_proj"]),
    "o_proj": ("self_attn", ["o_proj"]),
    "gate_up_proj": ("mlp", ["gate_proj", "up_proj"]),
    "down_proj": ("mlp", ["down_proj"]),
}


@contextmanager
def hf_swapped(
    ref: Any, sites: Iterable[tuple[int, str]], make: Callable[[torch.Tensor, int, str], torch.Tensor]
) -> Iterator[None]:
    """transformers with each (layer, projection)'s weight W replaced by make(W, layer, projection); W is
    the packed matrix our layer holds ([q; k; v], [gate; up]), and the result is split back into parts."""
    saved: list[tuple[list[Any], list[torch.Tensor]]] = []
    try:
        for layer, proj in sites:
            block, names = HF_MODULES[proj]
            mods = [getattr(getattr(ref.model.layers[layer], block), n) for n in names]
            old = [m.weight.data for m in mods]
            saved.append((mods, old))
            w = make(torch.cat(old), layer, proj)
            for m, part in zip(mods, w.split([t.shape[0] for t in old]), strict=True):
                m.weight.data = part.contiguous()
        yield
    finally:
        for mods, old in saved:
            for m, t in zip(mods, old, strict=True):
                m.weight.data = t


def assert_steps_close(ours: list[torch.Tensor], theirs: list[torch.Tensor], tol: float, what: str) -> None:
    """Every decode step's logits within `tol` (max abs difference) of the reference's, as many steps."""
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        diff = (a - b).abs().max().item()
        assert diff < tol, f"{what} step {step}: max |logit diff| {diff:.2e}"


def hf_generate(ref: Any, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens (exactly `steps`: min_new_tokens, as our min_tokens) and logits."""
    out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), [x[0] for x in out.logits]
