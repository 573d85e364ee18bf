"""Chunked prefill: a prompt computed over several steps within the token budget, beside running decodes,
gives the logits, tokens and prompt logprobs of the same prompt computed in one step (and of
transformers), with steering, preemption mid-prefill and overlapped steps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.offline import make_sequences, run_sequences
from actserve.server.engine.scheduler import ScheduledBatch
from actserve.server.engine.sequence import Sequence
from tests.engine_utils import capture_logits, greedy, run

VOCAB = 2048  # TinyStories' tokenizer
STEPS = 8


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """float32 logits of the same tokens computed in differently shaped steps: 1e-5 (plus the relative
    float32 rounding of logits of magnitude ~10)."""
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def engine(model_dir: Path, **kw: Any) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=256, **kw))


@pytest.fixture(scope="module")
def unchunked(tinystories_dir: Path) -> LLMEngine:
    """Budget 512 = max_model_len: every prompt here prefills in one step."""
    return engine(tinystories_dir, max_num_batched_tokens=512)


def spy_batches(eng: LLMEngine) -> list[tuple[int, list[int], int, int]]:
    """Every scheduled step as (tokens, prefill chunk sizes, decode count, preemptions)."""
    seen: list[tuple[int, list[int], int, int]] = []
    original = eng.scheduler.schedule

    def schedule() -> ScheduledBatch:
        b = original()
        seen.append((b.num_tokens, list(b.chunks), len(b.decodes), len(b.preempted)))
        return b

    eng.scheduler.schedule = schedule  # type: ignore[method-assign]
    return seen


def run_logged(
    eng: LLMEngine, prompts: list[list[int]], params: Any = None, interventions: Any = None, tag: str = "r"
) -> tuple[list[list[int]], dict[str, list[torch.Tensor]]]:
    with capture_logits() as seen:
        out = run(eng, prompts, params or greedy(STEPS), interventions, tag=tag)
    return out, seen


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunks_beside_decodes_equal_unchunked(
    tinystories_dir: Path, unchunked: LLMEngine, chunk: int
) -> None:
    """A short prompt decodes while a long one is prefilled in chunks of `chunk` tokens beside it."""
    prompts = random_prompts(chunk, [3, 300])
    ref_tokens, ref_logits = run_logged(unchunked, prompts)
    eng = engine(tinystories_dir, max_num_batched_tokens=chunk + 1, max_num_seqs=2)
    steps = spy_batches(eng)
    tokens, logits = run_logged(eng, prompts)
    assert tokens == ref_tokens
    for key in ref_logits:
        assert len(logits[key]) == len(ref_logits[key]) == STEPS
        for a, b in zip(logits[key], ref_logits[key], strict=True):
            close(a, b)
    assert all(n <= chunk + 1 for n, _, _, _ in steps)  # the budget holds every step
    mixed = [c for _, c, d, _ in steps if d == 1 and c]
    assert mixed and all(c == [chunk] for c in mixed[:-1])  # chunks of `chunk` beside the decode
    assert sum(sum(c) for _, c, _, _ in steps) == 303  # every prompt token computed once


def cost(n: int, start: int, break_even: int) -> float:
    """A chunk's tokens plus its attention over positions [0, start + n), in tokens' worth."""
    return n * (1 + (start + n / 2) / break_even)


def linear_macs_per_layer(eng: LLMEngine) -> int:
    """Multiply-adds per token of one decoder layer's matmuls, counted from its projections' primary
    weights (test plugins add derived copies beside them, under other names)."""
    layer = next(m for m in eng.loaded.model.modules() if isinstance(m, torch.nn.ModuleList))[0]
    return sum(p.numel() for n, p in layer.named_parameters() if n.endswith("_proj.weight"))


def test_attention_aware_chunks_beside_decodes(tinystories_dir: Path, unchunked: LLMEngine) -> None:
    """Beside a decode, each chunk of a long prompt is the largest whose tokens plus its attention over
    the context so far (a token per `break_even` context tokens) fit the budget, so chunks shrink as the
    prompt advances; alone, a chunk takes the whole budget; outputs equal the unchunked engine's."""
    prompts = random_prompts(21, [3, 450])
    ref_tokens, ref_logits = run_logged(unchunked, prompts, greedy(40))
    eng = engine(tinystories_dir, max_num_batched_tokens=65, max_num_seqs=2, attention_aware_chunks=True)
    spec = eng.loaded.spec
    assert spec is not None
    break_even = eng.scheduler.attention_break_even
    assert break_even == linear_macs_per_layer(eng) // (2 * spec.num_heads * spec.head_dim)
    steps = spy_batches(eng)
    tokens, logits = run_logged(eng, prompts, greedy(40))
    assert tokens == ref_tokens
    for key in ref_logits:
        for a, b in zip(logits[key], ref_logits[key], strict=True):
            close(a, b)
    assert steps[0][1] == [3, 62]  # both prompts admitted in one step, no decode yet: by tokens
    start, mixed = 62, []
    for _, chunks, decodes, _ in steps[1:]:
        if not chunks:
            break
        assert decodes == 1
        (c,) = chunks
        assert cost(c, start, break_even) <= 64 + 1e-9  # the decode took one token of 65
        if start + c < 450:  # not the prompt's last chunk: the largest that fits
            assert cost(c + 1, start, break_even) > 64
        mixed.append(c)
        start += c
    assert start == 450 and len(mixed) > 4 and mixed[-2] < mixed[0]


