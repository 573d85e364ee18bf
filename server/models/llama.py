"""Native Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3) over packed batches and paged KV.

Module and parameter names mirror transformers' so safetensors checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from actserve.server.layers.attention import AttentionBatch, paged_attention
from actserve.server.layers.hooks import StepHooks
from actserve.server.layers.norm import RMSNorm
from actserve.server.layers.rotary import RotaryEmbedding
from actserve.server.models.spec import ModelSpec


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        d, bias = spec.head_dim, spec.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, d
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(spec.num_heads * d, spec.hidden_size, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.sliding_window = spec.sliding_window
        self.scale = d**-0.5

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, k, positions)
        o = paged_attention(q, k, v, kv_cache, batch, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, rotary, kv_cache, batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaBody(nn.Module):
    """`model.*` in HF checkpoints: embeddings, decoder layers, final norm."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Forward over a packed step; the residual hook point sits after every decoder layer."""

    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.spec = spec
        self.model = LlamaBody(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = rotary

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        batch: AttentionBatch,
        hooks: StepHooks | None = None,
    ) -> torch.Tensor:
        """Returns final-normed hidden states [T, hidden] for every packed row."""
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, positions, self.rotary, kv_caches[i], batch)
            if hooks:
                h = hooks.after_layer(i, h)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
