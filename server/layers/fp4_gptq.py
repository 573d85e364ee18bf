"""GPTQ-style error compensation for FP4 weights (after Frantar et al. 2022, "GPTQ"), beside the block-scale
search of server/layers/fp4_search.py.

The search only picks each block's scale; every weight is still rounded to its nearest E2M1 value. GPTQ
also moves the weights not yet rounded: it quantizes the columns of W one at a time and spreads each
column's rounding error onto the columns after it so that the layer's output on calibration inputs X
changes as little as possible, i.e. it minimises ||X W^T - X W_hat^T||_F greedily, column by column.
With H = X^T X + damping and U the upper Cholesky factor of H^-1 (H^-1 = U^T U), the error of column j,
e = (w_j - q_j) / U_jj, is removed from the later columns k as w_k -= e U_jk; the updates are applied
lazily, a batch of BLOCK columns at a time (exact, only the order of the arithmetic changes).

FP4's block scales are decided when a block's first column is reached, from the block's CURRENT
(error-updated) weights, by one of three rules (`GptqScales`):

- "absmax": the round-to-nearest scale of those weights (`fp4_ref.absmax_scales`);
- "search": the candidate (NVFP4 absmax ratio, MXFP4 exponent shift) that the scale search picks for
  that block on the original weights, applied to the current ones;
- "local": per row, the candidate whose rounding of the block's current weights costs least in GPTQ's
  own measure, sum over the block's columns of ((w_j - q_j) / U_jj)^2 (the propagation inside the block
  ignored).

The NVFP4 global scale stays the one of the original weight (448 * 6 / amax), as compressed-tensors
writes it. Columns no calibration input reaches (H_jj = 0) keep H_jj = 1 and their weights: their error
is spread nowhere. "act order" quantizes the columns by decreasing H_jj (a block's scale is still decided
at the first of its columns reached). The result is in the packed layout of kernels/fp4_ref.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from actserve.kernels.fp4_ref import (
    GROUP,
    Fp4Kind,
    Fp4Weight,
    e2m1_decode,
    e2m1_encode,
    effective_scale,
    nvfp4_global_scale,
    pack_nibbles,
)
from actserve.server.layers.fp4_search import NVFP4_RATIOS, scale_candidates, search_choice

GptqScales = Literal["absmax", "search", "local"]
GPTQ_SCALES: tuple[GptqScales, ...] = ("absmax", "search", "local")
BLOCK = 128  # columns per lazy batch of updates
DAMP_RETRIES = 4  # times the damping is multiplied by 10 if H is still not positive definite


@dataclass(frozen=True)
class GptqConfig:
    """What `gptq_fp4` is run with. The defaults are what `--quantization-method gptq` serves, picked on
    calibration data only (bench/fp4_quality.py --select, bench/results/fp4_gptq_selection.json: of six
    NVFP4 configurations, the best two-fold cross-validated perplexity on both models; less damping
    did worse out of fold on SmolLM2's 2k-token folds)."""

    damp: float = 0.1  # added to H's diagonal, times the mean of that diagonal
    act_order: bool = True  # columns by decreasing H_jj instead of in order
    scales: GptqScales = "local"  # how a block's scale is chosen (module docstring)

    def label(self) -> str:
        order = "act" if self.act_order else "natural"
        return f"damp {self.damp:g}, {order} order, {self.scales} scales"


def _inverse_cholesky(hess: torch.Tensor, damp: float) -> torch.Tensor:
    """U upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1; more damping while H is not
    numerically positive definite."""
    eye = torch.eye(hess.shape[0], dtype=hess.dtype, device=hess.device)
    mean = hess.diagonal().mean()
    for attempt in range(DAMP_RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(hess + damp * 10**attempt * mean * eye)
        if int(info) == 0:
            inv = torch.cholesky_solve(eye, chol)  # cholesky_inverse: 20x slower on the CPU
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError(f"H + damping is not positive definite even with damp {damp * 10**DAMP_RETRIES:g}")


def _round(w: torch.Tensor, eff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 codes of w / eff (fp4_ref's rounding: nearest, ties to the even code, saturating) for float32
    block scales `eff`, and the weights they stand for, computed as `fp4_ref.dequantize` does (float32
    product): the error spread is that of the weights served."""
    codes = e2m1_encode(torch.where(eff > 0, w / eff.to(w.dtype), 0.0))
    return codes, (e2m1_decode(codes) * eff).to(w.dtype)


def gptq_fp4(
    weight: torch.Tensor,
    x: torch.Tensor,
    kind: Fp4Kind,
    config: GptqConfig | None = None,
    dtype: torch.dtype | None = None,
    ratios: tuple[float, ...] = NVFP4_RATIOS,
    sweeps: int = 2,
    choice: torch.Tensor | None = None,
) -> Fp4Weight:
    """FP4 weights for `weight` [N, K] by GPTQ on calibration inputs `x` [T, K] (module docstring); only
    x^T x is used, so a K x K factor F with F^T F = X^T X may stand for x. `dtype` of the arithmetic:
    float64 on the CPU, float32 on a GPU by default. `ratios` / `sweeps`: the scale search's, for
    `config.scales` "search" and "local" (the candidates tried; MXFP4 ignores `ratios`). `choice`: for
    "search", the search's pick if already computed (`fp4_search.search_choice` on the same x^T x)."""
    config = config or GptqConfig()
    if config.scales not in GPTQ_SCALES:
        raise ValueError(f"GPTQ scales must be one of {', '.join(GPTQ_SCALES)}, got {config.scales!r}")
    dtype = dtype or (torch.float32 if weight.is_cuda else torch.float64)
    xs = x.to(weight.device, dtype)
    hess = xs.T @ xs
    n, k = weight.shape
    group = GROUP[kind]
    if k % group:
        raise ValueError(f"{kind} needs K divisible by {group}, got {k}")
    gs = nvfp4_global_scale(weight) if kind == "nvfp4" else None
    if config.scales == "search" and choice is None:
        choice = search_choice(weight, hess, kind, sweeps, ratios=ratios)

    h = hess.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    if config.act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(k, device=weight.device)
    inv = torch.argsort(perm)
    w = weight.to(dtype)[:, perm].clone()
    u = _inverse_cholesky(h[perm][:, perm], config.damp)
    u_diag = u.diagonal()

    scale_dtype = torch.float8_e4m3fn if kind == "nvfp4" else torch.uint8
    scale_bytes = torch.zeros(n, k // group, dtype=torch.uint8, device=weight.device)
    eff = torch.zeros(n, k // group, dtype=torch.float32, device=weight.device)
    decided = [False] * (k // group)
    group_of = (perm // group).tolist()
    codes = torch.zeros(n, k, dtype=torch.uint8, device=weight.device)
    rows = torch.arange(n, device=weight.device)

    def decide(g: int, cur: torch.Tensor, pos: torch.Tensor) -> None:
        """Block g's scale per row, from its current weights `cur` [n, group] at permuted positions pos."""
        cands = scale_candidates(cur, kind, gs, ratios if config.scales != "absmax" else (1.0,))
        stacked = torch.stack([c.view(torch.uint8)[:, 0] for c in cands])  # [C, n]
        if config.scales == "absmax":
            pick = torch.zeros(n, dtype=torch.long, device=weight.device)
        elif config.scales == "search":
            pick = choice[:, g]  # type: ignore[index]
        else:
            losses = []
            for c in cands:
                _, q = _round(cur, effective_scale(kind, c, gs))  # block scale [n, 1]
                losses.append((((cur - q) / u_diag[pos]) ** 2).sum(1))
            pick = torch.stack(losses).argmin(0)
        scale_bytes[:, g] = stacked[pick, rows]
        eff[:, g] = effective_scale(kind, scale_bytes[:, g : g + 1].view(scale_dtype), gs)[:, 0]

    for i0 in range(0, k, BLOCK):
        i1 = min(i0 + BLOCK, k)
        wb = w[:, i0:i1].clone()
        err = torch.zeros(n, i1 - i0, dtype=dtype, device=weight.device)
        for j in range(i1 - i0):
            col = i0 + j
            g = group_of[col]
            if not decided[g]:
                pos = inv[g * group : (g + 1) * group]  # all at or after `col`: none quantized yet
                cur = w[:, pos].clone()
                here, later = pos < i1, pos >= i1
                cur[:, here] = wb[:, pos[here] - i0]
                if j:  # the columns after this batch have not yet had its updates
                    cur[:, later] -= err[:, :j] @ u[i0:col][:, pos[later]]
                decide(g, cur, pos)
                decided[g] = True
            c, q = _round(wb[:, j], eff[:, g])
            codes[:, col] = c
            e = (wb[:, j] - q) / u[col, col]
            wb[:, j + 1 :] -= e[:, None] * u[col, col + 1 : i1][None, :]
            err[:, j] = e
        w[:, i1:] -= err @ u[i0:i1, i1:]
    return Fp4Weight(kind, pack_nibbles(codes[:, inv]), scale_bytes.view(scale_dtype), gs)
