"""Tensor parallelism over every dense native family (random-init tiny configs: Llama 3 RoPE untied,
linear RoPE tied MHA, Mistral's sliding window, Qwen2's q/k/v biases and YaRN, Qwen3's per-head q/k norm
and head_dim): 2 ranks on the CPU (gloo, float32) against one rank, logits at prefill and every decode
step within 1e-5 of the logits' scale, identical greedy tokens, with chunked prefill."""

from __future__ import annotations

from pathlib import Path

import pytest

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from tests.conftest import save_random_model
from tests.engine_utils import capture_logits, greedy, run
from tests.test_native_models import FAMILIES, prompts
from tests.test_tp_engine import close

pytestmark = pytest.mark.slow  # processes of their own: seconds each

STEPS = 8


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_split_over_two_ranks_equals_one(family: str, tmp_path: Path) -> None:
    model_dir = save_random_model(FAMILIES[family](), tmp_path / family)
    batch = prompts(3, 11, 2048, seed=len(family))
    kw = dict(model=str(model_dir), num_kv_blocks=64, block_size=8, max_model_len=256)
    kw |= dict(max_num_batched_tokens=16, max_num_seqs=4)  # prompts prefill in chunks beside decodes
    seen = []
    outs = []
    for tp in (1, 2):
        eng = LLMEngine(EngineConfig(**kw, tensor_parallel_size=tp))  # type: ignore[arg-type]
        try:
            with capture_logits() as logits:
                outs.append(run(eng, batch, greedy(STEPS), tag="f"))
        finally:
            eng.close()
        seen.append(logits)
    assert outs[1] == outs[0]
    for key, ours in seen[0].items():
        assert len(ours) == len(seen[1][key]) == STEPS
        for step, (a, b) in enumerate(zip(ours, seen[1][key], strict=True)):
            assert close(b, a) < 1, f"{key} step {step}: max |logit diff| {(a - b).abs().max().item():.2e}"
