"""The projections of the native models: decode-sized CUDA rows through the Triton GEMV, the rest through
cuBLAS (`F.linear`), and on the CPU exactly what transformers computes.

Only bf16/fp16 take the GEMV (fp32 would go through TF32 tensor cores there and lose precision the CPU
tests rely on). Decode steps and short prefills (<= 16 rows) qualify, which at batch 1-16 removes
cuBLAS's split-K reduction kernels and the separate silu·mul kernel (bench/decode_profile.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from actserve.kernels.gemv_ref import MAX_ROWS

GEMV_DTYPES = (torch.bfloat16, torch.float16)


def takes_gemv(x: torch.Tensor) -> bool:
    return x.is_cuda and x.shape[0] <= MAX_ROWS and x.dtype in GEMV_DTYPES


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    if takes_gemv(x):
        from actserve.kernels.gemv import gemv

        return gemv(x, layer.weight, layer.bias)
    return F.linear(x, layer.weight, layer.bias)


def silu_mul_linear(gate_up: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(silu(gate) * up) for a fused [gate | up] input. The activation is fused into the GEMV for
    one row only: on the 2-16 row tensor-core path it made the kernel 10x slower (decode_profile.json)."""
    if takes_gemv(gate_up) and gate_up.shape[0] == 1:
        from actserve.kernels.gemv import gemv

        return gemv(gate_up, layer.weight, layer.bias, silu_mul=True)
    if gate_up.is_cuda:
        from actserve.kernels.silu_mul import silu_mul

        return linear(silu_mul(gate_up), layer)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, layer.weight, layer.bias)
