"""Residual collection reads exactly what a forward hook on transformers' model.layers[L] sees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actserve.interventions.steering.hidden import collect_residuals
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine


def hooked_outputs(ref: torch.nn.Module, ids: list[int], layers: list[int]) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    handles = [
        ref.model.layers[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: seen.__setitem__(
                layer, (out[0] if isinstance(out, tuple) else out)[0]
            )
        )
        for layer in layers
    ]
    with torch.no_grad():
        ref(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("position", ["last", "mean"])
def test_matches_forward_hook(tinystories_dir: Path, position: str) -> None:
    engine = LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64))
    ref = AutoModelForCausalLM.from_pretrained(tinystories_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    prompts = [tok.encode(t) for t in ("A happy dog", "The girl was very sad and cried all day", "Sun")]
    got = collect_residuals(engine.runner, prompts, [0, 1], position, batch_tokens=12)  # type: ignore[arg-type]
    for i, p in enumerate(prompts):
        seen = hooked_outputs(ref, p, [0, 1])
        for k, layer in enumerate([0, 1]):
            want = seen[layer][-1] if position == "last" else seen[layer].mean(0)
            assert (got[i, k] - want).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="out of range"):
        collect_residuals(engine.runner, prompts, [2])  # type: ignore[arg-type]
