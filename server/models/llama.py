"""Native Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3) and the MoE families that share its
attention (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: `SparseMoeBlock` in place of the MLP) over packed
batches and paged KV.

q/k/v and gate/up are fused into one matmul each (fewer, larger GEMMs); checkpoints keep transformers'
names, and `packed_modules_mapping` says which checkpoint matrix is which shard of a fused layer (the
layer's `load_tensor` puts it there). The residual stream after decoder layer L is formed where
layer L+1's input norm (or the final norm) adds the MLP output, so steering at layer L happens there,
fused with the add and the norm.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from actserve.kernels.moe_ref import PendingSum
from actserve.server.contract.hooks import PROJECTIONS, LinearSite, StepHooks
from actserve.server.layers.attention import (
    AttentionBatch,
    AttentionHooks,
    notify_filled,
    observe_queries,
    paged_attention,
    select_blocks,
    step_filled,
)
from actserve.server.layers.linear import (
    Linear,
    LinearBase,
    MergedColumnLinear,
    WeightFormat,
    linear,
    silu_mul_linear,
)
from actserve.server.layers.moe import SparseMoeBlock
from actserve.server.layers.norm import RMSNorm
from actserve.server.layers.parallel import current as current_tp
from actserve.server.layers.parallel_linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from actserve.server.layers.rotary import RotaryEmbedding
from actserve.server.models.spec import ModelSpec

# a fresh WeightFormat per layer (None: dense)
FormatFactory = Callable[[], WeightFormat] | None

# a MoE layer's columns added by the next residual add instead of a launch of their own (kernels/moe_ref
# PendingSum); A/B switch (ACTSERVE_MOE_PENDING=0: the sum launch as before)
PENDING_MOE = os.environ.get("ACTSERVE_MOE_PENDING", "1") == "1"


def _fmt(factory: FormatFactory) -> WeightFormat | None:
    return factory() if factory is not None else None


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, weight_format: FormatFactory = None) -> None:
        super().__init__()
        d = spec.head_dim
        # tensor parallelism (docs/architecture.md §12): this rank's heads of q, k and v, o_proj over them
        self.tp = tp = current_tp()
        heads = tp.split(spec.num_heads, "num_attention_heads")
        kv_heads = tp.split(spec.num_kv_heads, "num_key_value_heads")
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, d
        self.q_size, self.kv_size = heads * d, kv_heads * d
        full = [spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d]
        if tp.parallel:
            if spec.qk_norm_full:
                raise ValueError("a q/k norm over all heads (OLMoE) is not split over tensor-parallel ranks")
            self.qkv_proj: MergedColumnLinear = MergedColumnParallelLinear(
                spec.hidden_size, full, ["q", "k", "v"], bias=spec.attention_bias,
                weight_format=_fmt(weight_format), what="attention heads",
            )  # fmt: skip
            self.o_proj: Linear = RowParallelLinear(
                full[0], spec.hidden_size, bias=spec.o_bias, weight_format=_fmt(weight_format)
            )
        else:
            self.qkv_proj = MergedColumnLinear(
                spec.hidden_size, full, ["q", "k", "v"], bias=spec.attention_bias,
                weight_format=_fmt(weight_format),
            )  # fmt: skip
            self.o_proj = Linear(
                full[0], spec.hidden_size, bias=spec.o_bias, weight_format=_fmt(weight_format)
            )
        if spec.qk_norm:  # per head (Qwen3)
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        elif spec.qk_norm_full:  # over all heads at once, before they split (OLMoE)
            self.q_norm = RMSNorm(self.q_size, spec.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_size, spec.rms_norm_eps)
        self.qk_norm, self.qk_norm_full, self.clip_qkv = spec.qk_norm, spec.qk_norm_full, spec.clip_qkv
        self.sliding_window = spec.sliding_window
        self.scale = d**-0.5

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        batch: AttentionBatch,
        lin: dict[str, LinearSite] | None = None,
        hooks: AttentionHooks | None = None,
        layer: int = 0,
        filled: tuple[torch.Tensor, torch.Tensor] | None = None,
        sums: bool = False,
    ) -> torch.Tensor:
        """`lin`: what plugins do at this layer's projections (None: nothing, the plain path). `hooks`:
        this layer's (`layer`) attention hooks: every row's queries to those that watch them, block selection
        for decode rows before attention, then
        `filled` (the blocks this step completes) after the K/V write. `sums`: the caller's residual add
        takes a one-row sparse GEMV's pending float32 sums (kernels/sparse_gemv.py), so o_proj may return
        them; qkv_proj's go to rope_kv where nothing else reads q/k/v (decode attention reads the cache)."""
        t = x.shape[0]
        sums = sums and x.is_cuda and lin is not None and not self.tp.parallel
        qkv_sums = sums and not self.qk_norm_full and self.clip_qkv is None and batch.block_tables is not None
        qkv = linear(
            x,
            self.qkv_proj,
            lin.get("qkv_proj") if lin is not None else None,
            "qkv_proj" if qkv_sums else None,
        )
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if x.is_cuda:  # (per-head q/k norm,) rotary and the KV write in one kernel
            from actserve.kernels.rope_kv import rope_kv

            norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else None
            q, k = rope_kv(
                q, k, v, rotary.cos, rotary.sin, positions, batch.slot_mapping, kv_cache[0], kv_cache[1],
                norm, x.dtype,
            )  # fmt: skip
            if hooks is not None:
                observe_queries(hooks, layer, q, positions)
                batch = select_blocks(hooks, layer, q, batch)
            o = paged_attention(
                q, k, v, kv_cache, batch, self.scale, self.sliding_window, write_kv=False,
                static_inputs=hooks is None,
            )  # fmt: skip
        else:
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotary(q, k, positions)
            if hooks is not None:
                observe_queries(hooks, layer, q, positions)
                batch = select_blocks(hooks, layer, q, batch)
            o = paged_attention(q, k, v, kv_cache, batch, self.scale, self.sliding_window)
        if hooks is not None and filled is not None:
            notify_filled(hooks, layer, kv_cache, filled)
        site = lin.get("o_proj") if lin is not None else None
        out = linear(o.reshape(t, -1), self.o_proj, site, "o_proj" if sums else None)
        return self.tp.all_reduce(out)  # tensor parallelism: the ranks' partial products summed


