"""Native model families, keyed by the HF config's `architectures` name.

Adding a family is one module (the model class: the forward signature of `llama.LlamaForCausalLM` and a
`packed_modules_mapping`) plus one entry here. An architecture without an entry is served by the
transformers fallback (`hf_fallback.py`); `resolve` says why, and the server logs that and shows it in
`GET /v1/models` (`fallback_reason`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from actserve.server.models.spec import ModelSpec


@dataclass(frozen=True)
class NativeFamily:
    family: str  # ModelSpec.family: the options of this architecture (sliding window, q/k norm, ...)
    module: str  # imported only when a model of this family is loaded
    class_name: str

    def model_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.class_name)


_LLAMA = "actserve.server.models.llama"
NATIVE_MODELS: dict[str, NativeFamily] = {
    "LlamaForCausalLM": NativeFamily("llama", _LLAMA, "LlamaForCausalLM"),
    "MistralForCausalLM": NativeFamily("mistral", _LLAMA, "LlamaForCausalLM"),
    "Qwen2ForCausalLM": NativeFamily("qwen2", _LLAMA, "LlamaForCausalLM"),
    "Qwen3ForCausalLM": NativeFamily("qwen3", _LLAMA, "LlamaForCausalLM"),
    # mixtures of experts: the same attention, a SparseMoeBlock in place of the MLP
    "MixtralForCausalLM": NativeFamily("mixtral", _LLAMA, "LlamaForCausalLM"),
    "Qwen2MoeForCausalLM": NativeFamily("qwen2_moe", _LLAMA, "LlamaForCausalLM"),
    "Qwen3MoeForCausalLM": NativeFamily("qwen3_moe", _LLAMA, "LlamaForCausalLM"),
    "OlmoeForCausalLM": NativeFamily("olmoe", _LLAMA, "LlamaForCausalLM"),
}


def architecture_of(config: Any) -> str:
    return (getattr(config, "architectures", None) or ["?"])[0]


def lookup(architecture: str) -> NativeFamily | None:
    return NATIVE_MODELS.get(architecture)


def model_class_for_family(family: str) -> type:
    for entry in NATIVE_MODELS.values():
        if entry.family == family:
            return entry.model_class()
    raise KeyError(f"no native model class for family {family!r}")


@dataclass(frozen=True)
class Resolution:
    """What serves a config: a native class and its spec, or the fallback and the reason for it."""

    architecture: str
    model_class: type | None
    spec: ModelSpec | None
    fallback_reason: str | None


def resolve(config: Any, force_transformers: bool = False) -> Resolution:
    arch = architecture_of(config)
    if force_transformers:
        return Resolution(arch, None, None, "--force-transformers")
    entry = lookup(arch)
    if entry is None:
        return Resolution(arch, None, None, f"no native implementation for architecture {arch}")
    try:
        spec = ModelSpec.from_hf_config(config, entry.family)
    except NotImplementedError as why:
        return Resolution(arch, None, None, f"native {arch} does not support this config: {why}")
    return Resolution(arch, entry.model_class(), spec, None)
