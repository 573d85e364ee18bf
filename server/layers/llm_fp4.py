"""LLM-FP4 (Liu et al., EMNLP 2023) as a simulated W4A4 mode: weights AND activations fake-quantized to
FP4 (E2M1), for quality numbers only (plain torch, no kernel).

What the paper does, and what is here:

- FP quantizer with a searched maximum value (equivalently a real-valued exponent bias / scale):
  implemented, with the format fixed to E2M1 (the paper also searches the exponent/mantissa split; FP4
  here is always E2M1, as NVFP4/MXFP4 are).
- Per-channel activation quantization by "pre-shifted exponent bias": the paper splits each input
  channel's exponent bias into a per-tensor real part rho and a per-channel INTEGER part, and folds the
  integer part into the weights. Implemented: per-input-channel power-of-two scales s_j = 2^round(...)
  from the calibration activations' per-channel absmax; the linear then computes Q(x / s) (W s)^T, with
  x / s and W s exact in floating point (powers of two), and the activation quantizer uses one static
  per-tensor real scale (rho), searched on calibration activations to minimise the layer's output
  error with the folded full-precision weights.
- Weights: per-output-channel real-valued scale (exponent bias), searched per row over clipping ratios
  of the row's absmax to minimise ||Q(x') (w'_n - w_hat_n)|| on the quantized folded calibration
  inputs Q(x') (a Gram-matrix objective; the paper minimises the layer's reconstruction error).
- Simplified / added: the search is one linear at a time on the full-precision model's calibration
  inputs (not sequential through quantized earlier layers, no block reconstruction); activations then
  weights, not jointly; static per-tensor activation scale (no per-token); not in the paper: a
  migration strength alpha (s_j = 2^round(alpha * log2 amax_j)), picked per linear from `ALPHAS` by
  the W4A4 output error, since folding the whole activation range into a 4-bit weight row (alpha = 1,
  the paper's choice) can cost the weights more than it saves the activations; alpha = 1 is always a
  candidate.

Used by bench/fp4_quality.py (`attach`: forward pre-hooks on transformers' nn.Linear) and by the server
(`--quantization llm-fp4`: `LlmFp4Format` wraps a projection's dense format, server/models/quantization.py);
a merged q/k/v or gate/up projection has one input there, so one input quantizer for its matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from actserve.kernels.fp4_ref import E2M1_MAX, e2m1_decode, e2m1_encode
from actserve.server.contract.weights import LinearBase, WeightFormat

ACT_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # activation clip candidates, x absmax
WEIGHT_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # weight-row clip candidates, x row absmax
ALPHAS = (1.0, 0.5, 0.0)  # migration strength of the per-channel activation scales (1.0: the paper)
TINY = 2.0**-100  # floor of a scale, so an all-zero tensor quantizes to zeros


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded onto the E2M1 grid times `scale` (broadcast; nearest, ties to the even code,
    saturating at +-6 scale), in x's dtype: the code is chosen on the exact float64 quotient."""
    s = scale.double().clamp(min=TINY)
    return (e2m1_decode(e2m1_encode(x.double() / s)).double() * s).to(x.dtype)