class MLP(nn.Module):
    def __init__(
        self, spec: ModelSpec, weight_format: FormatFactory = None, inter: int | None = None
    ) -> None:
        """`inter`: the hidden width (default the config's intermediate_size; a shared expert's own)."""
        super().__init__()
        inter = inter or spec.intermediate_size
        self.tp = tp = current_tp()
        if tp.parallel:  # this rank's channels of gate and up, down_proj over them
            self.gate_up_proj: MergedColumnLinear = MergedColumnParallelLinear(
                spec.hidden_size, [inter, inter], [0, 1], weight_format=_fmt(weight_format),
                what="intermediate_size",
            )  # fmt: skip
            self.down_proj: Linear = RowParallelLinear(
                inter, spec.hidden_size, weight_format=_fmt(weight_format), what="intermediate_size"
            )
        else:
            self.gate_up_proj = MergedColumnLinear(
                spec.hidden_size, [inter, inter], [0, 1], weight_format=_fmt(weight_format)
            )
            self.down_proj = Linear(inter, spec.hidden_size, weight_format=_fmt(weight_format))

    def forward(self, x: torch.Tensor, lin: dict[str, LinearSite] | None = None) -> torch.Tensor:
        if lin is None:
            return self.tp.all_reduce(silu_mul_linear(linear(x, self.gate_up_proj), self.down_proj))
        gate_up = linear(x, self.gate_up_proj, lin.get("gate_up_proj"))
        return self.tp.all_reduce(silu_mul_linear(gate_up, self.down_proj, lin.get("down_proj")))

    def forward_sums(
        self, x: torch.Tensor, lin: dict[str, LinearSite] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` for a caller whose residual add takes a one-row sparse GEMV's pending float32 sums
        (kernels/sparse_gemv.py): gate_up_proj's go straight into down_proj's loads, down_proj's are
        returned; the second item, when not None, is the gate/up sums that residual add must zero too
        (down_proj, their only reader, has run by then)."""
        if lin is None or self.tp.parallel or not x.is_cuda:
            return self.forward(x, lin), None
        gate_up = linear(x, self.gate_up_proj, lin.get("gate_up_proj"), "gate_up_proj")
        pending = gate_up if gate_up.dtype != x.dtype else None
        out = silu_mul_linear(gate_up, self.down_proj, lin.get("down_proj"), "down_proj", x.dtype)
        return out, pending


def moe_block(spec: ModelSpec, weight_format: FormatFactory = None) -> SparseMoeBlock:
    """A MoE layer of `spec`'s family (its shared expert, when it has one, is a dense `MLP`)."""
    moe = spec.moe
    assert moe is not None
    shared = MLP(spec, weight_format, moe.shared_intermediate_size) if moe.shared_intermediate_size else None
    return SparseMoeBlock(
        spec.hidden_size, moe.num_experts, moe.top_k, moe.intermediate_size, moe.renormalize,
        moe.expert_names, shared,
    )  # fmt: skip


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, weight_format: FormatFactory = None, index: int = 0) -> None:
        super().__init__()
        self.self_attn = Attention(spec, weight_format)
        self.is_moe = spec.moe is not None and spec.moe.sparse(index)
        if self.is_moe and current_tp().parallel:
            raise ValueError("mixture-of-experts layers are not split over tensor-parallel ranks")
        self.mlp: nn.Module = moe_block(spec, weight_format) if self.is_moe else MLP(spec, weight_format)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class LlamaBody(nn.Module):
    """`model.*` in HF checkpoints: embeddings, decoder layers, final norm."""

    def __init__(self, spec: ModelSpec, weight_format: FormatFactory = None) -> None:
        super().__init__()
        parallel = current_tp().parallel  # tensor parallelism: this rank's rows of the vocabulary
        self.embed_tokens: nn.Module = (
            VocabParallelEmbedding(spec.vocab_size, spec.hidden_size)
            if parallel
            else nn.Embedding(spec.vocab_size, spec.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(spec, weight_format, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


def add_norm(
    norm: RMSNorm,
    x: torch.Tensor | PendingSum | None,
    residual: torch.Tensor,
    layer: int,
    hooks: StepHooks | None,
    zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Form the residual after decoder layer `layer` (steered), then normalise it for what comes next.
    x may be pending sums and `zero` sums to zero (`RMSNorm.add_forward`)."""
    if hooks is None:
        return norm.add_forward(x, residual, zero=zero)
    if layer in hooks.residual:  # generic Python hooks need the stream itself, unfused
        _, h = norm.add_forward(x, residual, layer, hooks.steer, zero)
        h = hooks.after_layer(layer, h)
        return norm(h), h
    return norm.add_forward(x, residual, layer, hooks.steer, zero)


class LlamaForCausalLM(nn.Module):
    """Forward over a packed step; the residual hook point sits after every decoder layer.

    `weight_format` makes each decoder projection's format (dense when None); lm_head stays dense, as it
    may be tied to the embedding."""

    # fused layer -> the checkpoint matrices it packs, each with its shard id (MergedColumnLinear.shards)
    packed_modules_mapping = {
        "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    }

    def __init__(self, spec: ModelSpec, rotary: nn.Module, weight_format: FormatFactory = None) -> None:
        super().__init__()
        self.spec = spec
        self.tp = current_tp()
        self.model = LlamaBody(spec, weight_format)
        # the KV heads this rank keeps in its cache (all of them without tensor parallelism)
        self.local_kv_heads = self.tp.split(spec.num_kv_heads, "num_key_value_heads")
        self.lm_head: Linear = (
            ParallelLMHead(spec.hidden_size, spec.vocab_size)
            if self.tp.parallel
            else Linear(spec.hidden_size, spec.vocab_size)
        )
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = rotary
        # checkpoint name substrings the loader rewrites first (Mixtral's MoE block is `block_sparse_moe`)
        self.checkpoint_renames = ((".block_sparse_moe.", ".mlp."),) if spec.family == "mixtral" else ()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        batch: AttentionBatch,
        hooks: StepHooks | None = None,
    ) -> torch.Tensor:
        """Returns final-normed hidden states [T, hidden] for every packed row."""
        residual = self.model.embed_tokens(input_ids)
        x: torch.Tensor | PendingSum | None = None  # a MoE layer's may be its unadded columns
        zero: torch.Tensor | None = None  # pending gate/up sums the next residual add zeroes
        # the KV blocks this step completes, for attention hooks' `filled` (once per forward)
        filled = step_filled(positions, batch) if hooks is not None and hooks.attention else None
        for i, layer in enumerate(self.model.layers):
            lin = hooks.linear_at(i) if hooks is not None else None
            att = hooks.attention_at(i) if hooks is not None else None
            normed, residual = add_norm(layer.input_layernorm, x, residual, i - 1, hooks, zero)
            # the residual adds below take a one-row sparse GEMV's float32 sums (kernels/sparse_gemv.py)
            attn = layer.self_attn(
                normed, positions, self.rotary, kv_caches[i], batch, lin, att, i, filled, sums=True
            )
            normed, residual = layer.post_attention_layernorm.add_forward(attn, residual)
            zero = None
            if layer.is_moe:
                x = layer.mlp(normed, hooks.moe_at(i) if hooks is not None else None, i, PENDING_MOE)
            else:
                x, zero = layer.mlp.forward_sums(normed, lin)
        normed, _ = add_norm(self.model.norm, x, residual, len(self.model.layers) - 1, hooks, zero)
        return normed

    def projection(self, layer: int, name: str) -> LinearBase:
        """Decoder layer `layer`'s projection `name` (one of PROJECTIONS), for callers that install
        weight formats on it; ValueError naming what is wrong otherwise."""
        if not 0 <= layer < len(self.model.layers):
            raise ValueError(f"layer {layer} out of range (the model has {len(self.model.layers)})")
        if name not in PROJECTIONS:
            raise ValueError(f"unknown projection {name!r}; one of {', '.join(PROJECTIONS)}")
        block = self.model.layers[layer]
        if block.is_moe and name not in ("qkv_proj", "o_proj"):
            raise ValueError(
                f"layer {layer}'s MLP is a mixture of experts: its experts are not {name} projections "
                "(weight formats and linear hooks reach only qkv_proj and o_proj there)"
            )
        parent = block.self_attn if name in ("qkv_proj", "o_proj") else block.mlp
        return getattr(parent, name)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [rows, vocab]. Tensor parallelism: every rank computes its rows of the
        vocabulary, rank 0 gets them all (other ranks get None; only rank 0 samples)."""
        if not self.tp.parallel:
            return linear(hidden, self.lm_head).float()
        full = self.lm_head.logits(linear(hidden, self.lm_head))  # type: ignore[attr-defined]
        return full.float() if full is not None else None  # type: ignore[return-value]
