"""Native MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and per-request top_k (`{"moe": {"top_k":
k}}`) against transformers' own models, in float32 on random-init tiny configs: logits at prefill and at
every decode step within 1e-4, greedy tokens identical; a dense model upcycled into identical experts
gives the dense model's tokens at every top_k; a batch mixing top_k equals each request alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from actserve.interventions.base import InterventionError
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from tests.conftest import TINYSTORIES, TOKENIZER_FILES, assert_refused, save_random_model, start_server
from tests.engine_utils import assert_steps_close, greedy, hf_generate, run_logged
from tests.test_native_models import check_against_transformers, prompts

TOL = 1e-4
STEPS = 6
VOCAB = 2048
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, rms_norm_eps=1e-6,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_parameters=ROPE,
)  # fmt: skip

FAMILIES = {
    "mixtral-window": lambda: MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=8
    ),
    # norm_topk_prob off, a shared expert, and layer 1 a plain MLP (mlp_only_layers)
    "qwen2moe-shared-dense-layer": lambda: Qwen2MoeConfig(
        **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
        shared_expert_intermediate_size=80, norm_topk_prob=False, mlp_only_layers=[1],
    ),
    "qwen3moe-normtopk-headdim": lambda: Qwen3MoeConfig(
        **COMMON, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=True,
        head_dim=32,
    ),
    "olmoe-clip": lambda: OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, clip_qkv=0.6),
}  # fmt: skip


def engine(model_dir: Path, **kw: Any) -> LLMEngine:
    cfg = {"device": "cpu", "num_kv_blocks": 128, "block_size": 8, "max_model_len": 256,
           "enable_prefix_caching": False, **kw}  # fmt: skip
    return LLMEngine(EngineConfig(model=str(model_dir), **cfg))


def top_k(k: int | None) -> dict[str, Any] | None:
    return {"moe": {"top_k": k}} if k is not None else None


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_model(FAMILIES["qwen3moe-normtopk-headdim"](), tmp_path_factory.mktemp("moe") / "q3")


@pytest.fixture(scope="module")
def qwen3(qwen3_dir: Path) -> LLMEngine:
    return engine(qwen3_dir)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_transformers(family: str, tmp_path: Path) -> None:
    model_dir = save_random_model(FAMILIES[family](), tmp_path / family)
    # prompts longer than the sliding window and spanning several 8-token KV blocks
    check_against_transformers(model_dir, prompts(2, 11, VOCAB, seed=len(family)), steps=STEPS)


@pytest.mark.parametrize("family", ["qwen3moe-normtopk-headdim", "qwen2moe-shared-dense-layer"])
def test_per_request_top_k_equals_transformers_with_that_k(family: str, tmp_path: Path) -> None:
    """One batch with top_k 1, the model's own (no field), a larger one and every expert: each sequence
    equals transformers loaded with num_experts_per_tok = its k (renormalised, or not, as the config says)."""
    model_dir = save_random_model(FAMILIES[family](), tmp_path / family)
    eng = engine(model_dir)
    moe = eng.model_info.moe
    assert moe is not None
    ks = [1, None, moe.top_k + 1, moe.num_experts]
    batch = prompts(len(ks), 9, VOCAB, seed=5)
    tokens, seen = run_logged(eng, batch, greedy(STEPS, min_tokens=STEPS), [top_k(k) for k in ks], tag="k")
    for i, (k, prompt) in enumerate(zip(ks, batch, strict=True)):
        ref = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, num_experts_per_tok=k or moe.top_k
        ).eval()
        ref_tokens, ref_logits = hf_generate(ref, prompt, STEPS)
        assert_steps_close(seen[f"k{i}"], ref_logits, TOL, f"top_k {k}")
        assert tokens[i] == ref_tokens, k


def test_mixed_top_k_batch_equals_each_request_alone(qwen3: LLMEngine) -> None:
    """Tokens exact, logits within 2e-5 (CPU matmuls over other expert batches may round differently)."""
    ks = [2, None, 7, 1]
    batch = prompts(len(ks), 7, VOCAB, seed=11)
    params = greedy(STEPS, min_tokens=STEPS)
    tokens, seen = run_logged(qwen3, batch, params, [top_k(k) for k in ks], tag="m")
    for i, (k, prompt) in enumerate(zip(ks, batch, strict=True)):
        (solo,), solo_seen = run_logged(qwen3, [prompt], params, [top_k(k)], tag=f"s{i}_")
        assert tokens[i] == solo, k
        assert_steps_close(seen[f"m{i}"], solo_seen[f"s{i}_0"], 2e-5, f"top_k {k}")


def test_prompt_kv_not_shared_across_top_k(qwen3_dir: Path, qwen3: LLMEngine) -> None:
    """With prefix caching, a top_k request after a plain one of the same prompt computes its own prompt
    K/V (the k is its prefix-cache key): its logits are those of an engine without the cache."""
    cached = engine(qwen3_dir, enable_prefix_caching=True)
    prompt = prompts(1, 17, VOCAB, seed=8)
    params = greedy(STEPS, min_tokens=STEPS)
    run_logged(cached, prompt, params, [None], tag="p")
    tokens, seen = run_logged(cached, prompt, params, [top_k(6)], tag="c")
    want, want_seen = run_logged(qwen3, prompt, params, [top_k(6)], tag="n")
    assert tokens == want
    assert_steps_close(seen["c0"], want_seen["n0"], 1e-5, "cached")


def upcycled(tmp_path: Path) -> tuple[Path, Path]:
    """A random Mixtral whose 4 experts are all expert 0, and the dense Llama with expert 0 as its MLP
    (same attention, norms, embeddings, head)."""
    config = MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    moe_dir = save_random_model(config, tmp_path / "m")
    tensors = load_file(moe_dir / "model.safetensors")
    dense: dict[str, torch.Tensor] = {}
    for name, t in list(tensors.items()):
        if ".experts." in name:
            first = name.split(".experts.")[0] + ".experts.0." + name.split(".experts.")[1].split(".", 1)[1]
            tensors[name] = tensors[first].clone()
            if ".experts.0." in name:
                w = name.rsplit(".", 2)[1]
                proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[w]
                dense[name.split(".block_sparse_moe.")[0] + f".mlp.{proj}.weight"] = t.clone()
        elif ".block_sparse_moe.gate." not in name:
            dense[name] = t
    save_file(tensors, moe_dir / "model.safetensors", metadata={"format": "pt"})
    dense_dir = tmp_path / "dense"
    LlamaConfig(**COMMON, tie_word_embeddings=False).save_pretrained(dense_dir)
    save_file(dense, dense_dir / "model.safetensors", metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        (dense_dir / name).write_bytes((TINYSTORIES / name).read_bytes())
    return moe_dir, dense_dir


def test_upcycled_dense_model_gives_dense_tokens_at_every_top_k(tmp_path: Path) -> None:
    """Identical experts with renormalised weights are the dense MLP, whatever the router picks: every
    top_k (and the default) in one batch gives transformers' dense Llama's tokens and logits."""
    moe_dir, dense_dir = upcycled(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    ks = [None, 1, 2, 3, 4]
    batch = prompts(1, 10, VOCAB, seed=2) * len(ks)
    tokens, seen = run_logged(engine(moe_dir), batch, greedy(STEPS, min_tokens=STEPS), [top_k(k) for k in ks])
    ref_tokens, ref_logits = hf_generate(ref, batch[0], STEPS)
    for i, k in enumerate(ks):
        assert tokens[i] == ref_tokens, k
        assert_steps_close(seen[f"r{i}"], ref_logits, TOL, f"top_k {k}")


def test_refusals(qwen3: LLMEngine, qwen3_dir: Path) -> None:
    """Out of range, and models that are not native MoE: InterventionErrors naming the field."""
    field = "interventions.moe.top_k"
    for k in (0, 9, -1):
        with pytest.raises(InterventionError, match=r"\[1, 8\]") as e:
            qwen3.registry.prepare(top_k(k))
        assert e.value.param == field
    assert qwen3.registry.prepare(top_k(3)) == {}  # the model's own k: a plain request
    dense = engine(TINYSTORIES)
    with pytest.raises(InterventionError, match="not a mixture-of-experts model") as e:
        dense.registry.prepare(top_k(2))
    assert e.value.param == field
    fallback = engine(qwen3_dir, force_transformers=True)
    with pytest.raises(InterventionError, match="native") as e:
        fallback.registry.prepare(top_k(2))
    assert e.value.param == field


def test_unbuilt_paths_are_refused(qwen3: LLMEngine, qwen3_dir: Path) -> None:
    """What does not reach experts yet is refused by name, never silently partial: FP4 weights at load
    (--quantization) and per request (--precisions), sparsity; and the experts are no projections."""
    from actserve.server.models.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="--quantization nvfp4: FP4 weights of mixture-of-experts"):
        engine(qwen3_dir, quantization="nvfp4")
    with pytest.raises(ValueError, match="precisions: FP4 copies of a mixture-of-experts"):
        engine(qwen3_dir, plugin_options={"precision": {"precisions": "bf16,nvfp4"}})
    with pytest.raises(InterventionError, match="mixture-of-experts") as e:
        qwen3.registry.prepare({"sparsity": {"method": "teal", "level": 0.5}})
    assert e.value.param == "interventions.sparsity"
    assert (0, "gate_up_proj") not in qwen3.model_info.projection_sites()
    assert (1, "o_proj") in qwen3.model_info.projection_sites()
    with pytest.raises(ValueError, match="mixture of experts"):
        qwen3.runner.model.projection(0, "down_proj")


def test_over_http(qwen3_dir: Path, qwen3: LLMEngine) -> None:
    """Served: a request's top_k gives the engine's tokens; bad specs are 400s naming the field."""
    from transformers import AutoTokenizer

    server = start_server(qwen3_dir, num_kv_blocks=64, block_size=8, max_model_len=256)
    field = "interventions.moe"
    try:
        listed = {d["name"]: d for d in httpx.get(f"{server.url}/v1/interventions").json()["data"]}
        assert listed["moe"]["hook_points"] == ["moe"]
        prompt = prompts(1, 8, VOCAB, seed=4)[0]
        body = {"model": qwen3_dir.name, "prompt": prompt, "max_tokens": STEPS, "min_tokens": STEPS,
                "temperature": 0, "interventions": top_k(5)}  # fmt: skip
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        (tokens,), _ = run_logged(qwen3, [prompt], greedy(STEPS, min_tokens=STEPS), [top_k(5)], tag="h")
        assert r.json()["choices"][0]["text"] == AutoTokenizer.from_pretrained(qwen3_dir).decode(tokens)
        bad = [
            (top_k(0), f"{field}.top_k", ["[1, 8]"]),
            (top_k(9), f"{field}.top_k", ["[1, 8]", "got 9"]),
            ({"moe": {"top_k": "two"}}, f"{field}.top_k", []),
            ({"moe": {"top_k": 2.0}}, f"{field}.top_k", []),
            ({"moe": {"top_k": True}}, f"{field}.top_k", []),
            ({"moe": {}}, f"{field}.top_k", ["required"]),
            ({"moe": {"top_k": 2, "layers": [0]}}, f"{field}.layers", []),
            ({"moe": 2}, field, []),
        ]
        assert_refused(server.url, body, bad)
    finally:
        server.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen3moe-normtopk-headdim", "mixtral-window"])
def test_cuda_graphs_with_mixed_top_k(family: str, tmp_path: Path) -> None:
    """float32 on CUDA through the fused kernel: decode steps mixing top_k within the plugin's graph width
    replay CUDA graphs (no eager decode step), and every row's logits are transformers' with its k; a
    row wider than the graph width runs eager and is right too."""
    model_dir = save_random_model(FAMILIES[family](), tmp_path / family)
    eng = engine(model_dir, device="cuda", dtype="float32", max_num_seqs=8)
    moe = eng.model_info.moe
    assert moe is not None
    batch = prompts(5, 9, VOCAB, seed=3)
    params = greedy(STEPS, min_tokens=STEPS)
    for ks in ([None, 1, moe.top_k + 1, None, 2 * moe.top_k], [None, moe.num_experts, 1, None, None]):
        eager0, graph0 = eng.runner.eager_decode_steps, eng.runner.graph_steps
        tokens, seen = run_logged(eng, batch, params, [top_k(k) for k in ks], tag="g")
        if max(k or 0 for k in ks) <= min(moe.num_experts, 2 * moe.top_k):
            assert eng.runner.eager_decode_steps == eager0 and eng.runner.graph_steps > graph0
        for i, (k, prompt) in enumerate(zip(ks, batch, strict=True)):
            ref = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, num_experts_per_tok=k or moe.top_k
            ).eval()
            ref_tokens, ref_logits = hf_generate(ref, prompt, STEPS)
            assert_steps_close([t.cpu() for t in seen[f"g{i}"]], ref_logits, 1e-3, f"top_k {k}")
            assert tokens[i] == ref_tokens, k
