"""Native Llama-family models against transformers' own implementation, in float32.

Random-init tiny configs of every family (with the RoPE scalings their configs use, GQA, biases, q/k
norm, tied and untied heads, sliding windows) and the real TinyStories-656K and SmolLM2-135M weights:
logits at prefill and at every decode step within 1e-4, greedy tokens identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from tests.conftest import save_random_model
from tests.engine_utils import capture_logits, greedy, run

TOL = 1e-4
STEPS = 12
COMMON = dict(
    vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip

FAMILIES = {
    "llama3-rope-untied": lambda: LlamaConfig(
        **COMMON, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    ),
    "llama-linear-rope-tied-mha": lambda: LlamaConfig(
        **{**COMMON, "num_key_value_heads": 4}, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "mistral-sliding-window": lambda: MistralConfig(**COMMON, sliding_window=8, tie_word_embeddings=False),
    "qwen2-bias-yarn": lambda: Qwen2Config(
        **COMMON, tie_word_embeddings=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "qwen3-qknorm-headdim": lambda: Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
}  # fmt: skip


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length + 3 * i,), generator=g).tolist() for i in range(n)]


def reference(model_dir: Path, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy decode with its own KV cache; the logits it saw at each step."""
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), [step[0].float() for step in out.logits]


def check_against_transformers(model_dir: Path, batch: list[list[int]], steps: int = STEPS) -> None:
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, block_size=8, max_model_len=256))
    assert engine.model_info.implementation == "native"
    with capture_logits() as seen:
        outs = run(engine, batch, greedy(steps, min_tokens=steps), tag="s")
    for i, prompt in enumerate(batch):
        ref_tokens, ref_logits = reference(model_dir, prompt, steps)
        ours = seen[f"s{i}"]
        assert len(ours) == steps
        for step, (a, b) in enumerate(zip(ours, ref_logits, strict=True)):
            diff = (a.to(b.device) - b).abs().max().item()  # a GPU engine's rows, a CPU reference
            assert diff < TOL, f"prompt {i} step {step}: max |logit diff| {diff:.2e}"
        assert outs[i] == ref_tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_family_matches_transformers(family: str, tmp_path: Path) -> None:
    model_dir = save_random_model(FAMILIES[family](), tmp_path / family)
    # prompts longer than the sliding window and spanning several 8-token KV blocks
    check_against_transformers(model_dir, prompts(3, 13, 2048, seed=len(family)))


def test_tinystories_matches_transformers(tinystories_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    texts = ["Once upon a time, there was a little dog", "Tom and Mia went to the park", "The sun"]
    check_against_transformers(tinystories_dir, [tok.encode(t) for t in texts], steps=20)


@pytest.mark.slow
def test_smollm2_matches_transformers(default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    batch = [tok.encode(text, add_special_tokens=False), tok.encode("The capital of France is")]
    check_against_transformers(default_model_dir, batch, steps=8)


def test_unsupported_rope_goes_to_fallback(tmp_path: Path) -> None:
    config = LlamaConfig(**COMMON, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    engine = LLMEngine(EngineConfig(model=str(save_random_model(config, tmp_path / "dyn")), num_kv_blocks=64))
    assert engine.model_info.implementation == "transformers"
