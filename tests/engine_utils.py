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


def text_after(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text new tokens add after the prompt, as the server streams it: decoded in context, so a
    SentencePiece word-start token keeps its leading space (decoding the new ids alone drops it)."""
    before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    assert full.startswith(before)
    return full[len(before) :]


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
        diff = (a.to(b.device) - b).abs().max().item()  # a GPU engine's rows against a CPU reference
        assert diff < tol, f"{what} step {step}: max |logit diff| {diff:.2e}"


def hf_generate(ref: Any, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens (exactly `steps`: min_new_tokens, as our min_tokens) and logits."""
    out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), [x[0] for x in out.logits]


class HFTeal:
    """The independent TEAL reference: forward pre-hooks on transformers' q/k/v/o/gate/up/down that zero
    the input entries with |x| < thresholds[layer, projection] (our projection order; q/k/v share
    qkv_proj's, gate/up gate_up_proj's, as they share the input). `decode_only`: only forwards of one
    position per sequence (generate's decode steps). Counts, per (layer, projection), the zero entries
    after thresholding and all entries, over the rows `valid` marks ([batch * seq] bool; None: all); the
    achieved sparsity weighs them by the projections' weight sizes (multiply-adds)."""

    def __init__(self, ref: Any, thresholds: torch.Tensor, decode_only: bool = False) -> None:
        self.ref, self.thresholds, self.decode_only = ref, thresholds, decode_only
        self.valid: torch.Tensor | None = None
        self.counts: dict[tuple[int, str], list[int]] = {}
        self.macs: dict[tuple[int, str], int] = {}  # per site: its weights' size (multiply-adds per token)
        self.width: dict[tuple[int, str], int] = {}  # per site: its input's width
        self._handles: list[Any] = []

    def _hook(self, layer: int, proj: str, count: bool) -> Callable[..., Any]:
        t = float(self.thresholds[layer, list(HF_MODULES).index(proj)])

        def fn(_mod: Any, args: tuple[torch.Tensor, ...]) -> Any:
            x = args[0]
            if self.decode_only and x.shape[-2] != 1:
                return None
            y = x.masked_fill(x.abs() < t, 0)
            if count:
                rows = y.reshape(-1, y.shape[-1])
                rows = rows if self.valid is None else rows[self.valid]
                c = self.counts.setdefault((layer, proj), [0, 0])
                c[0] += int((rows == 0).sum())
                c[1] += rows.numel()
            return (y, *args[1:])

        return fn

    def __enter__(self) -> HFTeal:
        for layer, block_mods in enumerate(self.ref.model.layers):
            for proj, (block, names) in HF_MODULES.items():
                for j, name in enumerate(names):
                    mod = getattr(getattr(block_mods, block), name)
                    self._handles.append(mod.register_forward_pre_hook(self._hook(layer, proj, j == 0)))
                    self.macs[(layer, proj)] = self.macs.get((layer, proj), 0) + mod.weight.numel()
                    self.width[(layer, proj)] = mod.weight.shape[1]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def sparsity(self) -> float:
        """The share of the projections' multiply-adds skipped: each site's zero fraction weighed by its
        weights' size."""
        return sum(self.macs[k] * z / n for k, (z, n) in self.counts.items()) / sum(
            self.macs[k] for k in self.counts
        )

    def pooled(self) -> float:
        """The same over the rows counted, pooled (as a request's counters add up its decode rows): each
        zero entry weighs what its weight column costs."""
        per_entry = {k: self.macs[k] / self.width[k] for k in self.counts}
        return sum(per_entry[k] * z for k, (z, _) in self.counts.items()) / sum(
            per_entry[k] * n for k, (_, n) in self.counts.items()
        )
