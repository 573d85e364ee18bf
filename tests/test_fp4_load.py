"""FP4 as the primary format of a served model (server/models/quantization.py, server/contract/fp4_format.py).

- The committed NVFP4 checkpoint, written by compressed-tensors (tests/data/tinystories-656k-nvfp4,
  bench/make_nvfp4_checkpoint.py), loads packed, and the engine's logits (prefill and decode) equal
  transformers' float32 model whose projections are the checkpoint's codes dequantized by
  kernels/fp4_ref.py, read straight from the safetensors file.
- `--quantization nvfp4|mxfp4` on the dense TinyStories equals transformers with each projection replaced
  by dequantize(quantize_rtn(W)); no dense copy is kept and weights_bytes shrinks by exactly the packed
  sizes.
- What cannot be served is refused naming the flag or the config field.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, LlamaConfig

from actserve.kernels.fp4_ref import GROUP, Fp4Weight, dequantize, quantize_rtn
from actserve.server.cli import build_parser, engine_config
from actserve.server.contract.fp4_format import FP4Format
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.layers.fp4_gptq import gptq_fp4
from actserve.server.layers.fp4_search import output_error, search_fp4
from actserve.server.models.builder import LoadConfig, LoadedModel, load_model
from actserve.server.models.loader import ModelLoadError
from actserve.server.models.quantization import calibration_ids
from tests.conftest import TOKENIZER_FILES, save_random_model
from tests.engine_utils import assert_steps_close, capture_logits, greedy, run
from tests.test_native_models import TOL, reference

NVFP4_DIR = Path(__file__).parent / "data" / "tinystories-656k-nvfp4"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEPS = 8


def fresh_prompts(n: int = 2) -> tuple[int, list[list[int]]]:
    """Random prompts from a fresh seed (returned, for the failure message)."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    return seed, [torch.randint(3, 2048, (5 + 7 * i,), generator=g).tolist() for i in range(n)]