def test_chunked_equals_transformers(tinystories_dir: Path, ref: Any) -> None:
    """Chunks of 7 beside a decode against transformers' own model, step by step."""
    prompts = random_prompts(11, [4, 90])
    eng = engine(tinystories_dir, max_num_batched_tokens=8, max_num_seqs=2)
    tokens, logits = run_logged(eng, prompts)
    for i, prompt in enumerate(prompts):
        full = torch.tensor([prompt + tokens[i]])
        with torch.no_grad():
            want = ref(full).logits[0, len(prompt) - 1 : -1]
        assert tokens[i] == want.argmax(-1).tolist()
        torch.testing.assert_close(torch.stack(logits[f"r{i}"]), want, atol=1e-4, rtol=1e-4)


def test_prompt_longer_than_budget_is_served(tinystories_dir: Path, unchunked: LLMEngine) -> None:
    """A 500-token prompt with a 16-token budget: 32 steps of prefill, then the same greedy tokens."""
    prompts = random_prompts(5, [500])
    eng = engine(tinystories_dir, max_num_batched_tokens=16, max_num_seqs=4)
    steps = spy_batches(eng)
    assert run(eng, prompts, greedy(8)) == run(unchunked, prompts, greedy(8))
    assert [c for _, c, _, _ in steps[:32]] == [[16]] * 31 + [[4]]


def prompt_lps(eng: LLMEngine, prompts: list[list[int]], k: int) -> list[Any]:
    seqs = make_sequences(eng, prompts, greedy(2, prompt_logprobs=k), tag="lp")
    run_sequences(eng, seqs)
    return [s.prompt_logprobs for s in seqs]


def test_prompt_logprobs_across_chunks(tinystories_dir: Path, unchunked: LLMEngine) -> None:
    prompts = random_prompts(3, [2, 50, 129])
    want = prompt_lps(unchunked, prompts, 3)
    eng = engine(tinystories_dir, max_num_batched_tokens=9, max_num_seqs=2)
    got = prompt_lps(eng, prompts, 3)
    for g, w, p in zip(got, want, prompts, strict=True):
        assert g is not None and len(g) == len(w) == len(p) and g[0] is None and w[0] is None
        assert [x.token_id for x in g[1:]] == p[1:]
        close(torch.tensor([x.logprob for x in g[1:]]), torch.tensor([x.logprob for x in w[1:]]))
        assert [[t for t, _ in x.top] for x in g[1:]] == [[t for t, _ in x.top] for x in w[1:]]


@pytest.mark.parametrize("phases", [["prompt"], ["generation"], ["prompt", "generation"]])
def test_steering_phases_across_chunk_boundaries(
    tinystories_dir: Path, unchunked: LLMEngine, phases: list[str]
) -> None:
    """Steering keyed by position vs prompt length stays exact when the prompt spans chunks."""
    prompts = random_prompts(7, [5, 40])
    d = torch.randn(128, generator=torch.Generator().manual_seed(1))
    spec = {"steering": {"vectors": [{"directions": {"1": d.tolist()}, "scale": 8.0, "phases": phases}]}}
    specs = [spec, spec]
    ref_tokens, ref_logits = run_logged(unchunked, prompts, interventions=specs)
    _, plain = run_logged(unchunked, prompts, tag="p")
    for i in range(len(prompts)):  # the steering changes the logits
        assert (torch.stack(plain[f"p{i}"]) - torch.stack(ref_logits[f"r{i}"])).abs().max() > 0.1
    eng = engine(tinystories_dir, max_num_batched_tokens=7, max_num_seqs=2)
    tokens, logits = run_logged(eng, prompts, interventions=specs)
    assert tokens == ref_tokens
    for key in ref_logits:
        for a, b in zip(logits[key], ref_logits[key], strict=True):
            close(a, b)


