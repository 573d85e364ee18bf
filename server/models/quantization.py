"""Which weight format a native model's projections load into: dense, FP4 quantized at load
(`--quantization nvfp4|mxfp4`), or FP4 read from a checkpoint already in compressed-tensors'
"nvfp4-pack-quantized" form (config.json `quantization_config`, as llm-compressor writes it).

`--quantization-method` picks how a dense projection becomes FP4: `rtn` (the default) rounds to nearest
with absmax block scales as each checkpoint matrix is read. The two calibrated methods minimise each
projection's output error on the model's own activations: `search` searches the block scales
(server/layers/fp4_search.py), `gptq` also spreads each column's rounding error onto the columns not yet
rounded (server/layers/fp4_gptq.py, `GptqConfig()`'s settings, chosen by bench/fp4_quality.py --select).
For both, the model loads dense, `CALIBRATION_TEXT` runs through it once while every projection records
its input, then each projection is replaced by an FP4 one whose checkpoint matrices (q/k/v, gate/up
shards, each with its own global scale) are quantized over those inputs; the dense weights go with the
layers they leave. Loading then needs the dense model's memory for a moment.

`--quantization llm-fp4` (simulated W4A4, for quality, not speed: server/layers/llm_fp4.py): the model
loads dense, `CALIBRATION_TEXT` runs through it as for the scale search, then each projection's dense
weight becomes its folded fake-quantized LLM-FP4 form and its format a wrapper that fake-quantizes the
input first (`LlmFp4Format`). A merged layer (q/k/v, gate/up) has one input, so one input quantizer.

Everything the server cannot serve faithfully is refused here, before any weight is read, with the flag
or the config field to change: other checkpoint quantizations, NVFP4 checkpoints that also quantize
activations or leave decoder projections dense, FP4 on the transformers fallback path, and models whose
projection input sizes are not a multiple of the FP4 group.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from actserve.kernels.fp4_ref import GROUP, Fp4Kind, Fp4Weight
from actserve.server.contract.fp4_format import FP4Format
from actserve.server.contract.hooks import PROJECTIONS
from actserve.server.contract.weights import Shard, WeightFormat
from actserve.server.layers.attention import AttentionBatch, SeqSlice, make_kv_cache
from actserve.server.layers.fp4_gptq import gptq_fp4
from actserve.server.layers.fp4_search import search_fp4
from actserve.server.layers.linear import Linear, LinearBase, MergedColumnLinear
from actserve.server.layers.llm_fp4 import LlmFp4Format, quantize_linear
from actserve.server.models.loader import ModelLoadError, cast_to_model_dtype
from actserve.server.models.spec import ModelSpec

QUANTIZATIONS: tuple[Fp4Kind, ...] = ("nvfp4", "mxfp4")
METHODS = ("rtn", "search", "gptq")  # --quantization-method; the last two calibrate (the model loads dense)
LLM_FP4 = "llm-fp4"  # simulated W4A4 (dense storage, fake-quantized weights and inputs)
CT_NVFP4 = "nvfp4-pack-quantized"  # compressed-tensors' format name for packed NVFP4 weights
# the checkpoint module names of a decoder layer's projections (what an NVFP4 checkpoint must quantize)
CHECKPOINT_PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def _matches(pattern: str, name: str) -> bool:
    """compressed-tensors' target/ignore rule: `re:<regex>` matches by regex, anything else is a module
    name or the tail of one (a class name such as `Linear` never names one of our projections)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def checkpoint_fp4(hf_config: Any, num_layers: int) -> Fp4Kind | None:
    """ "nvfp4" when the checkpoint holds compressed-tensors NVFP4 weight-only projections, None when it
    is not quantized; ModelLoadError for any other quantization."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    method, fmt = _get(qc, "quant_method"), _get(qc, "format")
    if method != "compressed-tensors" or fmt != CT_NVFP4:
        raise ModelLoadError(
            f"checkpoint quantization_config (quant_method {method!r}, format {fmt!r}) is not supported: "
            f"actserve loads dense checkpoints and compressed-tensors {CT_NVFP4!r} ones"
        )
    groups = _get(qc, "config_groups") or {}
    for name, group in groups.items():
        w = _get(group, "weights") or {}
        spec = (_get(w, "num_bits"), _get(w, "type"), _get(w, "strategy"), _get(w, "group_size"))
        if spec != (4, "float", "tensor_group", GROUP["nvfp4"]) or _get(group, "format", fmt) != CT_NVFP4:
            raise ModelLoadError(f"quantization_config group {name!r}: weights {spec} are not NVFP4")
        if _get(group, "input_activations") is not None:
            raise ModelLoadError(
                f"quantization_config group {name!r} quantizes activations too; actserve serves NVFP4 "
                "weight-only checkpoints (W4A16)"
            )
    targets = [t for g in groups.values() for t in _get(g, "targets") or []]
    ignore = list(_get(qc, "ignore") or [])
    projections = [f"model.layers.{i}.{p}" for i in range(num_layers) for p in CHECKPOINT_PROJECTIONS]
    dense = [
        p for p in projections
        if not ("Linear" in targets or any(_matches(t, p) for t in targets))
        or any(_matches(i, p) for i in ignore)
    ]  # fmt: skip
    if dense:
        raise ModelLoadError(
            f"the NVFP4 checkpoint leaves {len(dense)} decoder projections unquantized (e.g. {dense[0]}); "
            "actserve serves checkpoints whose decoder projections are all NVFP4"
        )
    return "nvfp4"


def projection_format(
    spec: ModelSpec | None,
    hf_config: Any,
    quantization: str | None,
    random_weights: bool,
    fallback_reason: str | None,
    method: str = "rtn",
) -> Callable[[], FP4Format] | None:
    """The factory of the native model's projection format (None: dense), from --quantization and the
    checkpoint's own quantization_config; ModelLoadError naming the flag for what cannot be served.
    `random_weights` (--load-format dummy): the projections are quantized from random dense weights.
    `method` (--quantization-method): a calibrated one (search, gptq) is only checked here, the model
    loads dense and `quantize_calibrated` converts it."""
    if method not in METHODS:
        raise ModelLoadError(f"--quantization-method must be one of {', '.join(METHODS)}, got {method!r}")
    calibrated = method != "rtn"
    if quantization is not None and spec is not None and spec.moe is not None:
        raise ModelLoadError(
            f"--quantization {quantization}: FP4 weights of mixture-of-experts models are not built; "
            "drop the flag"
        )
    if calibrated and (quantization not in QUANTIZATIONS or random_weights):
        raise ModelLoadError(
            f"--quantization-method {method} needs --quantization nvfp4|mxfp4 and real weights "
            "(not --load-format dummy)"
        )
    if quantization == LLM_FP4:
        _check_llm_fp4(spec, hf_config, random_weights, fallback_reason)
        return None  # loads dense; `quantize_llm_fp4` converts it
    if quantization is not None and quantization not in QUANTIZATIONS:
        choices = ", ".join((*QUANTIZATIONS, LLM_FP4))
        raise ModelLoadError(f"--quantization must be one of {choices}, got {quantization!r}")
    layers = spec.num_layers if spec is not None else getattr(hf_config, "num_hidden_layers", 0)
    packed = checkpoint_fp4(hf_config, layers)
    if quantization is not None and packed is not None and quantization != packed:
        raise ModelLoadError(
            f"--quantization {quantization}: the checkpoint is already {packed} (compressed-tensors); "
            f"drop the flag or pass --quantization {packed}"
        )
    kind: Fp4Kind | None = packed or quantization  # type: ignore[assignment]
    if kind is None:
        return None
    why = f"--quantization {quantization}" if quantization else f"the {kind} checkpoint"
    if spec is not None and spec.moe is not None:
        raise ModelLoadError(f"{why}: FP4 weights of mixture-of-experts models are not built")
    if spec is None:
        raise ModelLoadError(
            f"{why}: FP4 weights need the native implementation, and this model is served through the "
            f"transformers fallback ({fallback_reason})"
        )
    group = GROUP[kind]
    inputs = {
        "qkv_proj": spec.hidden_size, "o_proj": spec.num_heads * spec.head_dim,
        "gate_up_proj": spec.hidden_size, "down_proj": spec.intermediate_size,
    }  # fmt: skip
    for proj, k in inputs.items():
        if k % group:
            raise ModelLoadError(
                f"{why}: {kind} needs every projection's input size to be a multiple of {group}; "
                f"{proj} has {k}"
            )
    if packed is not None and calibrated:
        raise ModelLoadError(
            f"--quantization-method {method}: the checkpoint is already quantized (packed NVFP4)"
        )
    if packed is not None and not random_weights:
        return lambda: FP4Format(kind, quantize=None)
    return lambda: FP4Format(kind)


def _check_llm_fp4(
    spec: ModelSpec | None, hf_config: Any, random_weights: bool, fallback_reason: str | None
) -> None:
    """--quantization llm-fp4 needs real dense weights and the native implementation (a calibrated
    --quantization-method was refused before: it needs nvfp4 or mxfp4)."""
    if getattr(hf_config, "quantization_config", None) is not None:
        raise ModelLoadError(f"--quantization {LLM_FP4}: the checkpoint is already quantized")
    if random_weights:
        raise ModelLoadError(f"--quantization {LLM_FP4} calibrates on real weights: drop --load-format dummy")
    if spec is None:
        raise ModelLoadError(
            f"--quantization {LLM_FP4} needs the native implementation, and this model is served "
            f"through the transformers fallback ({fallback_reason})"
        )


# what --quantization-method search/gptq and llm-fp4 calibrate on: short, varied English (story,
# instructions, facts, numbers, dialogue, code), written for this project; activations are the model's own
CALIBRATION_TEXT = """Once upon a time, in a small village by the sea, there lived a girl named Lily who loved
to collect shells. Every morning she walked along the beach with her dog, Max, and her little brother Tom.
One day they found a big blue shell that sang when you held it to your ear. "Listen!" said Lily. Tom
laughed and said, "It sounds like the wind." They took it home and showed it to their mother, who
smiled and told them a story about the old sailors who once lived there.