def channel_scales(amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """float32 [K] powers of two 2^round(alpha log2 amax_j): the integer per-channel exponent biases
    folded into the weights (zero channels get 1)."""
    a = amax.double()
    a = torch.where(a > 0, a, 1.0)
    return torch.exp2(torch.round(alpha * torch.log2(a))).float()


def search_act_scale(x: torch.Tensor, weight: torch.Tensor, ratios: tuple[float, ...] = ACT_RATIOS) -> float:
    """Per-tensor activation scale (E2M1 1.0 = scale) from `ratios` x absmax(x) / 6 minimising
    ||x W^T - Q(x) W^T|| on calibration inputs x [T, K] (already divided by the channel scales)."""
    amax = float(x.abs().max())
    w = weight.double()
    ref = x.double() @ w.T
    best, best_err = amax / E2M1_MAX, float("inf")
    for r in ratios:
        scale = r * amax / E2M1_MAX
        err = float((fake_quant(x, torch.tensor(scale)).double() @ w.T - ref).square().sum())
        if err < best_err:
            best, best_err = scale, err
    return best


def search_weight(
    weight: torch.Tensor, x: torch.Tensor, ratios: tuple[float, ...] = WEIGHT_RATIOS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantized weight [N, K] with one real scale per output row, and those scales [N, 1]: each
    row takes the clip ratio (1.0 first: absmax, round-to-nearest) minimising d_n^T H d_n, H = x^T x,
    d_n the row's rounding error, on inputs x [T, K]."""
    if not ratios or ratios[0] != 1.0:
        raise ValueError(f"ratios must start with 1.0 (round-to-nearest), got {ratios}")
    w = weight.double()
    hess = x.double().T @ x.double()
    amax = w.abs().amax(dim=1, keepdim=True)
    best_w, best_s, best_err = w, amax, torch.full((w.shape[0],), float("inf"), dtype=torch.float64)
    for r in ratios:
        scale = r * amax / E2M1_MAX
        q = fake_quant(w, scale)
        d = w - q
        err = ((d @ hess) * d).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_w = torch.where(better[:, None], q, best_w)
        best_s = torch.where(better[:, None], scale, best_s)
    return best_w.to(weight.dtype), best_s.float()


@dataclass(frozen=True)
class LlmFp4Linear:
    """One linear in LLM-FP4 form: y = Q_a(x / in_scale) @ weight^T, weight = Q_w(W in_scale)."""

    in_scale: torch.Tensor  # float32 [K], powers of two (the folded per-channel exponent biases)
    act_scale: float  # per-tensor activation scale: the value of E2M1 1.0
    weight: torch.Tensor  # [N, K] fake-quantized folded weight, the original dtype
    alpha: float

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the W4A4 matmul multiplies: x / s rounded onto the per-tensor scaled E2M1 grid."""
        return fake_quant(x / self.in_scale.to(x.device, x.dtype), torch.tensor(self.act_scale))

    def rows(self, start: int, size: int) -> LlmFp4Linear:
        """The same input quantizer with output rows [start, start + size) of the weight (one checkpoint
        matrix of a merged q/k/v or gate/up layer)."""
        return LlmFp4Linear(self.in_scale, self.act_scale, self.weight[start : start + size], self.alpha)


def attach(linear: nn.Linear, q: LlmFp4Linear) -> RemovableHandle:
    """Make a torch nn.Linear compute in LLM-FP4 form: its weight becomes q's folded fake-quantized one
    and a forward pre-hook quantizes its input (remove the handle to drop the input quantizer)."""
    with torch.no_grad():
        linear.weight.copy_(q.weight)
    return linear.register_forward_pre_hook(lambda _m, args: (q.quantize_input(args[0]), *args[1:]))


class LlmFp4Format(WeightFormat):
    """Serving (`--quantization llm-fp4`): wraps a projection's loaded dense format, whose weight already
    holds q's folded fake-quantized matrix, and quantizes the input before it (simulated W4A4)."""

    def __init__(self, inner: WeightFormat, q: LlmFp4Linear) -> None:
        super().__init__()
        self.inner, self.q = inner, q

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        return self.inner.apply(layer, self.q.quantize_input(x))

    def dense_weight(self, layer: LinearBase) -> torch.Tensor:
        """The fake-quantized weight unfolded (W_hat / s, exact): what multiplies the unscaled input,
        so a derived copy (e.g. `--precisions`) stays a weight for x, not for x / s."""
        w = self.inner.dense_weight(layer)
        return w / self.q.in_scale.to(w.device, w.dtype)


def fold(weight: torch.Tensor, in_scale: torch.Tensor) -> torch.Tensor:
    """W s: with x / s as input the linear is unchanged (exactly, for powers of two)."""
    return weight * in_scale.to(weight.dtype)


def quantize_linear(
    weight: torch.Tensor,
    x: torch.Tensor,
    amax: torch.Tensor,
    alphas: tuple[float, ...] = ALPHAS,
) -> LlmFp4Linear:
    """LLM-FP4 form of a linear `weight` [N, K] from calibration inputs x [T, K] and the per-channel
    absmax of all calibration inputs `amax` [K]; per alpha: channel scales, activation scale search,
    weight search on the quantized inputs; the alpha with the lowest W4A4 output error wins."""
    ref = x.double() @ weight.double().T
    best: LlmFp4Linear | None = None
    best_err = float("inf")
    for alpha in alphas:
        s = channel_scales(amax, alpha)
        xs, ws = x / s.to(x.dtype), fold(weight, s)
        act = search_act_scale(xs, ws)
        cand = LlmFp4Linear(s, act, ws, alpha)
        xq = cand.quantize_input(x)
        wq, _ = search_weight(ws, xq)
        cand = LlmFp4Linear(s, act, wq, alpha)
        err = float((xq.double() @ wq.double().T - ref).square().sum())
        if err < best_err:
            best, best_err = cand, err
    assert best is not None
    return best
