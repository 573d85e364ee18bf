"""A small, typed view of a decoder-only HF config: what the native layers need and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actserve.server.layers.rotary import rope_parameters

# RoPE types whose frequencies do not depend on the running sequence length, so one table serves all.
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and options of a Llama-family model, read once from its HF config."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    sliding_window: int | None
    rope_type: str

    def attention_break_even(self) -> int:
        """The context length at which a token's attention (QK^T and PV over its context) costs as many
        multiply-adds as its linear layers: the scheduler's exchange rate between a prefill chunk's
        context and tokens of the step budget (26.6k for Llama-3-8B, 3.1k for SmolLM2-135M)."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        linear = self.hidden_size * (2 * q + 2 * kv) + 3 * self.hidden_size * self.intermediate_size
        return max(1, linear // (2 * q))

    @classmethod
    def from_hf_config(cls, config: Any, family: str) -> ModelSpec:
        """`family` comes from the model registry (server/models/registry.py), which knows the
        architectures; this reads the config's options for it and refuses the ones it lacks."""
        if getattr(config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={config.hidden_act} is not native")
        if getattr(config, "mlp_bias", False):
            raise NotImplementedError("mlp_bias=True is not native")
        rope = rope_parameters(config)
        if rope["rope_type"] not in STATIC_ROPE_TYPES:
            raise NotImplementedError(f"rope_type={rope['rope_type']} is not native")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        window = None
        if family == "mistral":
            window = getattr(config, "sliding_window", None)
        elif family in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
            raise NotImplementedError("Qwen sliding-window layers are not native")
        return cls(
            family=family,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=window,
            rope_type=rope["rope_type"],
        )
