"""A small, typed view of a decoder-only HF config: what the native layers need and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actserve.server.layers.rotary import rope_parameters

# RoPE types whose frequencies do not depend on the running sequence length, so one table serves all.
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


# the checkpoint names of one expert's gate, up and down matrices, per family (`experts.{e}.<name>.weight`)
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoESpec:
    """The mixture-of-experts part of a config (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    renormalize: bool  # top-k weights renormalised to sum to 1 (Mixtral always; others `norm_topk_prob`)
    shared_intermediate_size: int = 0  # Qwen2-MoE's shared expert, gated by a sigmoid (0: none)
    dense_layers: frozenset[int] = frozenset()  # layers with a plain MLP (Qwen's mlp_only_layers / step)
    expert_names: tuple[str, str, str] = DEFAULT_EXPERT_NAMES

    def sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers

    def active_intermediate(self) -> int:
        """The MLP width a token goes through: its top-k experts and the shared one."""
        return self.top_k * self.intermediate_size + self.shared_intermediate_size

    @classmethod
    def from_hf_config(cls, config: Any, family: str) -> MoESpec:
        num_layers = config.num_hidden_layers
        if family == "mixtral":
            experts, renormalize = config.num_local_experts, True
        else:
            experts, renormalize = config.num_experts, bool(getattr(config, "norm_topk_prob", False))
        dense: set[int] = set(getattr(config, "mlp_only_layers", None) or ())
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        dense |= {i for i in range(num_layers) if (i + 1) % step}
        top_k = config.num_experts_per_tok
        if not 1 <= top_k <= experts:
            raise NotImplementedError(f"num_experts_per_tok={top_k} with {experts} experts")
        return cls(
            num_experts=experts,
            top_k=top_k,
            intermediate_size=getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
            renormalize=renormalize,
            shared_intermediate_size=int(getattr(config, "shared_expert_intermediate_size", 0) or 0),
            dense_layers=frozenset(i for i in dense if 0 <= i < num_layers),
            expert_names=EXPERT_NAMES.get(family, DEFAULT_EXPERT_NAMES),
        )


# families whose configs describe a mixture of experts (registry.py names the architectures)
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


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
    qk_norm: bool  # RMSNorm over each head of q and k (Qwen3)
    sliding_window: int | None
    rope_type: str
    qk_norm_full: bool = False  # RMSNorm over all of q and all of k, before the heads split (OLMoE)
    clip_qkv: float | None = None  # q, k, v clamped to [-clip, clip] (OLMoE)
    o_bias: bool = False  # o_proj has a bias (configs whose attention_bias covers o_proj too)
    moe: MoESpec | None = None

    def attention_break_even(self) -> int:
        """The context length at which a token's attention (QK^T and PV over its context) costs as many
        multiply-adds as its linear layers: the scheduler's exchange rate between a prefill chunk's
        context and tokens of the step budget (26.6k for Llama-3-8B, 3.1k for SmolLM2-135M)."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        mlp = self.moe.active_intermediate() if self.moe is not None else self.intermediate_size
        linear = self.hidden_size * (2 * q + 2 * kv) + 3 * self.hidden_size * mlp
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
        if family in ("mistral", "mixtral"):
            window = getattr(config, "sliding_window", None)
        elif family.startswith("qwen") and getattr(config, "use_sliding_window", False):
            raise NotImplementedError("Qwen sliding-window layers are not native")
        if family == "qwen2_moe":
            qkv_bias = bool(getattr(config, "qkv_bias", True))
        else:
            qkv_bias = family == "qwen2" or bool(getattr(config, "attention_bias", False))
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
            attention_bias=qkv_bias,
            qk_norm=family in ("qwen3", "qwen3_moe"),
            sliding_window=window,
            rope_type=rope["rope_type"],
            qk_norm_full=family == "olmoe",
            clip_qkv=getattr(config, "clip_qkv", None) if family == "olmoe" else None,
            # Llama, Qwen3(-MoE) and OLMoE configs' attention_bias covers o_proj (Qwen2's qkv bias does not)
            o_bias=bool(getattr(config, "attention_bias", False)),
            moe=MoESpec.from_hf_config(config, family) if family in MOE_FAMILIES else None,
        )
