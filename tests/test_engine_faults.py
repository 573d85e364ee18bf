"""A step that raises fails only the requests it concerns; the engine keeps serving (both engine modes).

Faults are injected (a sampler that raises for one marked row, a chained step whose collect raises once)
or crafted below the API's validation (a prompt token outside the vocabulary), not taken from inputs
the API might one day reject."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from actserve.server.engine import model_runner
from actserve.server.engine.async_engine import make_engine
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.engine_client import EngineClient, EngineRequestError
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.outputs import SeqOutput
from actserve.server.engine.process_engine import ProcessEngine
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence
from tests.conftest import LiveServer, start_server
from tests.engine_utils import greedy, run

MODEL = "tinystories-656k"
TEXTS = ["Once upon a time", "The little dog", "Tom had a big red ball. He"]
MARK = 4242  # seed of the requests the injected sampler fault hits


@pytest.fixture(scope="module")
def prompts(tinystories_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    return [tok.encode(t) for t in TEXTS]


def drain(engine: LLMEngine) -> dict[str, list[SeqOutput]]:
    outs: dict[str, list[SeqOutput]] = {}
    while engine.has_work():
        for o in engine.step():
            outs.setdefault(o.seq_id, []).append(o)
    return outs


def tokens(outs: list[SeqOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def steering_free(engine: LLMEngine) -> int:
    return len(engine.registry.plugins["steering"]._free)  # type: ignore[attr-defined]


STEER = {"steering": {"vectors": [{"directions": {"1": [0.5] * 128}, "scale": 1.0}]}}


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_a_bad_row_fails_alone_and_its_batch_finishes(
    tinystories_dir: Path, prompts: list[list[int]], overlap: bool
) -> None:
    eng = LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64, overlap_steps=overlap))
    reference = run(eng, prompts, greedy(12))
    free_slots = steering_free(eng)
    good = [Sequence(f"g{i}", p, greedy(12), []) for i, p in enumerate(prompts)]
    # below the API's validation: a token the embedding has no row for raises in the forward pass
    bad = Sequence("bad", [1, 5000], greedy(12), [], interventions=eng.registry.prepare(STEER))
    for seq in [good[0], bad, *good[1:]]:
        eng.add(seq)
    outs = drain(eng)
    assert [tokens(outs[s.seq_id]) for s in good] == reference  # retried alone: same greedy tokens
    assert all(outs[s.seq_id][-1].finish_reason == "length" for s in good)
    last = outs["bad"][-1]
    assert last.finished and last.finish_reason is None and last.error is not None
    assert "internal error" in last.error and "IndexError" in last.error
    assert eng.blocks.num_free == 64 and not eng.seqs and not eng.has_work()
    assert steering_free(eng) == free_slots  # the failed request's plan was given back
    # and it serves the next request as before
    assert run(eng, prompts[:1], greedy(12), tag="again") == reference[:1]


def test_a_transient_fault_in_a_chained_step_fails_nobody(
    tinystories_dir: Path, prompts: list[list[int]]
) -> None:
    """The overlap path: step N+1 is in flight (`_inflight`) when its collect raises once. Its sequences
    are re-run one by one, recomputed from their tokens so far, and finish as if nothing happened."""
    eng = LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64, overlap_steps=True))
    reference = run(eng, prompts, greedy(20))
    chained_before = eng.chained_steps
    launch_chained = eng.runner.launch_chained
    calls = {"n": 0}

    class Broken:
        def __init__(self, pending: Any) -> None:
            self.seqs, self.pending = pending.seqs, pending.pending

        def collect(self) -> Any:
            raise RuntimeError("injected: collect of an in-flight step")

    def flaky(prev: Any, *late: Any) -> Any:
        calls["n"] += 1
        pending = launch_chained(prev, *late)
        return Broken(pending) if calls["n"] == chained_before + 3 else pending

    calls["n"] = chained_before
    eng.runner.launch_chained = flaky  # type: ignore[method-assign]
    seqs = [Sequence(f"s{i}", p, greedy(20), []) for i, p in enumerate(prompts)]
    for seq in seqs:
        eng.add(seq)
    outs = drain(eng)
    assert eng.failed_steps == 1
    assert [tokens(outs[s.seq_id]) for s in seqs] == reference
    assert all(outs[s.seq_id][-1].error is None for s in seqs)
    assert eng.blocks.num_free == 64 and not eng.seqs


def test_a_fault_only_whole_batches_hit_fails_nobody(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    """Every step of more than one row raises (say, a batch too large for some buffer): each sequence
    keeps being re-run alone, a token per solo step, and all of them finish with their own output."""
    eng = LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64))
    reference = run(eng, prompts[:2], greedy(6))
    launch = eng.runner.launch

    def only_alone(batch: Any) -> Any:
        if len(batch.seqs) > 1:
            raise RuntimeError("injected: batches fail")
        return launch(batch)

    eng.runner.launch = only_alone  # type: ignore[method-assign]
    seqs = [Sequence(f"s{i}", p, greedy(6), []) for i, p in enumerate(prompts[:2])]
    for seq in seqs:
        eng.add(seq)
    outs = drain(eng)
    assert [tokens(outs[s.seq_id]) for s in seqs] == reference
    assert all(outs[s.seq_id][-1].error is None for s in seqs) and eng.failed_steps >= 5


def test_min_tokens_with_stop_ids_outside_the_vocabulary(tinystories_dir: Path) -> None:
    """The request of the bug report, straight into the engine: the sampler has nothing to suppress for
    ids the model cannot produce (it raised IndexError on 5000 and overflowed on 2**70)."""
    eng = LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=32))
    params = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[5000, 2**70], temperature=0.0)
    eng.add(Sequence("hi", [1, 2], params, []))
    outs = drain(eng)["hi"]
    assert len(tokens(outs)) == 4 and outs[-1].finish_reason == "length" and eng.failed_steps == 0


# ------------------------------------------------------------------------------ thread mode, over HTTP


@pytest.fixture()
def faulty_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sampling call with a MARK-seeded row raises, as a sampler bug hit by one request would."""
    original = model_runner.launch_sampling

    def launch(logits: torch.Tensor, seqs: list[Sequence]) -> Any:
        if any(s.params.seed == MARK for s in seqs):
            raise IndexError("injected sampler fault")
        return original(logits, seqs)

    monkeypatch.setattr(model_runner, "launch_sampling", launch)


