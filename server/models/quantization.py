"""Which weight format a native model's projections load into: dense, FP4 quantized at load
(`--quantization nvfp4|mxfp4`), or FP4 read from a checkpoint already in compressed-tensors'
"nvfp4-pack-quantized" form (config.json `quantization_config`, as llm-compressor writes it).

Everything the server cannot serve faithfully is refused here, before any weight is read, with the flag
or the config field to change: other checkpoint quantizations, NVFP4 checkpoints that also quantize
activations or leave decoder projections dense, FP4 on the transformers fallback path, and models whose
projection input sizes are not a multiple of the FP4 group.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from actserve.kernels.fp4_ref import GROUP, Fp4Kind
from actserve.server.layers.fp4_format import FP4Format
from actserve.server.models.loader import ModelLoadError
from actserve.server.models.spec import ModelSpec

QUANTIZATIONS: tuple[Fp4Kind, ...] = ("nvfp4", "mxfp4")
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
) -> Callable[[], FP4Format] | None:
    """The factory of the native model's projection format (None: dense), from --quantization and the
    checkpoint's own quantization_config; ModelLoadError naming the flag for what cannot be served.
    `random_weights` (--load-format dummy): the projections are quantized from random dense weights."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        choices = ", ".join(QUANTIZATIONS)
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
    if packed is not None and not random_weights:
        return lambda: FP4Format(kind, quantize=None)
    return lambda: FP4Format(kind)
