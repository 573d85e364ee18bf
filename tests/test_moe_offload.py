"""Expert offloading (`--resident-experts` / `--expert-cache-gb`, server/layers/expert_cache.py) on the CPU,
float32, tiny random configs of each MoE family: logits bit-identical to the all-resident engine at
prefill and every decode step for cache sizes from one slot per layer up, per-request top_k and each CPU
compute mode; an upcycled dense model's tokens under every cache size and top_k; CPU-computed experts
and the CUDA-style accumulation against kernels/moe_ref.py; a stress test of eviction with a tiny cache,
random routing and a copier whose copies land only when waited for; the prefetcher's counters against
a plain-torch recomputation; the cost model; admission preference; flags refused; metrics served."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from actserve.kernels.moe_ref import fused_moe_ref, route_topk
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.scheduler import MAX_PASSED, Scheduler
from actserve.server.layers import expert_cache
from actserve.server.layers.expert_cache import CostModel, ExpertOffload, OffloadConfig
from actserve.server.layers.moe import SparseMoeBlock
from actserve.server.models.loader import ModelLoadError
from tests.conftest import TINYSTORIES, save_random_model, start_server
from tests.engine_utils import assert_steps_close, greedy, hf_generate, run_logged
from tests.moe_copiers import LateCopier
from tests.test_moe_models import COMMON, FAMILIES, STEPS, TOL, VOCAB, engine, top_k, upcycled
from tests.test_native_models import prompts


def same_steps(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert len(a[key]) == len(b[key]), key
        for step, (x, y) in enumerate(zip(a[key], b[key], strict=True)):
            assert torch.equal(x, y), (key, step, (x - y).abs().max().item())


def counters(eng: LLMEngine) -> dict[str, float]:
    return dict(eng.loaded.telemetry[0].counters)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_offloaded_logits_bit_identical_to_resident(family: str, tmp_path: Path) -> None:
    """Every cache size from one slot per layer to all but one, each CPU compute mode, eager steps and
    zero-copy steps (misses read from the host copy, refills between steps), a batch mixing the model's
    top_k with 1 and every expert: the sampler sees the all-resident engine's logits bit for bit (every
    pair's product is computed from the same weights over the same rows and summed once)."""
    model_dir = save_random_model(FAMILIES[family](), tmp_path / family)
    base = engine(model_dir)
    moe = base.model_info.moe
    assert moe is not None
    e = moe.num_experts
    batch = prompts(3, 9, VOCAB, seed=len(family))
    specs = [None, top_k(1), top_k(e)]
    params = greedy(STEPS, min_tokens=STEPS)
    want_tokens, want = run_logged(base, batch, params, specs, tag="o")
    # (slots, CPU compute, prefetch depth, zero copy)
    settings = [(1, "never", 1, "off"), (e // 2, "always", 1, "auto"), (e - 1, "auto", 2, "off")]
    settings += [(1, "never", 0, "on"), (e // 2, "auto", 0, "auto")]
    for slots, mode, depth, zero_copy in settings:
        eng = engine(
            model_dir, resident_experts=slots / e, expert_cpu_compute=mode, expert_prefetch_depth=depth,
            expert_zero_copy=zero_copy,
        )  # fmt: skip
        offload = eng.loaded.model.expert_offload
        assert offload.slots == slots
        assert all(c.experts.w13.shape[0] == slots for c in offload.caches.values())
        zero = zero_copy != "off" and mode != "always"
        assert (offload.zero_copy is not None) == zero and (eng.loaded.eager_reason is None) == zero
        tokens, seen = run_logged(eng, batch, params, specs, tag="o")
        assert tokens == want_tokens, (slots, mode)
        same_steps(seen, want)
        offload.flush_stats()
        got = counters(eng)
        assert got["moe_expert_cache_misses"] > 0, (slots, mode)
        assert (got["moe_cpu_experts"] > 0) == (mode == "always")
        assert (got["moe_expert_zero_copy_bytes"] > 0) == zero
        if not zero:
            assert (got["moe_expert_copy_bytes"] > 0) == (mode != "always")
    # a size that holds every expert offloads nothing (and keeps the plain path)
    full = engine(model_dir, resident_experts=1.0)
    assert getattr(full.loaded.model, "expert_offload", None) is None
    assert full.loaded.eager_reason is None


def test_cpu_experts_chosen_by_cost_model_stay_exact(tmp_path: Path) -> None:
    """With a cost model that makes the CPU cheap, `auto` computes misses on the CPU and still gives the
    resident engine's logits exactly."""
    model_dir = save_random_model(FAMILIES["olmoe-clip"](), tmp_path / "olmoe")
    batch = prompts(2, 7, VOCAB, seed=3)
    params = greedy(STEPS, min_tokens=STEPS)
    want_tokens, want = run_logged(engine(model_dir), batch, params, tag="c")
    # eager steps (zero copy would read misses on the device); prefetches are copies
    eng = engine(model_dir, resident_experts=0.25, expert_prefetch_depth=0, expert_zero_copy="off")
    eng.loaded.model.expert_offload.cost = CostModel(bandwidth=1e3, cpu_fixed=1e-6, cpu_per_row=1e-6)
    tokens, seen = run_logged(eng, batch, params, tag="c")
    assert tokens == want_tokens
    same_steps(seen, want)
    assert counters(eng)["moe_cpu_experts"] > 0
    assert counters(eng)["moe_expert_copy_bytes"] == 0


def test_upcycled_dense_model_tokens_under_every_cache_size_and_top_k(tmp_path: Path) -> None:
    """A dense Llama whose MLP is copied into every expert: under each cache size (1-3 of 4 slots) and
    CPU mode, every top_k in one batch gives transformers' dense model's tokens and logits."""
    moe_dir, dense_dir = upcycled(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    ks = [None, 1, 2, 3, 4]
    batch = prompts(1, 10, VOCAB, seed=2) * len(ks)
    ref_tokens, ref_logits = hf_generate(ref, batch[0], STEPS)
    for slots, mode in ((1, "auto"), (2, "always"), (3, "never")):
        eng = engine(moe_dir, resident_experts=slots / 4, expert_cpu_compute=mode)
        tokens, seen = run_logged(eng, batch, greedy(STEPS, min_tokens=STEPS), [top_k(k) for k in ks])
        for i, k in enumerate(ks):
            assert tokens[i] == ref_tokens, (slots, k)
            assert_steps_close(seen[f"r{i}"], ref_logits, TOL, f"slots {slots} top_k {k}")


# -- the layer on its own -------------------------------------------------------------------------------


def offloaded_blocks(
    layers: int, experts: int, k: int, slots: int, depth: int = 1, mode: str = "never", seed: int = 0
) -> tuple[list[SparseMoeBlock], ExpertOffload, list[tuple[torch.Tensor, torch.Tensor]]]:
    """`layers` random MoE blocks (hidden 32, inter 24), their experts moved to host copies with `slots`
    slots under one ExpertOffload, and the full weights (w13, w2) of each for the reference."""
    torch.manual_seed(seed)
    blocks, full = [], []
    for _ in range(layers):
        b = SparseMoeBlock(32, experts, k, 24, True, ("gate_proj", "up_proj", "down_proj"))
        torch.nn.init.normal_(b.gate.weight, std=0.3)
        w13, w2 = torch.randn(experts, 48, 32) * 0.2, torch.randn(experts, 32, 24) * 0.2
        b.experts.offload_to_host(slots, torch.float32, pin=False)
        b.experts.to_empty(device="cpu")
        b.experts.host_w13.copy_(w13)
        b.experts.host_w2.copy_(w2)
        blocks.append(b.eval())
        full.append((w13, w2))
    offload = ExpertOffload(list(enumerate(blocks)), OffloadConfig(slots, depth, mode), torch.device("cpu"))
    for b in blocks:
        b.experts.after_loading()
    return blocks, offload, full


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_eviction_never_takes_a_needed_expert(slots: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stress: 3 layers of 8 experts with 1-3 slots, prefetch depth 2, random rows, widths and routing
    (-1 columns included), through a copier whose copies land only when waited for. Every kernel reads
    slots whose expert is the one the table says (checked at each call), and every layer's output equals
    the all-resident reference bit for bit: a needed expert evicted, or a copy not waited for, would
    show as a wrong expert."""
    blocks, offload, full = offloaded_blocks(3, 8, 2, slots, depth=2)
    offload.copier = copier = LateCopier()
    real = expert_cache.expert_pairs_ref
    checked = [0]

    def checking(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, slots_t: torch.Tensor, *a: Any) -> Any:
        for layer, c in offload.caches.items():
            if w13 is c.experts.w13:
                for s in torch.unique(slots_t[slots_t >= 0]).tolist():
                    e = int(c.expert_at[s])
                    assert torch.equal(w13[s], full[layer][0][e]) and torch.equal(w2[s], full[layer][1][e])
                    checked[0] += 1
        return real(x, w13, w2, slots_t, *a)

    monkeypatch.setattr(expert_cache, "expert_pairs_ref", checking)
    rng = random.Random(slots)
    for _ in range(40):
        rows, width = rng.randint(1, 5), rng.randint(1, 4)
        x = torch.randn(rows, 32)
        for layer, b in enumerate(blocks):
            ids = torch.tensor([[rng.choice([-1, *range(8)]) for _ in range(width)] for _ in range(rows)])
            weights = torch.rand(rows, width)
            got = b.experts(x, ids, weights, 2)
            want = fused_moe_ref(x, *full[layer], ids.int(), weights)
            assert torch.equal(got, want), layer
            x = torch.randn(rows, 32)
    assert checked[0] > 100 and copier.landed > 0


def test_prefetch_is_not_waited_for_by_the_layer_that_issues_it() -> None:
    """Layer 0 predicts layer 1's experts and queues their copies without waiting for them; layer 1
    waits for exactly those it uses (the copies land then)."""
    blocks, offload, full = offloaded_blocks(2, 8, 2, 2, depth=1)
    offload.copier = copier = LateCopier()
    x = torch.randn(1, 32)
    ids0, w0 = route_topk(torch.nn.functional.linear(x, blocks[0].gate.weight), 2, True)
    blocks[0].experts(x, ids0, w0, 2)
    predicted = route_topk(torch.nn.functional.linear(x, blocks[1].gate.weight), 2, True)[0][0].tolist()
    missing = [e for e in predicted if e not in (0, 1)]  # slots start with experts 0 and 1
    assert len(copier.queue) == 2 * len(missing)  # w13 and w2 of each, not landed
    assert sorted(int(offload.caches[1].slot_of[e]) >= 0 for e in predicted) == [True, True]
    out = blocks[1].experts(x, ids0.clone().fill_(predicted[0])[:, :1], w0[:, :1], 2)
    assert torch.equal(out, fused_moe_ref(x, *full[1], torch.full((1, 1), predicted[0]).int(), w0[:, :1]))


@pytest.mark.parametrize("pairwise", [True, False])
def test_cpu_experts_equal_reference(pairwise: bool) -> None:
    """Every miss computed on the CPU from the host copy (`always`), beside resident experts: equal to
    the all-resident reference, bit for bit when pairs are summed once (the CPU), and to float32 rounding
    when each part is added (what CUDA does: rounds, then the CPU experts' rows index-added)."""
    blocks, offload, full = offloaded_blocks(1, 8, 3, 3, depth=0, mode="always")
    offload.pairwise = pairwise
    g = torch.Generator().manual_seed(1)
    for rows in (1, 5, 17):
        x = torch.randn(rows, 32, generator=g)
        ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(rows)])
        weights = torch.rand(rows, 3, generator=g)
        got = blocks[0].experts(x, ids, weights, 3)
        want = fused_moe_ref(x, *full[0], ids.int(), weights)
        if pairwise:
            assert torch.equal(got, want)
        else:
            assert (got - want).abs().max().item() < 1e-6
    t = offload.telemetry.counters
    assert t["moe_cpu_experts"] > 0 and t["moe_expert_copy_bytes"] == 0


def test_rounds_when_a_step_needs_more_experts_than_slots() -> None:
    """A prefill-like step routing to all 8 experts with 2 slots runs in rounds (each round's experts
    copied, then computed) and still equals the reference; with CUDA-style accumulation, to rounding."""
    for pairwise in (True, False):
        blocks, offload, full = offloaded_blocks(1, 8, 2, 2, depth=0)
        offload.pairwise = pairwise
        x = torch.randn(16, 32)
        ids = torch.arange(32).reshape(16, 2) % 8
        weights = torch.rand(16, 2)
        got = blocks[0].experts(x, ids, weights, 2)
        want = fused_moe_ref(x, *full[0], ids.int(), weights)
        assert torch.equal(got, want) if pairwise else (got - want).abs().max().item() < 1e-6
        assert offload.telemetry.counters["moe_expert_copy_bytes"] == 6 * offload.caches[0].expert_bytes


def test_cost_model_assignment() -> None:
    """Random instances: the assignment's finishing time (copies and CPU at once) is never worse than
    copying everything or computing everything on the CPU; and the extreme costs pick the obvious side."""
    rng = random.Random(0)
    nbytes = 1000
    for _ in range(200):
        cost = CostModel(rng.uniform(1e3, 1e5), rng.uniform(0, 0.5), rng.uniform(0, 0.2))
        misses = [(e, rng.randint(1, 8)) for e in range(rng.randint(1, 10))]
        copy, cpu = cost.assign(misses, nbytes)
        assert sorted(copy + cpu) == [e for e, _ in misses]
        rows = dict(misses)
        span = max(len(copy) * cost.copy_s(nbytes), sum(cost.cpu_s(rows[e]) for e in cpu))
        assert span <= len(misses) * cost.copy_s(nbytes) + 1e-12
        assert span <= sum(cost.cpu_s(r) for _, r in misses) + 1e-12
    assert CostModel(1e12, 1.0, 1.0).assign([(0, 1), (1, 4)], nbytes) == ([1, 0], [])
    assert CostModel(1.0, 1e-9, 1e-9).assign([(0, 1), (1, 4)], nbytes) == ([], [1, 0])


# -- prediction, admission, metrics, flags -------------------------------------------------------------


def three_layer_qwen3(tmp_path: Path) -> Path:
    cfg = Qwen3MoeConfig(
        **{**COMMON, "num_hidden_layers": 3}, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
        norm_topk_prob=True,
    )  # fmt: skip
    return save_random_model(cfg, tmp_path / "q3x3")


def test_prefetch_counters_equal_plain_torch(tmp_path: Path) -> None:
    """Depth 2 on 3 MoE layers: predicted / used / correct and the distinct-experts histogram equal a
    plain-torch recomputation from each forward's MoE inputs (softmax top-k of the later layers' routers
    on the earlier layer's input, unions over rows)."""
    eng = engine(
        three_layer_qwen3(tmp_path), resident_experts=0.5, expert_prefetch_depth=2, expert_zero_copy="off"
    )
    blocks = [layer.mlp for layer in eng.loaded.model.model.layers]
    inputs: list[list[torch.Tensor]] = []

    def grab(i: int) -> Any:
        def hook(_m: Any, args: tuple[torch.Tensor, ...]) -> None:
            if i == 0:
                inputs.append([])
            inputs[-1].append(args[0].detach().clone())

        return hook

    handles = [b.register_forward_pre_hook(grab(i)) for i, b in enumerate(blocks)]
    try:
        run_logged(eng, prompts(3, 6, VOCAB, seed=9), greedy(STEPS, min_tokens=STEPS), tag="p")
    finally:
        for h in handles:
            h.remove()

    @torch.inference_mode()
    def experts(block: SparseMoeBlock, x: torch.Tensor) -> set[int]:
        probs = torch.softmax(torch.nn.functional.linear(x, block.gate.weight).float(), dim=-1)
        return set(torch.topk(probs, 2, dim=-1).indices.flatten().tolist())

    predicted = used = correct = 0
    means = []
    for xs in inputs:
        distinct = []
        for j in range(3):
            u = experts(blocks[j], xs[j])
            distinct.append(len(u))
            if j == 0:
                continue
            p = set().union(*(experts(blocks[j], xs[i]) for i in range(max(0, j - 2), j)))
            predicted, used, correct = predicted + len(p), used + len(u), correct + len(p & u)
        means.append(float(np.mean(distinct)))
    got = counters(eng)
    assert (got["moe_prefetch_predicted"], got["moe_prefetch_used"], got["moe_prefetch_correct"]) == (
        predicted,
        used,
        correct,
    )
    assert 0 < correct < predicted
    reg = eng.metrics.registry
    labels = {"model_name": eng.model_name}
    assert reg.get_sample_value("actserve_moe_step_distinct_experts_count", labels) == len(inputs)
    assert reg.get_sample_value("actserve_moe_step_distinct_experts_sum", labels) == pytest.approx(sum(means))
    assert reg.get_sample_value("actserve_moe_prefetch_correct_total", labels) == correct


def test_admission_prefers_overlapping_experts(tmp_path: Path) -> None:
    """The model's scores are the overlap of each waiting prompt's predicted experts (first MoE layer's
    router on the normed embedding of its last token, recomputed here in plain torch) with the experts
    the last step used there; the scheduler admits the best of its window first, and a sequence passed
    over MAX_PASSED times next."""
    eng = engine(three_layer_qwen3(tmp_path), resident_experts=0.5)
    offload = eng.loaded.model.expert_offload
    model = eng.loaded.model.model
    run_logged(eng, prompts(1, 5, VOCAB, seed=1), greedy(2), tag="a")
    running = offload.running_experts
    assert running
    toks = [[5, t] for t in range(10, 60)]
    norm = model.layers[0].post_attention_layernorm
    h = norm(model.embed_tokens.weight[[t[-1] for t in toks]])
    probs = torch.softmax(torch.nn.functional.linear(h, model.layers[0].mlp.gate.weight), dim=-1)
    want = [len(set(r) & running) / 2 for r in torch.topk(probs, 2, dim=-1).indices.tolist()]
    assert offload.scores(toks) == want

    class Prefer:
        def __init__(self, favourite: int) -> None:
            self.favourite = favourite

        def scores(self, token_ids: list[list[int]]) -> list[float]:
            return [1.0 if t[-1] == self.favourite else 0.0 for t in token_ids]

    from actserve.server.engine.block_manager import BlockManager
    from actserve.server.engine.sequence import Sequence

    sched = Scheduler(BlockManager(64, 4, False), 2, 64, admission=Prefer(33))
    sched.add(Sequence("run", [1, 2], greedy(4), []))
    sched.schedule()  # admitted alone (nothing running to prefer against)
    for i, last in enumerate([30, 31, 33, 34]):
        sched.add(Sequence(f"w{i}", [1, last], greedy(4), []))
    admitted = [s.seq_id for s in sched.schedule().prefills if s.seq_id != "run"]
    assert admitted == ["w2"]  # the preferred, over older ones
    sched = Scheduler(BlockManager(64, 4, False), 2, 64, admission=Prefer(33))
    sched.add(Sequence("run", [1, 2], greedy(4), []))
    sched.schedule()
    sched.add(Sequence("old", [1, 30], greedy(4), []))
    for i in range(MAX_PASSED + 1):
        sched.add(Sequence(f"p{i}", [1, 33], greedy(4), []))
        admitted = [s.seq_id for s in sched.schedule().prefills if s.seq_id != "run"]
        sched.running = [s for s in sched.running if s.seq_id == "run"]  # keep one slot free
        assert admitted == (["old"] if i == MAX_PASSED else [f"p{i}"]), i


def test_flags_refused_with_clear_errors(qwen3_dir: Path) -> None:
    cases = [
        (dict(model=TINYSTORIES, resident_experts=0.5), "not a mixture-of-experts model"),
        (dict(force_transformers=True, resident_experts=0.5), "transformers fallback"),
        (dict(resident_experts=0.5, expert_cache_gb=1.0), "mutually exclusive"),
        (dict(resident_experts=0.0), r"must be in \(0, 1\]"),
        (dict(resident_experts=1.5), r"must be in \(0, 1\]"),
        (dict(expert_cache_gb=1e-7), "less than one expert per MoE layer"),
        (dict(expert_cache_gb=-1.0), "must be > 0"),
        (dict(expert_prefetch_depth=1), "--expert-prefetch-depth needs expert offloading"),
        (dict(expert_cpu_compute="always"), "--expert-cpu-compute needs expert offloading"),
        (dict(resident_experts=0.5, expert_cpu_compute="sometimes"), "auto, never, always"),
        (dict(resident_experts=0.5, expert_prefetch_depth=-1), "must be >= 0"),
        (dict(expert_zero_copy="on"), "--expert-zero-copy needs expert offloading"),
        (dict(expert_admit_after=2), "--expert-admit-after needs expert offloading"),
        (dict(resident_experts=0.5, expert_zero_copy="yes"), "auto, on, off"),
        (
            dict(resident_experts=0.5, expert_zero_copy="on", expert_cpu_compute="always"),
            "cannot be combined",
        ),
        (dict(resident_experts=0.5, expert_admit_after=-1), "must be >= 0"),
    ]
    for kw, msg in cases:
        model = kw.pop("model", qwen3_dir)
        with pytest.raises(ModelLoadError, match=msg):
            engine(model, **kw)
    from actserve.server.cli import build_parser

    parser = build_parser()
    for argv in (["--resident-experts", "0"], ["--resident-experts", "0.5", "--expert-cache-gb", "2"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *argv])
    for argv in (["--expert-zero-copy", "maybe"], ["--expert-admit-after", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--resident-experts", "0.5", *argv])
    args = parser.parse_args(
        ["serve", "--expert-cache-gb", "1.5", "--expert-prefetch-depth", "2", "--expert-zero-copy", "off",
         "--expert-admit-after", "3"]
    )  # fmt: skip
    from actserve.server.cli import engine_config

    cfg = engine_config(args)
    assert (cfg.expert_cache_gb, cfg.expert_prefetch_depth, cfg.resident_experts) == (1.5, 2, None)
    assert (cfg.expert_zero_copy, cfg.expert_admit_after) == ("off", 3)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_model(FAMILIES["qwen3moe-normtopk-headdim"](), tmp_path_factory.mktemp("off") / "q3")


def test_cache_gb_sizes_slots(qwen3_dir: Path) -> None:
    """--expert-cache-gb: slots = GiB over (MoE layers x expert bytes), float32 here."""
    per_expert = 3 * 64 * 48 * 4
    eng = engine(qwen3_dir, expert_cache_gb=3.5 * 2 * per_expert / 2**30)
    assert eng.loaded.model.expert_offload.slots == 3
    gauge = eng.metrics.registry.get_sample_value(
        "actserve_moe_resident_expert_bytes", {"model_name": eng.model_name}
    )
    assert gauge == 3 * 2 * per_expert


def test_metrics_served_after_a_request(qwen3_dir: Path) -> None:
    server = start_server(qwen3_dir, num_kv_blocks=64, block_size=8, max_model_len=256, resident_experts=0.25)
    try:
        body = {"model": qwen3_dir.name, "prompt": prompts(1, 8, VOCAB, seed=4)[0], "max_tokens": 4,
                "min_tokens": 4, "temperature": 0}  # fmt: skip
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        text = httpx.get(f"{server.url}/metrics").text
        values = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("actserve_moe_")
        }
        assert values["actserve_moe_expert_cache_misses_total"] > 0
        assert values["actserve_moe_expert_cache_hits_total"] >= 0
        assert values["actserve_moe_expert_zero_copy_bytes_total"] > 0  # zero copy: the default here
        assert "actserve_moe_expert_copy_bytes_total" in values
        assert values["actserve_moe_resident_expert_bytes"] == 2 * 2 * 3 * 64 * 48 * 4
        assert values["actserve_moe_step_distinct_experts_count"] >= 4
        for name in ("predicted", "used", "correct"):
            assert f"actserve_moe_prefetch_{name}_total" in values
        assert "actserve_moe_cpu_experts_total" in values
    finally:
        server.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("mode", "zero_copy"), [("never", "off"), ("always", "auto"), ("auto", "off")])
def test_offloaded_on_cuda_equals_resident(mode: str, zero_copy: str, tmp_path: Path) -> None:
    """float32 on CUDA, eager steps (side-stream copies, events, the fused kernel, CPU experts from pinned
    memory): each step's logits equal the all-resident engine's to 1e-4 and the tokens are the same."""
    model_dir = save_random_model(FAMILIES["mixtral-window"](), tmp_path / "mix")
    kw: dict[str, Any] = {"device": "cuda", "dtype": "float32", "max_num_seqs": 8}
    batch = prompts(4, 9, VOCAB, seed=3)
    params = greedy(STEPS, min_tokens=STEPS)
    want_tokens, want = run_logged(engine(model_dir, **kw), batch, params, tag="g")
    eng = engine(model_dir, resident_experts=0.25, expert_cpu_compute=mode, expert_zero_copy=zero_copy, **kw)
    assert eng.runner.graphs is None
    tokens, seen = run_logged(eng, batch, params, tag="g")
    assert tokens == want_tokens
    for key in want:
        assert_steps_close([t.cpu() for t in seen[key]], [t.cpu() for t in want[key]], 1e-4, f"{mode} {key}")
    host = eng.loaded.model.model.layers[0].mlp.experts.host_w13
    assert host.is_pinned()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("family", "dtype"), [("mixtral-window", "float32"), ("qwen3moe-normtopk-headdim", "bfloat16")]
)
def test_zero_copy_on_cuda_is_bit_identical_with_graphs(family: str, dtype: str, tmp_path: Path) -> None:
    """Zero copy on CUDA: decode steps replay CUDA graphs whose MoE kernels read missing experts from pinned
    host memory, the cache refilled between steps on the side stream. Every step's logits are the
    all-resident engine's bit for bit (the same kernels and launch configs, weights from wherever the
    table points), in float32 and bf16, with a batch mixing the model's top_k with 1 and 2 (within the
    graphs' width; wider rows run eager, covered on the CPU)."""
    model_dir = save_random_model(FAMILIES[family](), tmp_path / family)
    kw: dict[str, Any] = {"device": "cuda", "dtype": dtype, "max_num_seqs": 8}
    batch = prompts(4, 9, VOCAB, seed=5)
    params = greedy(2 * STEPS, min_tokens=2 * STEPS)
    base = engine(model_dir, **kw)
    e = base.model_info.moe.num_experts
    specs = [None, top_k(1), top_k(2), None]
    want_tokens, want = run_logged(base, batch, params, specs, tag="z")
    for slots, admit in ((1, 1), (e // 2, 1), (e // 2, 0)):
        eng = engine(model_dir, resident_experts=slots / e, expert_admit_after=admit, **kw)
        offload = eng.loaded.model.expert_offload
        assert offload.zero_copy is not None and eng.runner.graphs is not None
        graph_steps = eng.runner.graph_steps
        tokens, seen = run_logged(eng, batch, params, specs, tag="z")
        assert eng.runner.graph_steps > graph_steps
        assert tokens == want_tokens, (slots, admit)
        same_steps(
            {k: [t.cpu() for t in v] for k, v in seen.items()},
            {k: [t.cpu() for t in v] for k, v in want.items()},
        )
        offload.flush_stats()
        got = counters(eng)
        assert got["moe_expert_zero_copy_bytes"] > 0 and got["moe_expert_cache_misses"] > 0
        if admit == 0:
            assert got["moe_expert_copy_bytes"] == 0
        assert got["moe_cpu_experts"] == 0
    host = eng.loaded.model.model.layers[0].mlp.experts.host_w13
    assert host.is_pinned()
