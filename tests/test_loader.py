"""Model loading: pickle refusal, the transformers fallback path (batches and steers), config errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.models.loader import ModelLoadError
from tests.engine_utils import greedy, run


def pickle_only_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


def test_pickle_checkpoint_refused_unless_allowed(tinystories_dir: Path, tmp_path: Path) -> None:
    model_dir = pickle_only_copy(tinystories_dir, tmp_path / "pickled")
    with pytest.raises(ModelLoadError, match="--allow-pickle-weights"):
        LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64))
    allowed = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, allow_pickle_weights=True))
    reference = LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64))
    prompt = AutoTokenizer.from_pretrained(tinystories_dir).encode("The cat sat")
    assert run(allowed, [prompt], greedy(10)) == run(reference, [prompt], greedy(10))


def test_bad_settings_are_clear(tinystories_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="max_position_embeddings"):
        LLMEngine(EngineConfig(model=str(tinystories_dir), max_model_len=100_000))
    with pytest.raises(ModelLoadError, match="num-kv-blocks"):
        LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=2))
    with pytest.raises(ModelLoadError, match="dtype"):
        LLMEngine(EngineConfig(model=str(tinystories_dir), dtype="float8"))
    (tmp_path / "empty").mkdir()
    shutil.copy(tinystories_dir / "config.json", tmp_path / "empty" / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tinystories_dir / name, tmp_path / "empty" / name)
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLMEngine(EngineConfig(model=str(tmp_path / "empty")))


def test_fallback_path_batches_and_steers(tinystories_dir: Path) -> None:
    """transformers' own model on the fallback path gives the native path's greedy tokens, steered or not."""
    native = LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64))
    fallback = LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64, force_transformers=True))
    assert fallback.model_info.implementation == "transformers"
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    prompts = [tok.encode(t) for t in ("Once upon a time", "The big red dog", "Lily was sad because")]
    d = torch.randn(128, generator=torch.Generator().manual_seed(3)).tolist()
    steer = {"steering": {"vectors": [{"directions": {"1": d}, "scale": 25.0, "phases": ["generation"]}]}}
    specs = [None, steer, None]
    ours = run(native, prompts, greedy(24), interventions=specs)
    theirs = run(fallback, prompts, greedy(24), interventions=specs)
    assert theirs == ours
    assert run(native, prompts[1:2], greedy(24)) != ours[1]  # the steering did change that request
    assert not fallback.runner.caches  # finished sequences dropped their transformers caches
