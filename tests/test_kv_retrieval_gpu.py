"""kv_retrieval on a GPU (skipped without CUDA): the decode kernels at Llama-3-8B's attention shape
against their references, and the engine on TinyStories in float32 with decode CUDA graphs: a covering
budget gives full attention's tokens from graphs, small budgets run from graphs beside plain rows, and
the host tier round-trips."""

from __future__ import annotations

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
    ent = torch.rand(slots + 1, 32, device="cuda", generator=g) + 0.1
    rem = torch.zeros(slots + 1, device="cuda")
    val, idx = want.topk(256, dim=1)
    outs = []
    for fn in ("ref", "kernel"):
        e, m = ent.clone(), rem.clone()
        sel = torch.zeros(slots + 1, 256, dtype=torch.int32, device="cuda")
        sel_n = torch.zeros(slots + 1, dtype=torch.int32, device="cuda")
        att = torch.zeros(slots + 1, 257, dtype=torch.int32, device="cuda")
        att_n = torch.zeros(slots + 1, dtype=torch.int32, device="cuda")
        cnt = torch.zeros(2, dtype=torch.int64, device="cuda")
        if fn == "ref":
            k_sel = R.budget_ref(want, cfg, lens, e, m, 0, 256, bs)
            out = tables.clone()
            new_len = R.tables_ref(out, lens, cfg, idx, val, k_sel, att, att_n, sel, sel_n, cnt, bs)
        else:
            out, new_len = K.pick(
                want,
                tables,
                lens,
                cfg,
                idx,
                val,
                e,
                m,
                att,
                att_n,
                sel,
                sel_n,
                cnt,
                0,
                256,
                bs,
                R.ENTROPY_RATE,
            )
        outs.append((out, new_len, cnt, e))
    (o1, l1, c1, e1), (o2, l2, c2, e2) = outs
    assert torch.equal(l1, l2) and torch.equal(c1, c2) and torch.allclose(e1, e2, atol=1e-5)
    for r in range(3):
        used = -(-int(l1[r]) // bs)
        assert torch.equal(o1[r, :used], o2[r, :used])
    assert int(l1[0]) < 2048 + bs  # sink + 108 blocks + window: about the budget


def engine(model_dir: Path, **kw: Any):  # type: ignore[no-untyped-def]
    from actserve.server.engine.config import EngineConfig
    from actserve.server.engine.llm_engine import LLMEngine

    return LLMEngine(
        EngineConfig(model=str(model_dir), dtype="float32", max_num_seqs=8, num_kv_blocks=512,
                     enable_prefix_caching=False, **kw)  # type: ignore[arg-type]
    )  # fmt: skip


def spec(method: str, budget: int) -> dict[str, Any]:
    return {
        "kv_retrieval": {"method": method, "budget_tokens": budget, "sink_tokens": 16, "window_tokens": 32}
    }


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
    out, _ = run_logged(eng, prompts, greedy(24), specs, "m")
    assert all(len(t) == 24 for t in out)
    assert eng.runner.graph_steps > graphs0  # retrieving rows decode from CUDA graphs
    assert eng.blocks.num_gpu_used == 0 and eng.blocks.num_host_used == 0
    if tier:
        assert eng.host_tier is not None and eng.host_tier.bytes_to_device > 0
