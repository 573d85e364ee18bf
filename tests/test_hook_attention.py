"""The attention hook point (docs/architecture.md §6): decode block selection (`test_kv_window`) and the
filled-block observer (`test_block_observer`), third-party-style plugins from
tests/plugins/actserve_test_plugins, each against transformers' own model on TinyStories with 4-token
KV blocks (so blocks fill and get dropped within a few steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from actserve.interventions import registry as registry_module
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.offline import make_sequences
from actserve.server.engine.sequence import Sequence
from tests.conftest import start_server
from tests.engine_utils import greedy, run, run_logged

BS = 4  # KV block size of these tests
STEPS = 16
TEXTS = ["Once upon a time, there was a", "The dog was happy because", "Sam saw a big tree", "Lily"]
TEST_PLUGINS = ("test_kv_window", "test_block_observer")


def engine(model_dir: Path, **kw: Any) -> LLMEngine:
    # no prefix cache: these tests run the same prompts again and compare bits across engines, and a cache
    # hit computes the prompt's tail in a smaller matmul (equal to 1e-5, not bitwise; tested elsewhere)
    cfg: dict[str, Any] = {
        "device": "cpu",
        "num_kv_blocks": 256,
        "block_size": BS,
        "enable_prefix_caching": False,
        **kw,
    }
    return LLMEngine(EngineConfig(model=str(model_dir), **cfg))


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path) -> LLMEngine:
    return engine(tinystories_dir)


@pytest.fixture(scope="module")
def prompts(tinystories_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    return [tok.encode(t) for t in TEXTS]


def window(first: int, last: int) -> dict[str, Any]:
    return {"test_kv_window": {"first": first, "last": last}}


def ours(
    eng: LLMEngine, prompts: list[list[int]], specs: list[Any], tag: str
) -> tuple[list[list[int]], dict]:
    """STEPS greedy tokens each (min_tokens as transformers' min_new_tokens) and the logits seen."""
    return run_logged(eng, prompts, greedy(STEPS, min_tokens=STEPS), specs, tag)


def window_mask(prompt_len: int, total: int, first: int, last: int) -> torch.Tensor:
    """[1, 1, total, total] additive mask: prompt rows causal (prefill is not restricted); a decode row at
    position p sees the first `first` and the last `last` of the blocks its context spans."""
    allow = torch.zeros(total, total, dtype=torch.bool)
    for p in range(total):
        used = p // BS + 1
        if p < prompt_len or used <= first + last:
            allow[p, : p + 1] = True
        else:
            allow[p, : first * BS] = True
            allow[p, (used - last) * BS : p + 1] = True
    return torch.where(allow, 0.0, torch.finfo(torch.float32).min)[None, None]


@torch.no_grad()
def hf_window(ref: Any, prompt: list[int], first: int, last: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode of transformers where each step re-runs the whole sequence under the window mask:
    every position's K/V then come from the same masked attention as in a cached, step-by-step run."""
    toks, logits = list(prompt), []
    for _ in range(STEPS):
        mask = window_mask(len(prompt), len(toks), first, last)
        row = ref(torch.tensor([toks]), attention_mask=mask).logits[0, -1]
        logits.append(row)
        toks.append(int(row.argmax()))
    return toks[len(prompt) :], logits


@pytest.mark.parametrize(("first", "last"), [(1, 1), (0, 2), (2, 1)])
def test_kv_window_equals_transformers_with_the_window_mask(
    eng: LLMEngine, ref: Any, prompts: list[list[int]], first: int, last: int
) -> None:
    (tokens,), seen = ours(eng, [prompts[0]], [window(first, last)], tag=f"w{first}{last}_")
    ref_tokens, ref_logits = hf_window(ref, prompts[0], first, last)
    _, plain_logits = hf_window(ref, prompts[0], 99, 99)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(ref_logits, plain_logits, strict=True))  # it acts
    for step, (a, b) in enumerate(zip(seen[f"w{first}{last}_0"], ref_logits, strict=True)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
    assert tokens == ref_tokens


MIXED = [window(1, 1), None, window(0, 1), {"test_block_observer": {"tag": "mixed"}}]


def test_mixed_batch_equals_each_request_solo(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """Window rows of two sizes, a plain row and an observer row together == each alone (tokens exact;
    logits within 1e-4, as tests/test_hook_points.py)."""
    batched, seen = ours(eng, prompts, MIXED, tag="m")
    for i, (p, s) in enumerate(zip(prompts, MIXED, strict=True)):
        (solo,), solo_seen = ours(eng, [p], [s], tag=f"s{i}_")
        assert batched[i] == solo, i
        for a, b in zip(seen[f"m{i}"], solo_seen[f"s{i}_0"], strict=True):
            assert (a - b).abs().max().item() < 1e-4, i


def run_staggered(eng: LLMEngine, seqs: list[Sequence], delay: int) -> dict[str, list[int]]:
    """The first sequence alone for `delay` steps, then the rest join: their prefills share packed CPU
    steps with its decode row (the decode rows' tables are a subset of the packed rows)."""
    out: dict[str, list[int]] = {s.seq_id: [] for s in seqs}
    eng.add(seqs[0])
    steps = 0
    while eng.has_work():
        if steps == delay:
            for s in seqs[1:]:
                eng.add(s)
        for o in eng.step():
            out[o.seq_id].extend(o.token_ids)
        steps += 1
    return out


def test_decode_rows_beside_prefills(eng: LLMEngine, ref: Any, prompts: list[list[int]]) -> None:
    params = greedy(STEPS, min_tokens=STEPS)
    seqs = make_sequences(
        eng, [prompts[1], prompts[0], prompts[2]], params, [window(1, 1), window(1, 1), None]
    )
    out = run_staggered(eng, seqs, delay=6)
    assert out[seqs[0].seq_id] == hf_window(ref, prompts[1], 1, 1)[0]
    assert out[seqs[1].seq_id] == hf_window(ref, prompts[0], 1, 1)[0]


def test_plain_rows_bit_identical_to_a_server_without_the_plugins(
    eng: LLMEngine, tinystories_dir: Path, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    found = registry_module.discover()
    monkeypatch.setattr(
        registry_module, "discover", lambda: {k: v for k, v in found.items() if k not in TEST_PLUGINS}
    )
    bare = engine(tinystories_dir)
    assert not set(TEST_PLUGINS) & set(bare.registry.plugins)
    without, without_seen = ours(bare, prompts, [None] * 4, tag="bw")
    mixed, mixed_seen = ours(
        eng, prompts, [None, window(1, 1), None, {"test_block_observer": {"tag": "b"}}], tag="bx"
    )
    for i in (0, 2, 3):  # plain rows and the observer's row (it changes nothing)
        assert mixed[i] == without[i], i
        for a, b in zip(mixed_seen[f"bx{i}"], without_seen[f"bw{i}"], strict=True):
            assert torch.equal(a, b), i
    assert any(
        (a - b).abs().max() > 1e-3 for a, b in zip(mixed_seen["bx1"], without_seen["bw1"], strict=True)
    )


@torch.no_grad()
def check_observer(eng: LLMEngine, ref: Any, prompts: list[list[int]], tag: str) -> list[list[int]]:
    """Two observer rows beside a plain and a window row: each record's mean key equals transformers'
    cached (post-rotary) keys of that block's positions, and the recorded blocks are exactly those that
    prompt + fed generated tokens complete, each once. Returns the batch's tokens."""
    plugin = eng.registry.plugin("test_block_observer")
    assert plugin is not None
    specs = [{"test_block_observer": {"tag": f"{tag}{i}"}} for i in range(2)] + [None, window(1, 1)]
    outs = run(eng, prompts, greedy(STEPS), interventions=specs, tag=tag)  # no min_tokens: steps may chain
    layers = eng.model_info.num_layers
    for i in range(2):
        records = plugin.records[f"{tag}{i}"]  # type: ignore[attr-defined]
        written = prompts[i] + outs[i][:-1]  # the last sampled token is never fed
        out = ref(torch.tensor([written]), use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5
        want = {(layer, j) for layer in range(layers) for j in range(len(written) // BS)}
        assert sorted((layer, j) for layer, j, _ in records) == sorted(want)
        for layer, j, mean in records:
            keys = cache.layers[layer].keys[0, :, j * BS : (j + 1) * BS]  # [kv_heads, BS, head_dim]
            assert (mean - keys.mean(1)).abs().max().item() < 1e-4, (i, layer, j)
    return outs


def test_observer_sees_transformers_keys_of_every_filled_block(
    eng: LLMEngine, ref: Any, prompts: list[list[int]]
) -> None:
    check_observer(eng, ref, prompts, "o")


def test_decode_only_steps(tinystories_dir: Path, ref: Any, prompts: list[list[int]]) -> None:
    """Overlapping CPU steps decode through the runner's decode-only path (`_decode`): the tables come
    from there and the filled blocks from `filled_blocks` (the device function graphs use)."""
    overlap = engine(tinystories_dir, overlap_steps=True)
    outs = check_observer(overlap, ref, prompts, "d")
    assert overlap.runner.eager_decode_steps > 0  # type: ignore[attr-defined]
    assert outs[3] == hf_window(ref, prompts[3], 1, 1)[0]


def test_kv_window_graph_hooks_cover_every_layer(eng: LLMEngine) -> None:
    """Its graph hooks (what a decode CUDA graph would capture) act at every layer, as its step hooks."""
    plugin = eng.registry.plugin("test_kv_window")
    assert plugin is not None and plugin.graph_safe and plugin in eng.registry.graph_safe()
    hook = plugin.graph_hooks().attention
    assert hook is not None and hook.layers() == set(range(eng.model_info.num_layers))


def test_selected_tables_in_the_kernel_and_on_the_cpu() -> None:
    """The CUDA path's pieces on fresh random inputs (the Triton kernel runs in its interpreter without a
    GPU): the window's selected tables through the paged-decode kernel == the CPU path's rebuilt slots ==
    attention over the kept positions by hand; a `none` row's table and length come back bit-identical;
    `filled_blocks` names the block each completing row fills."""
    from actserve_test_plugins.kv_window import _Hook

    from actserve.kernels.paged_decode import paged_decode
    from actserve.server.layers.attention import AttentionBatch, SeqSlice, filled_blocks, select_blocks

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(7)
    rows, hq, hk, d, nblocks = 3, 4, 2, 16, 16
    cache = torch.randn(2, nblocks * BS, hk, d, generator=g).to(dev)
    q = torch.randn(rows, hq, d, generator=g).to(dev)
    tables = torch.stack([torch.randperm(nblocks, generator=g)[:8] for _ in range(rows)]).to(dev, torch.int32)
    lens = torch.tensor([24, 9, 23], dtype=torch.int32, device=dev)
    inputs = {"window": torch.tensor([[1, 1], [-1, -1], [0, 2]], dtype=torch.int32, device=dev)}
    hook = _Hook(1, BS)
    new_tables, new_lens = hook.select(0, q, tables, lens, inputs)
    assert torch.equal(new_tables[1], tables[1]) and int(new_lens[1]) == int(lens[1])
    assert new_lens.tolist() == [8, 9, 7] and new_tables.dtype == torch.int32

    def by_hand(r: int, positions: list[int]) -> torch.Tensor:
        slots = torch.tensor([int(tables[r, p // BS]) * BS + p % BS for p in positions], device=dev)
        k = cache[0, slots].repeat_interleave(hq // hk, 1)
        v = cache[1, slots].repeat_interleave(hq // hk, 1)
        w = (torch.einsum("hd,nhd->hn", q[r], k) * 0.25).softmax(-1)
        return torch.einsum("hn,nhd->hd", w, v)

    kept = [[*range(4), *range(20, 24)], list(range(9)), list(range(16, 23))]
    want = torch.stack([by_hand(r, kept[r]) for r in range(rows)])
    got = paged_decode(q, cache[0], cache[1], new_tables, new_lens, 0.25, BS, None, tile=16)
    assert (got - want).abs().max().item() < 1e-4
    slices = [SeqSlice(r, 1, torch.arange(int(lens[r]), device=dev)) for r in range(rows)]  # replaced
    batch = AttentionBatch(torch.zeros(0, dtype=torch.long, device=dev), slices, tables, lens, BS)
    batch.decode_seqs = list(range(rows))
    cpu = select_blocks([(hook, inputs)], 0, q.cpu(), batch)
    for r in range(rows):
        slots = cpu.seqs[r].context_slots.tolist()
        assert slots == [int(tables[r, p // BS]) * BS + p % BS for p in kept[r]], r
    blocks, owners = filled_blocks(lens.long() - 1, tables, BS)
    assert owners.tolist() == [0, -1, -1] and blocks.tolist() == [int(tables[0, 5]), -1, -1]


def test_over_http(tinystories_dir: Path, ref: Any, prompts: list[list[int]]) -> None:
    """A window request over HTTP returns transformers' windowed greedy text; a bad spec is a 400."""
    server = start_server(
        tinystories_dir, device="cpu", num_kv_blocks=256, block_size=BS, engine_process="off"
    )
    try:
        listed = {d["name"]: d for d in httpx.get(f"{server.url}/v1/interventions").json()["data"]}
        assert set(TEST_PLUGINS) <= set(listed)
        tok = AutoTokenizer.from_pretrained(tinystories_dir)
        body = {"model": "tinystories-656k", "prompt": TEXTS[0], "max_tokens": STEPS, "temperature": 0,
                "interventions": window(1, 1)}  # fmt: skip
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        ref_tokens, _ = hf_window(ref, prompts[0], 1, 1)
        assert r.json()["choices"][0]["text"] == tok.decode(ref_tokens)
        bad = {**body, "interventions": window(1, 0)}
        r = httpx.post(f"{server.url}/v1/completions", json=bad, timeout=60)
        assert r.status_code == 400 and "last" in r.text
    finally:
        server.stop()


def test_transformers_fallback_refuses(tinystories_dir: Path) -> None:
    from actserve.interventions.base import InterventionError

    fallback = engine(tinystories_dir, force_transformers=True)
    for spec in (window(1, 1), {"test_block_observer": {"tag": "hf"}}):
        with pytest.raises(InterventionError):
            fallback.registry.prepare(spec)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kv_window_beside_plain_rows(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    """bf16 on CUDA (eager, the paged-decode kernel over the selected tables): plain rows beside window
    rows keep the bits of the same batch without them; a window row is close to a float32 CPU run of the
    same request by relative norm and differs from its plain run."""
    cuda = LLMEngine(
        EngineConfig(
            model=str(tinystories_dir), dtype="bfloat16", enforce_eager=True, num_kv_blocks=256, block_size=BS
        )
    )
    specs = [None, window(1, 1), None, window(0, 1)]
    plain, plain_seen = ours(cuda, prompts, [None] * 4, tag="cp")
    mixed, mixed_seen = ours(cuda, prompts, specs, tag="cm")
    for i in (0, 2):
        assert mixed[i] == plain[i]
        for a, b in zip(mixed_seen[f"cm{i}"], plain_seen[f"cp{i}"], strict=True):
            assert torch.equal(a, b), i
    assert (mixed_seen["cm1"][-1] - plain_seen["cp1"][-1]).abs().max().item() > 1e-2
    cpu = engine(tinystories_dir)
    for i in (1, 3):
        cpu_out, cpu_seen = ours(cpu, [prompts[i]], [specs[i]], tag="cc")
        n = next((k for k, (a, b) in enumerate(zip(mixed[i], cpu_out[0], strict=True)) if a != b), STEPS)
        for step in range(min(n + 1, STEPS)):  # up to the first token where bf16 and float32 part ways
            got, want = mixed_seen[f"cm{i}"][step].float().cpu(), cpu_seen["cc0"][step]
            assert ((got - want).norm() / want.norm()).item() < 0.03, (i, step)
