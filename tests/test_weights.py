"""Layers own their weights (server/layers/linear.py) and the model registry (server/models/registry.py).

The packed layers' load_tensor puts each checkpoint matrix in its slice; a second WeightFormat class
plugs in without touching the model or the loader, and the forward goes through it; a layer can hold a
second format of the same matrix, derived after loading; every native architecture resolves through
the registry, and an unknown one falls back to transformers, says so in the log and in /v1/models.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from actserve.server.contract.weights import Shard, WeightFormat, copy_rows
from actserve.server.layers.attention import AttentionBatch, SeqSlice, make_kv_cache
from actserve.server.layers.linear import (
    DenseFormat,
    LinearBase,
    MergedColumnLinear,
    linear,
    silu_mul_linear,
)
from actserve.server.models import registry
from actserve.server.models.llama import LlamaForCausalLM
from actserve.server.models.loader import ModelLoadError, after_loading, load_native, load_weights
from tests.conftest import save_random_model

COMMON = dict(
    vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.15,
)  # fmt: skip


# ------------------------------------------------------------------------------- test-only weight formats


class DoubledFormat(WeightFormat):
    """Stores 2 * W and halves it in apply (exact in binary floating point): a format whose storage
    differs from the checkpoint's, so equal logits prove the forward went through `apply`."""

    calls = 0

    def create(self, layer: LinearBase, params_dtype: torch.dtype | None) -> None:
        layer.register_parameter(
            self.prefix + "weight",
            torch.nn.Parameter(torch.empty(layer.output_size, layer.input_size, dtype=params_dtype)),
        )
        bias = (
            torch.nn.Parameter(torch.empty(layer.output_size, dtype=params_dtype)) if layer.has_bias else None
        )
        layer.register_parameter(self.prefix + "bias", bias)

    def load_shard(
        self,
        layer: LinearBase,
        name: str,
        param: torch.nn.Parameter,
        loaded: torch.Tensor,
        shard: Shard | None,
    ) -> None:
        copy_rows(param, loaded * 2 if name == "weight" else loaded, shard)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        DoubledFormat.calls += 1
        return F.linear(x, getattr(layer, self.prefix + "weight") * 0.5, getattr(layer, self.prefix + "bias"))


class TransposedCopyFormat(WeightFormat):
    """A second copy of the primary dense weight, stored [in, out], derived after loading (not in the
    checkpoint): the shape of a dense + quantized pair on one layer."""

    from_checkpoint = False

    def create(self, layer: LinearBase, params_dtype: torch.dtype | None) -> None:
        w = torch.empty(layer.input_size, layer.output_size, dtype=params_dtype)
        layer.register_parameter(self.prefix + "weight_t", torch.nn.Parameter(w, requires_grad=False))

    def load_shard(self, *args: object) -> None:
        raise AssertionError("not in the checkpoint")

    def after_loading(self, layer: LinearBase) -> None:
        with torch.no_grad():
            getattr(layer, self.prefix + "weight_t").copy_(layer.weight.T)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        y = x @ getattr(layer, self.prefix + "weight_t")
        return y + layer.bias if layer.bias is not None else y


# ---------------------------------------------------------------------------------------------- helpers


def load(model_dir: Path, weight_format: object = None) -> LlamaForCausalLM:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    spec = registry.resolve(config).spec
    files = sorted(model_dir.glob("*.safetensors"))
    return load_native(
        spec, config, files, torch.float32, torch.device("cpu"), 128, weight_format=weight_format
    )


@torch.inference_mode()
def prefill_logits(model: LlamaForCausalLM, prompts: list[list[int]]) -> torch.Tensor:
    spec = model.spec
    total = sum(map(len, prompts))
    cache = make_kv_cache(spec.num_layers, total, spec.num_kv_heads, spec.head_dim, torch.float32, "cpu")
    slices, start = [], 0
    for p in prompts:
        slices.append(SeqSlice(start, len(p), torch.arange(start, start + len(p))))
        start += len(p)
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.tensor([j for p in prompts for j in range(len(p))])
    hidden = model(ids, pos, cache, AttentionBatch(torch.arange(total), slices))
    return model.compute_logits(hidden)


def random_prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 2048, (n,), generator=g).tolist() for n in (5, 11)]


# ------------------------------------------------------------------------------------------- load_tensor


