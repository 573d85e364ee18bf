"""Zero-copy expert statistics under chained decode steps (issue 15: every counter read 0 on the H200).

On CUDA the engine overlaps steps and *chains* decode steps (`LLMEngine._chain` ->
`ModelRunner.launch_chained`): the next step is launched from the previous one's sampled tokens still
on the device. Such steps must be wrapped by the expert cache's `before_step` / `after_step` like any
other, or their pair counts stay on the device, never reach the counters, and the cache is never
refilled while a request decodes. Forced on for the CPU here (`overlap_steps=True`, as tests/test_overlap.py
does), against a recomputation from each MoE layer call's routing and the table it ran with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence
from tests.test_moe_models import VOCAB, engine
from tests.test_moe_offload import three_layer_qwen3
from tests.test_native_models import prompts

TOKENS = 10


def test_chained_decode_steps_are_counted_and_refill_the_cache(tmp_path: Path) -> None:
    """One request of TOKENS tokens, overlapped and chained: the hits, misses and zero-copy bytes after
    `flush_stats` equal a recomputation (per step and MoE layer, the distinct routed experts, a hit where
    the device table had a slot for it), over the chained decode steps as well; and an expert missed in
    a decode step is admitted (admit after 1) while the request still decodes."""
    eng = engine(three_layer_qwen3(tmp_path), resident_experts=0.25, overlap_steps=True, expert_admit_after=1)
    offload = eng.loaded.model.expert_offload
    assert offload.zero_copy is not None and eng.overlap
    steps: list[list[tuple[set[int], torch.Tensor]]] = []  # per forward: per MoE layer (experts, table)
    first = offload.order[0]

    def hook(i: int) -> Any:
        def grab(module: Any, args: tuple[Any, ...]) -> None:
            if i == first:
                steps.append([])
            ids = args[1]
            steps[-1].append((set(ids[ids >= 0].tolist()), module.slot_of.clone()))

        return grab

    layers = eng.loaded.model.model.layers
    handles = [layers[i].mlp.experts.register_forward_pre_hook(hook(i)) for i in offload.order]
    try:
        prompt = prompts(1, 7, VOCAB, seed=5)[0]
        params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
        eng.add(Sequence("c", prompt, params, []))
        while eng.has_work():
            eng.step()
        offload.flush_stats()
    finally:
        for h in handles:
            h.remove()
    assert eng.chained_steps > 0  # the path under test ran
    assert len(steps) == TOKENS  # the prompt's step and every decode step, one forward each
    hits = misses = 0
    admitted_while_decoding = False
    for s, layer_calls in enumerate(steps):
        for experts, table in layer_calls:
            used = torch.tensor(sorted(experts))
            hits += int((table[used] >= 0).sum())
            misses += int((table[used] < 0).sum())
        if 1 < s:  # a table entry that appeared after the first decode step: filled from decode misses
            before = torch.stack([t for _, t in steps[s - 1]])
            now = torch.stack([t for _, t in layer_calls])
            admitted_while_decoding |= bool(((before < 0) & (now >= 0)).any())
    got = eng.loaded.telemetry[0].counters
    assert misses > 0
    assert (got["moe_expert_cache_hits"], got["moe_expert_cache_misses"]) == (hits, misses)
    per_expert = next(iter(offload.caches.values())).expert_bytes
    assert got["moe_expert_zero_copy_bytes"] == misses * per_expert
    assert admitted_while_decoding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_steps_count_every_lookup(tmp_path: Path) -> None:
    """CUDA, bf16, the served defaults (overlap, chained steps replaying decode graphs, zero copy): at
    batch 1 each decode token routes top_k distinct experts at each MoE layer, so the hits and misses
    counted over the decode steps add up to exactly top_k x MoE layers x steps (the H200 run counted 0),
    and each miss read one expert's bytes from host memory."""
    eng = engine(
        three_layer_qwen3(tmp_path), device="cuda", dtype="bfloat16", resident_experts=0.25,
        expert_zero_copy="on", expert_admit_after=0,
    )  # fmt: skip
    offload = eng.loaded.model.expert_offload
    assert offload.zero_copy is not None and eng.overlap and eng.runner.graphs is not None
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    eng.add(Sequence("g", prompts(1, 7, VOCAB, seed=6)[0], params, []))
    eng.overlap = False  # the prompt's step alone, then every decode step counted below
    eng.step()
    eng.overlap = True
    offload.flush_stats()
    tel = eng.loaded.telemetry[0]
    before = dict(tel.counters)
    graphs, chained = eng.runner.graph_steps, eng.chained_steps
    while eng.has_work():
        eng.step()
    offload.flush_stats()
    assert eng.runner.graph_steps - graphs == TOKENS - 1 and eng.chained_steps > chained
    d = {k: tel.counters[k] - before[k] for k in tel.counters}
    moe = eng.model_info.moe
    assert moe is not None
    lookups = moe.top_k * len(offload.order) * (TOKENS - 1)
    assert d["moe_expert_cache_hits"] + d["moe_expert_cache_misses"] == lookups
    assert d["moe_expert_cache_misses"] > 0  # 2 of 8 experts resident, never refilled (admit after 0)
    per_expert = next(iter(offload.caches.values())).expert_bytes
    assert d["moe_expert_zero_copy_bytes"] == d["moe_expert_cache_misses"] * per_expert