def dense_copy(src: Path, dst: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A plain float32 HF folder of `weights` with src's config (its quantization_config dropped)."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = config["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    save_file({k: v.float().contiguous() for k, v in weights.items()}, dst / "model.safetensors")
    return dst


def dequantized_checkpoint(src: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with every packed matrix replaced by its float32 dequantization."""
    sd = load_file(src / "model.safetensors")
    out = {k: v for k, v in sd.items() if ".weight_" not in k}
    for key in [k for k in sd if k.endswith(".weight_packed")]:
        prefix = key.removesuffix("_packed")
        w = Fp4Weight("nvfp4", sd[key], sd[prefix + "_scale"], sd[prefix + "_global_scale"])
        out[prefix] = dequantize(w)
    return out


def assert_engine_matches(fp4: LLMEngine, ref_dir: Path) -> None:
    """Greedy decode on fresh prompts: every step's logits within TOL of transformers on ref_dir."""
    seed, batch = fresh_prompts()
    with capture_logits() as seen:
        outs = run(fp4, batch, greedy(STEPS, min_tokens=STEPS), tag="s")
    for i, prompt in enumerate(batch):
        ref_tokens, ref_logits = reference(ref_dir, prompt, STEPS)
        assert_steps_close(seen[f"s{i}"], ref_logits, TOL, f"seed {seed} prompt {i}")
        assert outs[i] == ref_tokens, f"seed {seed} prompt {i}"


def load(model_dir: Path, **kw: object) -> LoadedModel:
    return load_model(LoadConfig(model=str(model_dir), device="cpu", num_kv_blocks=64, **kw))  # type: ignore[arg-type]


def projection_bytes(config: LlamaConfig, kind: str | None) -> int:
    """Bytes of the decoder projections, from the config's shapes: float32, or FP4 codes + scales (+ an
    NVFP4 float32 global scale per output row)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)] * config.num_hidden_layers
    if kind is None:
        return sum(4 * n * k for n, k in shapes)
    row = 4 if kind == "nvfp4" else 0
    return sum(n * k // 2 + n * k // GROUP[kind] + row * n for n, k in shapes)


# ------------------------------------------------------------------------ a compressed-tensors checkpoint


def test_nvfp4_checkpoint_loads_packed_and_equals_its_dequantization(tmp_path: Path) -> None:
    loaded = load(NVFP4_DIR)
    sd = load_file(NVFP4_DIR / "model.safetensors")
    qkv = loaded.model.model.layers[1].self_attn.qkv_proj
    assert isinstance(qkv.format, FP4Format) and qkv.format.quantize is None
    assert "weight" not in dict(qkv.named_parameters())
    # q/k/v keep their own global scales, one per row of their shard
    sizes = {"q_proj": 128, "k_proj": 64, "v_proj": 64}
    want_gs = torch.cat(
        [sd[f"model.layers.1.self_attn.{p}.weight_global_scale"].expand(n) for p, n in sizes.items()]
    )
    assert torch.equal(qkv.weight_global_scale, want_gs) and want_gs.unique().numel() == 3
    assert torch.equal(qkv.weight_packed[128:192], sd["model.layers.1.self_attn.k_proj.weight_packed"])
    # the bytes held: the checkpoint's packed tensors, the rest in float32 (CPU)
    config = AutoConfig.from_pretrained(NVFP4_DIR)
    others = sum(4 * v.numel() for k, v in sd.items() if ".weight_" not in k)
    assert loaded.weights_bytes == others + projection_bytes(config, "nvfp4")
    # by format: a primary FP4 format's tensors under its kind (no prefix to tell them by)
    assert loaded.weights_by_format == {"float32": others, "nvfp4": projection_bytes(config, "nvfp4")}

    ref_dir = dense_copy(NVFP4_DIR, tmp_path / "dequantized", dequantized_checkpoint(NVFP4_DIR))
    engine = LLMEngine(EngineConfig(model=str(NVFP4_DIR), num_kv_blocks=64, block_size=8))
    assert_engine_matches(engine, ref_dir)


def test_nvfp4_checkpoint_with_the_flag_and_against_the_flag() -> None:
    assert load(NVFP4_DIR, quantization="nvfp4").weights_bytes == load(NVFP4_DIR).weights_bytes
    with pytest.raises(ModelLoadError, match="--quantization mxfp4: the checkpoint is already nvfp4"):
        load(NVFP4_DIR, quantization="mxfp4")
    with pytest.raises(ModelLoadError, match="nvfp4 checkpoint: FP4 weights need the native"):
        load(NVFP4_DIR, force_transformers=True)


def edited_checkpoint(tmp_path: Path, edit: dict[str, object]) -> Path:
    dst = tmp_path / "edited"
    shutil.copytree(NVFP4_DIR, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"].update(edit)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"quant_method": "gptq", "format": None}, "quant_method 'gptq'"),
        ({"format": "float-quantized"}, "not supported"),
        ({"ignore": ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$"]}, "model.layers.1.mlp.down_proj"),
    ],
)
def test_checkpoints_it_cannot_serve_are_refused(
    tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load(edited_checkpoint(tmp_path, edit))


def test_w4a4_checkpoint_is_refused(tmp_path: Path) -> None:
    config = json.loads((NVFP4_DIR / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    groups["group_0"]["input_activations"] = dict(groups["group_0"]["weights"], dynamic="local")
    with pytest.raises(ModelLoadError, match="quantizes activations too"):
        load(edited_checkpoint(tmp_path, {"config_groups": groups}))


# ------------------------------------------------------------------------------- quantized at load


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_quantization_flag_equals_rtn_reference(kind: str, tinystories_dir: Path, tmp_path: Path) -> None:
    dense_sd = load_file(tinystories_dir / "model.safetensors")
    rtn = {
        k: dequantize(quantize_rtn(v.float(), kind)) if k.rsplit(".", 2)[-2] in PROJECTIONS else v  # type: ignore[arg-type]
        for k, v in dense_sd.items()
    }
    ref_dir = dense_copy(tinystories_dir, tmp_path / f"{kind}-rtn", rtn)
    engine = LLMEngine(
        EngineConfig(model=str(tinystories_dir), num_kv_blocks=64, block_size=8, quantization=kind)
    )
    mlp = engine.loaded.model.model.layers[0].mlp
    assert isinstance(mlp.down_proj.format, FP4Format) and "weight" not in dict(mlp.named_parameters())
    assert_engine_matches(engine, ref_dir)

    # quantization changed the model (the comparison above is not dense against dense)
    dense = load(tinystories_dir)
    hidden = torch.randn(4, 128)
    gate_up = mlp.gate_up_proj
    dense_gate_up = dense.model.model.layers[0].mlp.gate_up_proj
    assert (gate_up(hidden) - dense_gate_up(hidden)).abs().max() > 1e-3
    # weights_bytes: the projections' float32 bytes replaced by their packed sizes, nothing else changed
    # (compared without plugins: the engine's weights_bytes also holds the test plugins' dense copies)
    config = AutoConfig.from_pretrained(tinystories_dir)
    saved = projection_bytes(config, None) - projection_bytes(config, kind)
    assert dense.weights_bytes - load(tinystories_dir, quantization=kind).weights_bytes == saved
    assert engine.loaded.weights_by_format[kind] == projection_bytes(config, kind)
    assert projection_bytes(config, kind) / projection_bytes(config, None) < 0.15


def test_dummy_weights_are_quantized_too(tinystories_dir: Path) -> None:
    """--load-format dummy with --quantization: random dense weights quantized as they load."""
    loaded = load(tinystories_dir, quantization="nvfp4", load_format="dummy")
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj
    w = dequantize(qkv.format.weight(qkv))
    assert w.abs().max() > 0 and w.std() == pytest.approx(0.02, rel=0.1)
    assert loaded.weights_bytes == load(tinystories_dir, quantization="nvfp4").weights_bytes


# ------------------------------------------------------------------------------------ bad combinations


def test_bad_flag_combinations_are_clear(tinystories_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="--quantization nvfp4: FP4 weights need the native.*--force"):
        load(tinystories_dir, quantization="nvfp4", force_transformers=True)
    with pytest.raises(ModelLoadError, match="must be one of nvfp4, mxfp4, llm-fp4, got 'int4'"):
        load(tinystories_dir, quantization="int4")
    # down_proj's input (the intermediate size, 80) is a multiple of 16 but not of 32
    config = LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model_dir = save_random_model(config, tmp_path / "k80")
    with pytest.raises(ModelLoadError, match="--quantization mxfp4: .* multiple of 32; down_proj has 80"):
        load(model_dir, quantization="mxfp4")
    assert load(model_dir, quantization="nvfp4").spec is not None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "int4"])
    args = build_parser().parse_args(["serve", "--quantization", "mxfp4"])
    assert engine_config(args).load_config().quantization == "mxfp4"
    with pytest.raises(ModelLoadError, match="--quantization llm-fp4 calibrates on real weights"):
        load(tinystories_dir, quantization="llm-fp4", load_format="dummy")
    with pytest.raises(ModelLoadError, match="--quantization llm-fp4 needs the native"):
        load(tinystories_dir, quantization="llm-fp4", force_transformers=True)
    with pytest.raises(ModelLoadError, match="--quantization llm-fp4: the checkpoint is already quantized"):
        load(NVFP4_DIR, quantization="llm-fp4")


# --------------------------------------------------------------------------------------- scale search


def hf_projection_inputs(ref: torch.nn.Module, ids: list[int]) -> dict[str, torch.Tensor]:
    """transformers' inputs to every checkpoint projection on `ids` (forward pre-hooks)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0][0].detach())
        )
        for name, module in ref.named_modules()
        if name.rpartition(".")[2] in PROJECTIONS
    ]
    try:
        with torch.no_grad():
            ref(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_scale_search_equals_search_on_transformers_activations(
    kind: str, tinystories_dir: Path, ref: torch.nn.Module
) -> None:
    """--quantization-method search: each checkpoint matrix's FP4 form is `search_fp4` over the inputs
    transformers' own model gives that projection on the calibration text, and beats round-to-nearest
    there."""
    loaded = load(tinystories_dir, quantization=kind, quantization_method="search")
    ids = calibration_ids(AutoTokenizer.from_pretrained(tinystories_dir), 512)
    assert len(ids) > 200
    inputs = hf_projection_inputs(ref, ids)
    merged = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 128), "v_proj": ("qkv_proj", 192),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 384)}  # fmt: skip
    for name, x in inputs.items():
        parent, _, proj = name.rpartition(".")
        target, offset = merged.get(proj, (proj, 0))
        layer = loaded.model.get_submodule(f"{parent}.{target}")
        w = ref.get_submodule(name).weight.detach()
        rows = slice(offset, offset + w.shape[0])
        want = search_fp4(w, x, kind)  # type: ignore[arg-type]
        assert torch.equal(layer.weight_packed[rows], want.packed), name
        assert torch.equal(layer.weight_scale[rows].view(torch.uint8), want.scales.view(torch.uint8)), name
        if kind == "nvfp4":
            assert torch.equal(layer.weight_global_scale[rows], want.global_scale.expand(w.shape[0])), name
        rtn = quantize_rtn(w, kind)  # type: ignore[arg-type]
        assert output_error(w, want, x).sum() < output_error(w, rtn, x).sum(), name
    assert loaded.weights_bytes == load(tinystories_dir, quantization=kind).weights_bytes


