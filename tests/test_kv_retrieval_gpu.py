"""kv_retrieval on a GPU (skipped without CUDA): the decode kernels at Llama-3-8B's attention shape
against their references (the selection also at a graph's table width), the host tier's recall kernel
reading pinned host memory from a CUDA graph, and the engine on TinyStories in float32 with decode CUDA
graphs: a covering budget gives full attention's tokens from graphs, small budgets run from graphs beside
plain rows, and with the host tier they give the tokens and logits of the same run without it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine_utils import greedy, run_logged

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_decode_kernels_at_llama3_8b_shape() -> None:
    """Rows of each method over 8192-block tables (a 128k context at 16-token blocks), bf16 state."""
    from actserve.kernels import kv_retrieval as K
    from actserve.kernels import kv_retrieval_ref as R

    g = torch.Generator(device="cuda").manual_seed(0)
    hq, hk, d, bs, ring, slots, ids, w = 32, 8, 128, 16, 64, 4, 9000, 8192

    def rnd(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    rows = [[0, R.INFLLM, 108, 4, 16, 131000, 0], [1, R.QUEST, 108, 4, 16, 120000, 0],
            [2, R.ACTQKV, 108, 4, 16, 131071, 0], [-1] * 7]  # fmt: skip
    cfg = torch.tensor(rows, dtype=torch.int32, device="cuda")
    lens = torch.tensor([131001, 120001, 131072, 5], dtype=torch.int32, device="cuda")
    tables = torch.stack([torch.randperm(ids, device="cuda", generator=g)[:w] for _ in rows]).int()
    ring_q, ring_pos = rnd(slots + 1, ring, hq, d), torch.arange(131008, 131072, device="cuda").repeat(5, 1)
    ring_bias = torch.rand(slots + 1, ring, device="cuda", generator=g)
    rep, lo, hi = rnd(ids, hk, d), rnd(ids, hk, d) - 1, rnd(ids, hk, d) + 1
    q = rnd(4, hq, d)
    a_ref, b_ref = R.query_vectors_ref(q, cfg, ring_q, ring_pos, ring_bias, hk)
    a, b = K.query_vectors(q, cfg, ring_q, ring_pos, ring_bias, hk)
    assert torch.allclose(a, a_ref, rtol=1e-3, atol=1e-3) and torch.allclose(b, b_ref, rtol=1e-3, atol=1e-3)
    want = R.scores_ref(a_ref, b_ref, cfg, tables, lens, rep, lo, hi, bs)
    got = K.scores(a_ref, b_ref, cfg, tables, lens, rep, lo, hi, bs)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    assert ((got[fin] - want[fin]).abs() <= 1e-2 * (1 + want[fin].abs())).all()
    width = 256
    ent = torch.rand(slots + 1, 32, device="cuda", generator=g) + 0.1
    rem = torch.zeros(slots + 1, device="cuda")
    # the tables as a step passes them, and as wide as a graph's; chunked passes of two sizes; scores
    # rounded to a few values (ties across chunks, taken in column order)
    cases = [(w, 2048, 8, False), (16384, 2048, 8, False), (16384, 4096, 16, False), (w, 1024, 4, True)]
    for graph_width, chunk, warps, ties in cases:
        tab = torch.zeros(len(rows), graph_width, dtype=torch.int32, device="cuda")
        tab[:, :w] = tables
        sc = torch.full((len(rows), graph_width), float("-inf"), device="cuda")
        sc[:, :w] = want.round() if ties else want
        e1, m1, e2, m2 = ent.clone(), rem.clone(), ent.clone(), rem.clone()
        c1 = torch.zeros(3, dtype=torch.int64, device="cuda")
        c2 = c1.clone()
        k_sel = R.budget_ref(sc, cfg, lens, e1, m1, 0, width, bs)
        o1, l1 = R.tables_ref(tab, lens, cfg, R.choose_ref(sc, k_sel), c1, bs)
        o2, l2, _ = K.select(
            sc, tab, lens, cfg, e2, m2, c2, 0, width, bs, R.ENTROPY_RATE, chunk=chunk, num_warps=warps
        )
        assert torch.equal(l1, l2) and torch.equal(c1, c2) and torch.allclose(e1, e2, atol=1e-5)
        for r in range(3):
            used = -(-int(l1[r]) // bs)
            assert torch.equal(o1[r, :used], o2[r, :used]), (graph_width, chunk, ties, r)
        assert int(l1[0]) < 2048 + bs  # sink + 108 blocks + window: about the budget


def test_recall_reads_pinned_host_memory() -> None:
    """The host tier's recall kernel reads blocks straight from a registered (pinned, mapped) host tensor
    through its address, at Llama-3-8B's block shape, bit-exact, from inside a CUDA graph."""
    from actserve.kernels.kv_tier import recall_blocks
    from actserve.server.engine.kv_tier import pin

    g = torch.Generator().manual_seed(3)
    store = torch.randn(64, 2, 16, 8, 128, generator=g).to(torch.bfloat16)
    pin(store)
    kv = torch.zeros(2, 100, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    src = torch.tensor([[1000 + 5, 1000 + 63, 1000 + 0], [1000 + 17, 0, 0]], dtype=torch.int32, device="cuda")
    dst = torch.tensor([[7, 99, 3], [50, 0, 0]], dtype=torch.int32, device="cuda")
    count = torch.tensor([3, 1], dtype=torch.int32, device="cuda")
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    recall_blocks(store, kv, src, dst, count, 1000, counter)  # compiles outside the capture
    kv.zero_()
    counter.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recall_blocks(store, kv, src, dst, count, 1000, counter)
    graph.replay()
    torch.cuda.synchronize()
    for h, b in ((5, 7), (63, 99), (0, 3), (17, 50)):
        assert torch.equal(kv[:, b].cpu(), store[h]), (h, b)
    assert int(kv.count_nonzero()) == 4 * store[0].numel() and int(counter) == 4


def engine(model_dir: Path, **kw: Any):  # type: ignore[no-untyped-def]
    from actserve.server.engine.config import EngineConfig
    from actserve.server.engine.llm_engine import LLMEngine

    return LLMEngine(
        EngineConfig(model=str(model_dir), dtype="float32", max_num_seqs=8, num_kv_blocks=512,
                     enable_prefix_caching=False, **kw)  # type: ignore[arg-type]
    )  # fmt: skip


def spec(method: str, budget: int, lag: int = 1) -> dict[str, Any]:
    return {
        "kv_retrieval": {
            "method": method, "budget_tokens": budget, "sink_tokens": 16, "window_tokens": 32, "lag": lag,
        }
    }  # fmt: skip


@pytest.mark.parametrize("tier", [0.0, 0.01])
def test_engine_from_cuda_graphs(tinystories_dir: Path, tier: float) -> None:
    eng = engine(tinystories_dir, kv_offload_gb=tier)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 2000, (n,), generator=g).tolist() for n in (300, 260, 280)]
    (plain,), seen = run_logged(eng, [prompts[0]], greedy(24), [None], "p")
    graphs0 = eng.runner.graph_steps
    for method in ("actqkv", "infllm", "quest"):
        (tokens,), got = run_logged(eng, [prompts[0]], greedy(24), [spec(method, 4096)], f"c{method}")
        assert tokens == plain, method
        assert (
            max((a - b).abs().max().item() for a, b in zip(got[f"c{method}0"], seen["p0"], strict=True))
            < 1e-3
        )
    specs = [spec("actqkv", 96), None, spec("quest", 128)]
    out, logged = run_logged(eng, prompts, greedy(24), specs, "m")
    assert all(len(t) == 24 for t in out)
    assert eng.runner.graph_steps > graphs0  # retrieving rows decode from CUDA graphs
    assert eng.blocks.num_gpu_used == 0 and eng.blocks.num_host_used == 0
    if tier:  # each layer's chosen cold blocks came back within the step: what the GPU tier reads
        assert eng.host_tier is not None and eng.host_tier.bytes_to_device > 0
        ref = engine(tinystories_dir)
        want, want_logged = run_logged(ref, prompts, greedy(24), specs, "m")
        assert out == want
        for i in range(3):  # the same K/V in the same order (float32: to rounding, were a launch to differ)
            pairs = zip(logged[f"m{i}"], want_logged[f"m{i}"], strict=True)
            assert max((a - b).abs().max().item() for a, b in pairs) < 1e-5, i


