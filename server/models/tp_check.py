"""What a model must be to be split over `--tensor-parallel-size N` ranks, checked before any rank loads
(docs/architecture.md §12): a native dense family, unquantized, whose heads, KV heads and MLP width
divide by N. Anything else is refused at start with a message naming the flag (never split wrongly)."""

from __future__ import annotations

from typing import Any

from actserve.server.models.loader import ModelLoadError
from actserve.server.models.spec import ModelSpec

FLAG = "--tensor-parallel-size"


def check_tensor_parallel(
    tp: int,
    spec: ModelSpec | None,
    architecture: str,
    fallback_reason: str | None,
    hf_config: Any,
    quantization: str | None,
) -> None:
    """Raise ModelLoadError (naming the flag and what to change) when this model cannot run with `tp`
    ranks; a no-op for one rank."""
    if tp < 1:
        raise ModelLoadError(f"{FLAG} must be at least 1, got {tp}")
    if tp == 1:
        return
    flag = f"{FLAG} {tp}"
    if spec is None:
        raise ModelLoadError(
            f"{flag}: only the native model families are split over ranks, and {architecture} is served "
            f"through the transformers fallback ({fallback_reason}); serve it with {FLAG} 1"
        )
    if spec.moe is not None:
        raise ModelLoadError(
            f"{flag}: mixture-of-experts models ({architecture}) are not split over ranks yet (the experts "
            f"are not sharded); serve it with {FLAG} 1"
        )
    if quantization is not None or getattr(hf_config, "quantization_config", None) is not None:
        raise ModelLoadError(
            f"{flag}: FP4 weights (--quantization or a quantized checkpoint) are not split over ranks yet; "
            f"serve dense weights or use {FLAG} 1"
        )
    for what, n in (
        ("num_attention_heads", spec.num_heads),
        ("num_key_value_heads", spec.num_kv_heads),
        ("intermediate_size", spec.intermediate_size),
    ):
        if n % tp:
            raise ModelLoadError(
                f"{flag}: the model's {what} ({n}) is not divisible by {tp}; each rank holds an equal share "
                f"of the heads, KV heads and MLP channels (KV heads are not replicated), so choose a "
                f"{FLAG} that divides {spec.num_heads} heads, {spec.num_kv_heads} KV heads and "
                f"{spec.intermediate_size} channels"
            )