def test_preemption_mid_prefill(tinystories_dir: Path, unchunked: LLMEngine) -> None:
    """Too few blocks: a sequence preempted while half prefilled restarts from scratch, same tokens."""
    prompts = random_prompts(9, [20, 60, 100, 140])
    want = run(unchunked, prompts, greedy(30))
    eng = LLMEngine(
        EngineConfig(
            model=str(tinystories_dir), num_kv_blocks=32, block_size=8, max_model_len=200,
            max_num_batched_tokens=24, max_num_seqs=4,
        )
    )  # fmt: skip
    caught: list[tuple[int, int]] = []
    original = eng.scheduler._preempt

    def preempt(seq: Sequence, batch: ScheduledBatch) -> None:
        caught.append((seq.num_computed, seq.num_tokens))
        original(seq, batch)

    eng.scheduler._preempt = preempt  # type: ignore[method-assign]
    assert run(eng, prompts, greedy(30)) == want
    assert any(0 < c < n - 1 for c, n in caught), caught  # at least one was mid-prefill
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_overlap_never_chains_past_a_partial_prefill(tinystories_dir: Path, unchunked: LLMEngine) -> None:
    prompts = random_prompts(13, [3, 4, 120])
    want = run(unchunked, prompts, greedy(20))
    eng = engine(tinystories_dir, max_num_batched_tokens=10, max_num_seqs=3, overlap_steps=True)
    original = eng.runner.launch_chained
    chained_while_partial: list[int] = []

    def launch_chained(prev: Any, *late: Any) -> Any:
        running = eng.scheduler.running
        chained_while_partial.extend(1 for s in running if s.num_computed < s.num_tokens)
        return original(prev, *late)

    eng.runner.launch_chained = launch_chained  # type: ignore[method-assign]
    assert run(eng, prompts, greedy(20)) == want
    assert eng.chained_steps > 0 and not chained_while_partial


def test_transformers_fallback_chunks(tinystories_dir: Path) -> None:
    prompts = random_prompts(17, [3, 70])
    whole = run(engine(tinystories_dir, force_transformers=True), prompts, greedy(6))
    eng = engine(tinystories_dir, force_transformers=True, max_num_batched_tokens=6, max_num_seqs=2)
    lps = prompt_lps(eng, prompts, 0)
    assert all(lp is not None and len(lp) == len(p) for lp, p in zip(lps, prompts, strict=True))
    assert run(eng, prompts, greedy(6), tag="c") == whole