@pytest.fixture()
def thread_server(tinystories_dir: Path) -> Iterator[LiveServer]:
    server = start_server(tinystories_dir, num_kv_blocks=64, engine_process="off")
    yield server
    server.stop()


def sse(lines: list[str]) -> list[Any]:
    return [json.loads(x[6:]) for x in lines if x.startswith("data: {")]


def test_thread_mode_request_with_a_faulty_row_gets_500_others_finish(
    thread_server: LiveServer, faulty_sampler: None
) -> None:
    url = f"{thread_server.url}/v1/completions"
    engine = thread_server.server.config.app.state.actserve.engine  # type: ignore[attr-defined]
    free_slots = steering_free(engine.engine)
    long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 150, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    solo = httpx.post(url, json=long, timeout=60).json()["choices"][0]["text"]
    bad = {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "seed": MARK, "interventions": STEER}
    with httpx.Client(timeout=60) as hc, hc.stream("POST", url, json={**long, "stream": True}) as r:
        lines = r.iter_lines()
        first = next(x for x in lines if x.startswith("data: "))
        failed = hc.post(url, json=bad)  # joins the running batch, whose step then raises
        streamed = hc.post(url, json={**bad, "stream": True}).text.splitlines()
        rest = [first, *lines]
    assert failed.status_code == 500, failed.text
    message = failed.json()["error"]["message"]
    assert "internal error" in message and "injected sampler fault" in message
    errors = [e["error"] for e in sse(streamed) if "error" in e]
    assert errors and errors[0]["code"] == 500 and "internal error" in errors[0]["message"]
    assert streamed[-1] == "data: [DONE]" or streamed[-2] == "data: [DONE]"
    chunks = sse(rest)
    assert "".join(c["choices"][0]["text"] for c in chunks) == solo  # the other request: untouched
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    ok = httpx.post(url, json={**long, "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(f"{thread_server.url}/health").status_code == 200
    inner = engine.engine
    assert inner.blocks.num_free == 64 and not inner.seqs and steering_free(inner) == free_slots


# ------------------------------------------------------------------------------------------ process mode


def engine_state(eng: LLMEngine) -> tuple[int, int, int, int]:
    """Runs in the engine process: live sequences, free and total KV blocks, failed steps."""
    return len(eng.seqs), eng.blocks.num_free, eng.blocks.num_blocks, eng.failed_steps


async def outcome(engine: EngineClient, seq: Sequence) -> list[int] | BaseException:
    got: list[int] = []
    try:
        async for out in engine.generate(seq):
            got += out.token_ids
    except Exception as e:  # noqa: BLE001 - the outcome under test
        return e
    return got


def test_process_mode_core_survives_a_crafted_invalid_sequence(
    tinystories_dir: Path, prompts: list[list[int]]
) -> None:
    reference = run(
        LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64)), prompts, greedy(12)
    )
    engine = make_engine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64, engine_process="on"))
    assert isinstance(engine, ProcessEngine)
    try:

        async def main() -> list[Any]:
            seqs = [Sequence(f"g{i}", p, greedy(12), []) for i, p in enumerate(prompts)]
            bad = Sequence("bad", [1, 5000], greedy(12), [])  # no API in front to reject it
            return list(await asyncio.gather(*(outcome(engine, s) for s in [bad, *seqs])))

        bad, *good = asyncio.run(main())
        assert isinstance(bad, EngineRequestError) and "internal error" in str(bad)
        assert good == reference
        assert engine.process.is_alive() and engine.error is None
        assert asyncio.run(engine.run_in_engine(engine_state))[:3] == (0, 64, 64)
        again = asyncio.run(outcome(engine, Sequence("again", prompts[0], greedy(12), [])))
        assert again == reference[0]
    finally:
        engine.shutdown()


def test_a_fatal_device_error_stops_the_engine_and_tells_the_server(thread_server: LiveServer) -> None:
    """A CUDA error poisons the device context: no later step could succeed, so the engine stops (503
    for everyone) and the server is told to exit for a restart (`actserve serve` exits with code 1)."""
    state = thread_server.server.config.app.state.actserve  # type: ignore[attr-defined]
    told: list[tuple[int, str]] = []
    state.fatal = lambda code, why: told.append((code, why))

    def launch(batch: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    state.engine.engine.runner.launch = launch
    r = httpx.post(f"{thread_server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi"}, timeout=30)
    assert r.status_code == 503 and "engine stopped" in r.json()["error"]["message"]
    assert len(told) == 1 and told[0][0] == 1 and "illegal memory access" in told[0][1]
    assert httpx.get(f"{thread_server.url}/health").status_code == 503