To make a cup of tea, boil fresh water, warm the pot, add one spoon of leaves for each cup, pour the
water and wait three to five minutes. Then pour it through a strainer and add milk or lemon to taste.

The Earth goes around the Sun once every 365.25 days, and the Moon goes around the Earth about once a
month. Water freezes at 0 degrees Celsius and boils at 100 degrees at sea level. In 1969, two people
walked on the Moon for the first time.

Q: What is 12 times 7? A: 84. Q: Which is larger, 3/4 or 2/3? A: 3/4, because 9/12 is more than 8/12.

def average(values):
    # the mean of a non-empty list of numbers
    return sum(values) / len(values)

The meeting is moved to Tuesday at 10:30. Please bring the report, the budget for next year and your
questions. Thank you, and have a good weekend!"""
CALIBRATION_TOKENS = 512  # at most: the text is shorter for most tokenizers


class _Recorder(WeightFormat):
    """Stands in for a projection's primary format during calibration: keeps each input, computes as it."""

    def __init__(self, inner: WeightFormat) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach())
        return self.inner.apply(layer, x)

    def apply_silu_mul(self, layer: LinearBase, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.apply(layer, F.silu(gate) * up)


def calibration_ids(tokenizer: Any, max_len: int) -> list[int]:
    return list(tokenizer(CALIBRATION_TEXT)["input_ids"])[: min(max_len, CALIBRATION_TOKENS)]


@torch.inference_mode()
def projection_inputs(model: torch.nn.Module, ids: list[int]) -> dict[LinearBase, torch.Tensor]:
    """Every decoder projection (`model.projection(layer, name)`) -> its inputs [T, K] on the prompt
    `ids`, from one prefill through the model."""
    spec: ModelSpec = model.spec  # type: ignore[assignment]
    layers = [model.projection(i, p) for i in range(spec.num_layers) for p in PROJECTIONS]  # type: ignore[operator]
    recorders: dict[LinearBase, _Recorder] = {}
    for layer in layers:
        recorders[layer] = layer.format = _Recorder(layer.format)
    try:
        t, device = len(ids), next(model.parameters()).device
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        kv = make_kv_cache(spec.num_layers, t, spec.num_kv_heads, spec.head_dim, dtype, device)
        slots = torch.arange(t, device=device)
        batch = AttentionBatch(slots, [SeqSlice(0, t, slots)], fresh_prefill=True)
        model(torch.tensor(ids, device=device), slots, kv, batch, None)
    finally:
        for layer, rec in recorders.items():
            layer.format = rec.inner
    return {layer: torch.cat(rec.inputs) for layer, rec in recorders.items()}


def _fp4_copy(dense: LinearBase, x: torch.Tensor, kind: Fp4Kind, method: str) -> LinearBase:
    """An FP4-primary layer for dense projection `dense`, each checkpoint matrix (shard) quantized on its
    own by `method` (search, gptq) over the inputs `x` (its own global scale, as a checkpoint would hold
    it)."""

    def calibrated(w: torch.Tensor, k: Fp4Kind) -> Fp4Weight:
        return gptq_fp4(w, x, k) if method == "gptq" else search_fp4(w, x, k)

    fmt = FP4Format(kind, quantize=calibrated)
    shards: dict[Any, Shard] | None = getattr(dense, "shards", None)
    if shards is not None:
        sizes = [s.size for s in shards.values()]
        new: LinearBase = MergedColumnLinear(dense.input_size, sizes, list(shards), dense.has_bias, fmt)
    else:
        new = Linear(dense.input_size, dense.output_size, dense.has_bias, fmt)
    weight = dense.dense_weight()
    new = cast_to_model_dtype(new.to(weight.device), weight.dtype)  # type: ignore[assignment]
    for shard_id, rows in (shards or {None: Shard(0, dense.output_size)}).items():
        new.load_tensor("weight", weight.narrow(0, rows.offset, rows.size), shard_id)
        if dense.has_bias:
            new.load_tensor("bias", dense.bias.narrow(0, rows.offset, rows.size), shard_id)
    return new


def quantize_calibrated(
    model: torch.nn.Module, tokenizer: Any, kind: Fp4Kind, max_len: int, method: str = "search"
) -> None:
    """--quantization-method search|gptq: replace every decoder projection of the dense `model` by its
    FP4 form quantized by `method` on the model's own activations over `CALIBRATION_TEXT`."""
    if method not in METHODS[1:]:
        raise ValueError(f"calibrated FP4 methods are {', '.join(METHODS[1:])}, got {method!r}")
    inputs = projection_inputs(model, calibration_ids(tokenizer, max_len))
    names = {module: name for name, module in model.named_modules()}
    for layer, x in inputs.items():
        parent, _, leaf = names[layer].rpartition(".")
        setattr(model.get_submodule(parent), leaf, _fp4_copy(layer, x, kind, method))


def quantize_llm_fp4(model: torch.nn.Module, tokenizer: Any, max_len: int) -> None:
    """--quantization llm-fp4: every decoder projection of the dense `model` in LLM-FP4 form (its weight
    replaced in place, its format wrapped), calibrated on the model's own inputs over CALIBRATION_TEXT."""
    inputs = projection_inputs(model, calibration_ids(tokenizer, max_len))
    for layer, x in inputs.items():
        xf = x.float()
        q = quantize_linear(layer.dense_weight().detach().float(), xf, xf.abs().amax(0))
        with torch.no_grad():
            layer.weight.copy_(q.weight)
        layer.format = LlmFp4Format(layer.format, q)