def test_merged_layer_load_tensor_puts_each_shard_in_its_rows() -> None:
    g = torch.Generator().manual_seed(1)
    layer = MergedColumnLinear(24, [16, 8, 8], ["q", "k", "v"], bias=True)
    parts = {
        s: (torch.randn(n, 24, generator=g), torch.randn(n, generator=g))
        for s, n in zip("qkv", (16, 8, 8), strict=True)
    }
    for s in ("v", "q", "k"):  # any order
        layer.load_tensor("weight", parts[s][0], s)
        layer.load_tensor("bias", parts[s][1], s)
    assert torch.equal(layer.weight, torch.cat([parts[s][0] for s in "qkv"]))
    assert torch.equal(layer.bias, torch.cat([parts[s][1] for s in "qkv"]))
    x = torch.randn(5, 24, generator=g)
    want = torch.cat([F.linear(x, *parts[s]) for s in "qkv"], dim=-1)
    torch.testing.assert_close(linear(x, layer), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="checkpoint shape"):
        layer.load_tensor("weight", torch.zeros(9, 24), "k")
    with pytest.raises(KeyError):
        layer.load_tensor("weight", parts["q"][0], "x")

    gate_up = MergedColumnLinear(24, [40, 40], [0, 1])
    gate, up = torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g)
    gate_up.load_tensor("weight", up, 1)
    gate_up.load_tensor("weight", gate, 0)
    assert torch.equal(gate_up.weight, torch.cat([gate, up]))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_checkpoint_walk_fills_packed_parameters(family: str, tmp_path: Path) -> None:
    """q/k/v (with Qwen2's biases) and gate/up of a saved checkpoint land in the packed parameters."""
    config = (LlamaConfig if family == "llama" else Qwen2Config)(**COMMON, tie_word_embeddings=False)
    model_dir = save_random_model(config, tmp_path / family, seed=5)
    ckpt = load_file(model_dir / "model.safetensors")
    model = load(model_dir)
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [ckpt[f"{pre}self_attn.{p}_proj.weight"] for p in "qkv"]
        assert torch.equal(attn.qkv_proj.weight, torch.cat(qkv))
        if family == "qwen2":
            assert torch.equal(
                attn.qkv_proj.bias, torch.cat([ckpt[f"{pre}self_attn.{p}_proj.bias"] for p in "qkv"])
            )
        else:
            assert attn.qkv_proj.bias is None
        gate_up = [ckpt[f"{pre}mlp.{p}_proj.weight"] for p in ("gate", "up")]
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat(gate_up))
        assert torch.equal(attn.o_proj.weight, ckpt[f"{pre}self_attn.o_proj.weight"])
        assert torch.equal(mlp.down_proj.weight, ckpt[f"{pre}mlp.down_proj.weight"])
        # the packed layer computes what the separate checkpoint matrices compute, on fresh inputs
        x = torch.randn(7, COMMON["hidden_size"], generator=torch.Generator().manual_seed(i))
        bias = attn.qkv_proj.bias
        torch.testing.assert_close(
            linear(x, attn.qkv_proj), F.linear(x, torch.cat(qkv), bias), rtol=0, atol=1e-5
        )
        h = linear(x, mlp.gate_up_proj)
        want = F.linear(F.silu(x @ gate_up[0].T) * (x @ gate_up[1].T), mlp.down_proj.weight)
        torch.testing.assert_close(silu_mul_linear(h, mlp.down_proj), want, rtol=0, atol=1e-5)
    assert torch.equal(model.lm_head.weight, ckpt["lm_head.weight"])


def test_missing_part_of_a_packed_layer_is_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model_dir = save_random_model(LlamaConfig(**COMMON), tmp_path / "m")
    ckpt = load_file(model_dir / "model.safetensors")
    del ckpt["model.layers.1.self_attn.k_proj.weight"]
    save_file(ckpt, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load(model_dir)


# ------------------------------------------------------------------------------------------ weight formats


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config])
def test_a_second_weight_format_plugs_in(config_cls: type, tmp_path: Path) -> None:
    """A model built with DoubledFormat stores 2W, computes through its apply, and gives dense's logits."""
    model_dir = save_random_model(config_cls(**COMMON, tie_word_embeddings=False), tmp_path / "m", seed=3)
    dense, doubled = load(model_dir), load(model_dir, weight_format=DoubledFormat)
    for a, b in zip(dense.model.layers, doubled.model.layers, strict=True):
        assert isinstance(b.self_attn.qkv_proj.format, DoubledFormat)
        assert isinstance(a.self_attn.qkv_proj.format, DenseFormat)
        assert torch.equal(b.self_attn.qkv_proj.weight, 2 * a.self_attn.qkv_proj.weight)
        assert torch.equal(b.mlp.down_proj.weight, 2 * a.mlp.down_proj.weight)
    prompts = random_prompts(seed=7)
    DoubledFormat.calls = 0
    got = prefill_logits(doubled, prompts)
    assert DoubledFormat.calls == 4 * COMMON["num_hidden_layers"]  # qkv, o, gate_up, down per layer
    want = prefill_logits(dense, prompts)
    assert torch.equal(got, want)