@pytest.mark.parametrize(("batched", "seqs"), [(8, 16), (100, 101)])
def test_budget_below_max_num_seqs_refused(tinystories_dir: Path, batched: int, seqs: int) -> None:
    with pytest.raises(ValueError, match=r"--max-num-batched-tokens \(\d+\) must be >= --max-num-seqs"):
        engine(tinystories_dir, max_num_batched_tokens=batched, max_num_seqs=seqs)


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_cli_refuses_bad_budget(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from actserve.server.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-num-batched-tokens", value])
    assert "--max-num-batched-tokens" in capsys.readouterr().err


def test_default_budget(tinystories_dir: Path) -> None:
    assert engine(tinystories_dir).scheduler.max_num_batched_tokens == 512  # CPU
    assert engine(tinystories_dir, max_num_seqs=600).scheduler.max_num_batched_tokens == 600


@pytest.fixture
def cuda_engines(tinystories_dir: Path) -> Iterator[tuple[LLMEngine, LLMEngine]]:
    kw: dict[str, Any] = {"device": "cuda", "dtype": "bfloat16", "max_num_seqs": 4}
    yield (
        engine(tinystories_dir, max_num_batched_tokens=512, **kw),
        engine(tinystories_dir, max_num_batched_tokens=13, **kw),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_chunked_equals_unchunked(cuda_engines: tuple[LLMEngine, LLMEngine]) -> None:
    """CUDA bf16: chunks read their context from the paged cache (per-sequence SDPA over the gathered
    slots); the unchunked run prefills with SDPA over the fresh K/V. bf16 rounding differs between the
    two paths, so logits are compared at bf16 precision and tokens until the first near-tie."""
    whole, chunked = cuda_engines
    prompts = random_prompts(21, [5, 200, 333])
    want, want_logits = run_logged(whole, prompts)
    got, got_logits = run_logged(chunked, prompts)
    for key in want_logits:
        for a, b in zip(got_logits[key], want_logits[key], strict=True):
            a, b = a.float(), b.float()
            # relative norm, as the other bf16 GPU tests (an elementwise 0.1 bound failed on one of 2048
            # logits by 0.109 on the H200)
            assert ((a - b).norm() / b.norm()).item() < 0.03, key
    for i in range(len(prompts)):
        first = want_logits[f"r{i}"][0].float().topk(2).values
        if first[0] - first[1] > 0.2:  # no near-tie at the first token
            assert got[i][0] == want[i][0]


def test_paged_prefill_kernel_in_the_engine(tinystories_dir: Path, unchunked: LLMEngine) -> None:
    """The CUDA runner's chunk path (the paged-prefill kernel over block tables), turned on for the CPU
    where the kernel runs in Triton's interpreter: chunks of 5 beside a decode = unchunked."""
    prompts = random_prompts(23, [3, 30])
    ref_tokens, ref_logits = run_logged(unchunked, prompts, greedy(4))
    eng = engine(tinystories_dir, max_num_batched_tokens=6, max_num_seqs=2)
    eng.runner.chunk_kernel = True
    calls: list[int] = []
    from actserve.kernels import paged_prefill as kernel

    original = kernel.paged_prefill

    def spy(*args: Any, **kw: Any) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kw)

    kernel.paged_prefill = spy  # type: ignore[assignment]
    try:
        tokens, logits = run_logged(eng, prompts, greedy(4))
    finally:
        kernel.paged_prefill = original  # type: ignore[assignment]
    assert calls and tokens == ref_tokens
    for key in ref_logits:
        for a, b in zip(logits[key], ref_logits[key], strict=True):
            close(a, b)


def test_failed_chunked_step_is_pinned_on_its_sequence(
    tinystories_dir: Path, unchunked: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that fails is re-run one sequence at a time; an isolated prompt longer than the budget
    prefills alone, chunk by chunk, so only the faulty request fails and the others keep their tokens."""
    from actserve.server.engine import model_runner
    from actserve.server.engine.engine_client import EngineRequestError

    prompts = random_prompts(29, [4, 40, 25])
    want = run(unchunked, prompts, greedy(6))
    eng = engine(tinystories_dir, max_num_batched_tokens=8, max_num_seqs=3)
    original = model_runner.launch_sampling
    solo_steps: list[int] = []

    def launch(logits: torch.Tensor, seqs: list[Sequence]) -> Any:
        if eng.scheduler.solo is not None:
            solo_steps.append(1)
        if any(s.seq_id == "f1" for s in seqs):
            raise IndexError("injected sampler fault")
        return original(logits, seqs)

    monkeypatch.setattr(model_runner, "launch_sampling", launch)
    seqs = make_sequences(eng, prompts, greedy(6), tag="f")
    with pytest.raises(EngineRequestError, match="f1: .*injected sampler fault"):
        run_sequences(eng, seqs)
    assert seqs[1].error is not None and seqs[0].error is None and seqs[2].error is None
    assert [seqs[0].output_token_ids, seqs[2].output_token_ids] == [want[0], want[2]]
    assert solo_steps  # an isolated sequence did prefill over several steps alone
    assert eng.blocks.num_free == eng.blocks.num_blocks


@pytest.mark.parametrize("kernel", [False, True])
def test_attention_hooks_across_chunks(tinystories_dir: Path, ref: Any, kernel: bool) -> None:
    """Attention hook plugins with prompts split into chunks beside decodes: the filled-block observer
    records every completed block once with transformers' keys, and a KV-window row (prompt rows
    unrestricted, decode rows windowed) keeps transformers' windowed tokens; with the paged-prefill kernel
    too (Triton's interpreter)."""
    from transformers import AutoTokenizer

    from tests.test_hook_attention import BS, TEXTS, check_observer, hf_window

    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    prompts = [tok.encode(t) for t in TEXTS]
    eng = LLMEngine(
        EngineConfig(
            model=str(tinystories_dir), device="cpu", num_kv_blocks=256, block_size=BS,
            max_num_batched_tokens=5, max_num_seqs=4,
        )
    )  # fmt: skip
    eng.runner.chunk_kernel = kernel
    steps = spy_batches(eng)
    outs = check_observer(eng, ref, prompts, "c")
    assert outs[3] == hf_window(ref, prompts[3], 1, 1)[0]
    assert any(len(c) and d for _, c, d, _ in steps)  # chunks beside decodes
    assert all(n <= 5 for n, _, _, _ in steps)


def test_profiled_step_runs_both_attention_paths(unchunked: LLMEngine) -> None:
    """The KV-sizing profile's dummy step (a budget-sized chunk at the end of the longest context) is a
    valid forward on the CPU through either chunk path, and both give the same log-probabilities."""
    from actserve.server.models.profile import heaviest_step

    runner = unchunked.runner
    spec = runner.model.spec
    outs = []
    for kernel in (False, True):
        torch.manual_seed(0)
        outs.append(heaviest_step(runner.model, spec, 40, 512, torch.float32, runner.device, 16, kernel))
    assert outs[0].shape == (40, spec.vocab_size) and bool(outs[0].isfinite().all())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
