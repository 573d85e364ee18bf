"""What interventions validate against: the loaded model's facts (docs/architecture.md §6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actserve.server.contract.hooks import PROJECTIONS


@dataclass(frozen=True)
class MoEInfo:
    """The native MoE model's routing, for plugins that change it (the `moe` hook point)."""

    num_experts: int
    top_k: int  # experts per token by default (config `num_experts_per_tok`)
    renormalize: bool  # the top-k weights are renormalised to sum to 1 (Mixtral; `norm_topk_prob`)
    layers: tuple[int, ...]  # the decoder layers whose MLP is a mixture of experts


@dataclass
class ModelInfo:
    """What interventions validate against (docs/architecture.md §6, `model_info`)."""

    name: str
    path: str
    architecture: str
    implementation: str  # "native" or "transformers"
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    is_moe: bool = False
    model_type: str = ""  # HF config.model_type (e.g. "llama"): the `model_hint` of control vectors
    # the embedded default model (server/models/default_model.py) is what is served: data shipped for
    # it (e.g. the CoT-compression artifact) may be used
    embedded_default: bool = False
    fallback_reason: str | None = None  # why a "transformers" implementation is not native
    block_size: int = 16  # tokens per paged-KV block (what attention hooks' block tables count in)
    eos_token_ids: tuple[int, ...] = ()  # the tokens that end a sequence (generation config, tokenizer)
    # the decoder's shapes, for plugins that size per-channel tables or split fused projections (qkv_proj's
    # output is q [num_heads * head_dim], k, v [num_kv_heads * head_dim] each; 0: not known)
    intermediate_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    moe: MoEInfo | None = None  # a native mixture-of-experts model's routing (None: dense, or the fallback)
    # ranks the model is split over (--tensor-parallel-size); the shapes above stay the whole model's.
    # Plugins that do not declare `tp_mode` are refused when it is above 1 (docs/architecture.md §12)
    tensor_parallel_size: int = 1

    def projection_sites(self) -> list[tuple[int, str]]:
        """Every (layer, projection) that linear hooks and weight formats can reach: all of PROJECTIONS in
        a dense layer, only qkv_proj and o_proj in a mixture-of-experts layer (its experts are not
        projections of their own)."""
        moe = set(self.moe.layers) if self.moe is not None else set()
        attention = ("qkv_proj", "o_proj")
        layers = range(self.num_layers)
        return [(layer, p) for layer in layers for p in PROJECTIONS if layer not in moe or p in attention]