def test_a_layer_holds_two_formats(tmp_path: Path) -> None:
    """add_format: a derived second copy of every projection, filled after the checkpoint walk (not
    counted as missing), computes what the primary computes."""
    config = Qwen2Config(**COMMON, tie_word_embeddings=True)
    model_dir = save_random_model(config, tmp_path / "m", seed=4)
    model = LlamaForCausalLM(registry.resolve(config).spec, torch.nn.Module())
    layers = [m for m in model.modules() if isinstance(m, LinearBase) and m is not model.lm_head]
    for layer in layers:
        layer.add_format("t", TransposedCopyFormat())
        assert "t_weight_t" in dict(layer.named_parameters())
    model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, sorted(model_dir.glob("*.safetensors")), tied=True)
    after_loading(model)
    x = torch.randn(3, COMMON["hidden_size"], generator=torch.Generator().manual_seed(0))
    for layer in layers:
        assert torch.equal(layer.t_weight_t, layer.weight.T)
        k = layer.input_size
        xi = x if k == x.shape[1] else torch.randn(3, k, generator=torch.Generator().manual_seed(k))
        torch.testing.assert_close(layer.formats["t"].apply(layer, xi), linear(xi, layer), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="already"):
        layers[0].add_format("t", TransposedCopyFormat())


# ---------------------------------------------------------------------------------------------- registry

NATIVE = {
    "LlamaForCausalLM": (LlamaConfig, "llama"),
    "MistralForCausalLM": (MistralConfig, "mistral"),
    "Qwen2ForCausalLM": (Qwen2Config, "qwen2"),
    "Qwen3ForCausalLM": (Qwen3Config, "qwen3"),
    "MixtralForCausalLM": (MixtralConfig, "mixtral"),
    "Qwen2MoeForCausalLM": (Qwen2MoeConfig, "qwen2_moe"),
    "Qwen3MoeForCausalLM": (Qwen3MoeConfig, "qwen3_moe"),
    "OlmoeForCausalLM": (OlmoeConfig, "olmoe"),
}


def test_registry_covers_exactly_the_native_architectures() -> None:
    assert set(registry.NATIVE_MODELS) == set(NATIVE)


@pytest.mark.parametrize("arch", sorted(NATIVE))
def test_native_architecture_resolves(arch: str) -> None:
    config_cls, family = NATIVE[arch]
    config = config_cls(**COMMON, architectures=[arch])
    native = registry.resolve(config)
    assert native.model_class is LlamaForCausalLM and native.fallback_reason is None
    assert native.architecture == arch and native.spec.family == family
    forced = registry.resolve(config, force_transformers=True)
    assert forced.model_class is None and forced.fallback_reason == "--force-transformers"


def test_unknown_architecture_falls_back_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi.testclient import TestClient

    from actserve.server.api.app import create_app
    from actserve.server.engine.async_engine import make_engine
    from actserve.server.engine.config import EngineConfig

    config = GPT2Config(vocab_size=2048, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                        eos_token_id=2)  # fmt: skip
    model_dir = save_random_model(config, tmp_path / "gpt2")
    native = registry.resolve(config)
    assert native.model_class is None and "GPT2LMHeadModel" in (native.fallback_reason or "")
    with caplog.at_level(logging.INFO, logger="actserve.server.models.builder"):
        engine = make_engine(EngineConfig(model=str(model_dir), num_kv_blocks=64, engine_process="off"))
    lines = [r.getMessage() for r in caplog.records if "transformers fallback" in r.getMessage()]
    assert len(lines) == 1 and "GPT2LMHeadModel" in lines[0], lines
    with TestClient(create_app(engine=engine)) as client:
        card = client.get("/v1/models").json()["data"][0]
    assert card["implementation"] == "transformers"
    assert "no native implementation for architecture GPT2LMHeadModel" in card["fallback_reason"]


def test_native_card_has_no_fallback_reason(tinystories_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from actserve.server.api.app import create_app
    from actserve.server.engine.async_engine import make_engine
    from actserve.server.engine.config import EngineConfig

    engine = make_engine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64, engine_process="off"))
    with TestClient(create_app(engine=engine)) as client:
        card = client.get("/v1/models").json()["data"][0]
    assert card["implementation"] == "native" and card["fallback_reason"] is None