@pytest.mark.parametrize("tier", [0.0, 0.01])
def test_lag_from_cuda_graphs_equals_eager(
    tinystories_dir: Path, tier: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lag 1 rows (their next choice forked onto a side stream and joined back inside the captured decode
    step; with the tier, its recalls after each layer's attention, on a stream of their own) beside a
    lag 0 row and a plain row: decode steps replayed from CUDA graphs give the tokens and logits of the
    same run without graphs (eager: the same kernels and streams, launched one by one)."""
    from actserve.kernels import kv_retrieval as kern
    from actserve.server.engine.kv_tier import HostTier

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 2000, (n,), generator=g).tolist() for n in (300, 260, 280, 310)]
    specs = [spec("actqkv", 96), None, spec("quest", 128, lag=0), spec("infllm", 112)]
    choosing, recalling = set(), set()  # the streams of the next choice (select phase 2) and of recalls
    real_select, real_recall = kern.select, HostTier.recall

    def select(*a: Any, lag: Any = None, **k: Any) -> Any:
        if lag is not None and lag[5] == 2:
            choosing.add(torch.cuda.current_stream().cuda_stream)
        return real_select(*a, lag=lag, **k)

    def recall(self: HostTier, *a: Any) -> None:
        recalling.add(torch.cuda.current_stream().cuda_stream)
        real_recall(self, *a)

    monkeypatch.setattr(kern, "select", select)
    monkeypatch.setattr(HostTier, "recall", recall)
    graphed = engine(tinystories_dir, kv_offload_gb=tier)
    out, logged = run_logged(graphed, prompts, greedy(24), specs, "g")
    assert graphed.runner.graph_steps > 0
    eager = engine(tinystories_dir, kv_offload_gb=tier, enforce_eager=True)
    want, want_logged = run_logged(eager, prompts, greedy(24), specs, "g")
    assert eager.runner.graph_steps == 0
    assert out == want
    for i in range(len(prompts)):
        pairs = zip(logged[f"g{i}"], want_logged[f"g{i}"], strict=True)
        assert max((a - b).abs().max().item() for a, b in pairs) < 1e-4, i
    plugin = graphed.registry.plugin("kv_retrieval")
    assert plugin is not None and plugin.stats()["retrieval_selections"] > 0
    assert choosing
    if tier:
        assert graphed.host_tier is not None and graphed.host_tier.bytes_to_device > 0
        # recalls never queue behind (or ahead of) the next layer's choice on the side stream
        assert recalling and not recalling & choosing


def test_all_lagged_graphs_equal_eager(tinystories_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps whose every retrieving row is lag 1 and past its first decode step replay the graph variant
    without a fresh choice ("lag+all": assembly on the main stream; append, next choice and summaries
    on the side stream) and give the tokens and logits of the eager run, which chooses in program order.
    The graphs with a side stream, and only they, are captured without PDL."""
    from actserve.kernels import pdl

    suspended: list[int] = []
    real = pdl.pdl_suspended

    @contextlib.contextmanager
    def spy() -> Iterator[None]:
        suspended.append(1)
        with real():
            yield

    monkeypatch.setattr(pdl, "pdl_suspended", spy)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 2000, (n,), generator=g).tolist() for n in (300, 270, 290)]
    specs = [spec("actqkv", 96), None, spec("quest", 112)]
    graphed = engine(tinystories_dir)
    out, logged = run_logged(graphed, prompts, greedy(24), specs, "a")
    graphs = graphed.runner.graphs
    assert graphs is not None and any(dict(v).get("kv_retrieval") == "lag+all" for v in graphs.variants), (
        graphs.variants
    )
    lagged = [k for k in graphs.graphs if "lag" in dict(k[0]).get("kv_retrieval", "")]
    assert lagged and len(suspended) == len(lagged) < len(graphs.graphs)
    eager = engine(tinystories_dir, enforce_eager=True)
    want, want_logged = run_logged(eager, prompts, greedy(24), specs, "a")
    assert out == want
    for i in range(len(prompts)):
        pairs = zip(logged[f"a{i}"], want_logged[f"a{i}"], strict=True)
        assert max((a - b).abs().max().item() for a, b in pairs) < 1e-4, i