@pytest.mark.parametrize("method", ["search", "gptq"])
def test_calibrated_methods_need_the_quantization_flag(method: str, tinystories_dir: Path) -> None:
    flag = f"--quantization-method {method}"
    with pytest.raises(ModelLoadError, match=f"{flag} needs --quantization nvfp4"):
        load(tinystories_dir, quantization_method=method)
    with pytest.raises(ModelLoadError, match=f"{flag} needs --quantization nvfp4"):
        load(tinystories_dir, quantization="llm-fp4", quantization_method=method)
    with pytest.raises(ModelLoadError, match=r"needs .*\(not --load-format dummy\)"):
        load(tinystories_dir, quantization="nvfp4", quantization_method=method, load_format="dummy")
    with pytest.raises(ModelLoadError, match=f"{flag}: the checkpoint is already quantized"):
        load(NVFP4_DIR, quantization="nvfp4", quantization_method=method)
    args = build_parser().parse_args(["serve", "--quantization", "nvfp4", "--quantization-method", method])
    assert engine_config(args).load_config().quantization_method == method


def test_quantization_method_flag() -> None:
    """rtn by default; --quantization-scale-search is the older spelling of search and cannot be mixed
    with --quantization-method; unknown methods are refused by the parser and by the loader."""
    parse = build_parser().parse_args
    assert engine_config(parse(["serve", "--quantization", "nvfp4"])).quantization_method == "rtn"
    old = parse(["serve", "--quantization", "nvfp4", "--quantization-scale-search"])
    assert engine_config(old).load_config().quantization_method == "search"
    for bad in (
        ["--quantization-method", "gptq", "--quantization-scale-search"],
        ["--quantization-method", "awq"],
    ):
        with pytest.raises(SystemExit):
            parse(["serve", "--quantization", "nvfp4", *bad])
    with pytest.raises(
        ModelLoadError, match="--quantization-method must be one of rtn, search, gptq, got 'awq'"
    ):
        load(NVFP4_DIR, quantization_method="awq")


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_gptq_serves_its_weights(
    kind: str, tinystories_dir: Path, ref: torch.nn.Module, tmp_path: Path
) -> None:
    """--quantization-method gptq: each checkpoint matrix's FP4 form is `gptq_fp4` over the inputs
    transformers' model gives that projection on the calibration text (its output error there below
    round-to-nearest's and the search's), and the engine's logits equal transformers' float32 model with
    the loaded codes dequantized by the reference."""
    config = EngineConfig(
        model=str(tinystories_dir),
        num_kv_blocks=64,
        block_size=8,
        quantization=kind,
        quantization_method="gptq",
    )
    engine = LLMEngine(config)
    ids = calibration_ids(AutoTokenizer.from_pretrained(tinystories_dir), 512)
    merged = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 128), "v_proj": ("qkv_proj", 192),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 384)}  # fmt: skip
    weights = dict(load_file(tinystories_dir / "model.safetensors"))
    for name, x in hf_projection_inputs(ref, ids).items():
        parent, _, proj = name.rpartition(".")
        target, offset = merged.get(proj, (proj, 0))
        layer = engine.loaded.model.get_submodule(f"{parent}.{target}")
        assert isinstance(layer.format, FP4Format) and "weight" not in dict(layer.named_parameters())
        w = ref.get_submodule(name).weight.detach()
        rows = slice(offset, offset + w.shape[0])
        gs = layer.weight_global_scale[rows] if kind == "nvfp4" else None
        packed, scales = layer.weight_packed[rows], layer.weight_scale[rows]
        got = Fp4Weight(kind, packed, scales, gs)  # type: ignore[arg-type]
        want = gptq_fp4(w, x, kind)  # type: ignore[arg-type]
        assert torch.equal(got.packed, want.packed), name
        assert torch.equal(got.scales.view(torch.uint8), want.scales.view(torch.uint8)), name
        err = output_error(w, got, x).norm()
        assert err < 0.9 * output_error(w, quantize_rtn(w, kind), x).norm(), name  # type: ignore[arg-type]
        assert err < output_error(w, search_fp4(w, x, kind), x).norm(), name  # type: ignore[arg-type]
        weights[f"{name}.weight"] = dequantize(got)
    assert_engine_matches(engine, dense_copy(tinystories_dir, tmp_path / f"{kind}-gptq", weights))
