"""Block-scale search for FP4 weights that minimises the layer's output error on calibration activations.

Round-to-nearest with absmax scales (`fp4_ref.quantize_rtn`) spends the largest E2M1 value on each
block's largest weight; a smaller scale (clipping that weight) often rounds the rest of the block
better, and which choice is better depends on the inputs the layer sees. Here each block picks its scale
from a few candidates (NVFP4: the absmax scale times `ratios`, rounded to E4M3; MXFP4: the OCP power of
two and its neighbours) to minimise ||X W^T - X W_hat^T||_F, i.e. sum over output rows n of
d_n^T H d_n with d_n = w_n - w_hat_n and H = X^T X.

Rows are independent, the blocks of a row are not (H couples them), so the search is coordinate descent
over the blocks of all rows at once: block g takes, per row, the candidate with the smallest exact
objective given the other blocks' current choice. It starts from round-to-nearest (always a candidate),
so no row's error rises; a last check per row keeps round-to-nearest where rounding noise made the
search no better. The NVFP4 global scale stays the absmax one (448 * 6 / amax), as compressed-tensors
writes it. The result is in the packed layout of kernels/fp4_ref.py.
"""

from __future__ import annotations

import torch

from actserve.kernels.fp4_ref import (
    GROUP,
    Fp4Kind,
    Fp4Weight,
    absmax_scales,
    dequantize,
    encode_with_scales,
    nvfp4_global_scale,
)

# NVFP4 block-scale multipliers tried (1.0 first: round-to-nearest); MXFP4 exponent offsets likewise
NVFP4_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 1.05, 1.1)
MXFP4_SHIFTS = (0, 1, -1)


def scale_candidates(
    weight: torch.Tensor, kind: Fp4Kind, gs: torch.Tensor | None, ratios: tuple[float, ...]
) -> list[torch.Tensor]:
    """The block scales [n, K/group] tried, round-to-nearest's first: NVFP4 one per ratio, MXFP4 one
    per exponent shift."""
    if kind == "nvfp4":
        return [absmax_scales(weight, kind, gs, r) for r in ratios]
    base = absmax_scales(weight, kind).int()
    return [(base + s).clamp(0, 254).to(torch.uint8) for s in MXFP4_SHIFTS]


def _search_choice(
    weight: torch.Tensor,
    hess: torch.Tensor,
    kind: Fp4Kind,
    gs: torch.Tensor | None,
    sweeps: int,
    ratios: tuple[float, ...],
) -> torch.Tensor:
    """Index into `_candidates` [n, K/group] of each block's scale for the rows of `weight`, by
    coordinate descent (module docstring); 0 (round-to-nearest) for rows the search did not improve."""
    group = GROUP[kind]
    scales = scale_candidates(weight, kind, gs, ratios)
    w = weight.to(hess.dtype)
    # errors of each candidate's rounding [C, n, K]
    errs = torch.stack(
        [w - dequantize(encode_with_scales(weight, kind, s, gs)).to(hess.dtype) for s in scales]
    )
    choice = torch.zeros(weight.shape[0], weight.shape[1] // group, dtype=torch.long, device=weight.device)
    d = errs[0].clone()
    r = d @ hess  # H d_n for every row
    rows = torch.arange(weight.shape[0], device=weight.device)
    for _ in range(sweeps):
        for g in range(choice.shape[1]):
            cols = slice(g * group, (g + 1) * group)
            h_gg = hess[cols, cols]
            cand = errs[:, :, cols]  # [C, n, group]
            cross = r[:, cols] - d[:, cols] @ h_gg  # H's coupling of this block to the others
            obj = ((cand @ h_gg) * cand).sum(-1) + 2 * (cand * cross).sum(-1)  # [C, n]
            best = obj.argmin(0)
            new = cand[best, rows]
            r += (new - d[:, cols]) @ hess[cols, :]
            d[:, cols] = new
            choice[:, g] = best
    rtn_err = ((errs[0] @ hess) * errs[0]).sum(-1)
    worse = ((d @ hess) * d).sum(-1) >= rtn_err
    choice[worse] = 0
    return choice


def _search_rows(
    weight: torch.Tensor,
    hess: torch.Tensor,
    kind: Fp4Kind,
    gs: torch.Tensor | None,
    sweeps: int,
    ratios: tuple[float, ...],
) -> torch.Tensor:
    """Block scales [n, K/group] for the rows of `weight`: the searched candidates'."""
    choice = _search_choice(weight, hess, kind, gs, sweeps, ratios)
    return scales_from_choice(weight, kind, gs, choice, ratios)


def scales_from_choice(
    weight: torch.Tensor,
    kind: Fp4Kind,
    gs: torch.Tensor | None,
    choice: torch.Tensor,
    ratios: tuple[float, ...] = NVFP4_RATIOS,
) -> torch.Tensor:
    """Block scales [n, K/group]: per block, candidate `choice` [n, K/group] of `scale_candidates`."""
    scales = scale_candidates(weight, kind, gs, ratios)
    stacked = torch.stack([s.view(torch.uint8) for s in scales])  # [C, n, K/group]
    picked = stacked.gather(0, choice.unsqueeze(0)).squeeze(0)
    return picked.view(scales[0].dtype)


def search_choice(
    weight: torch.Tensor,
    hess: torch.Tensor,
    kind: Fp4Kind,
    sweeps: int = 2,
    row_chunk: int = 1024,
    ratios: tuple[float, ...] = NVFP4_RATIOS,
) -> torch.Tensor:
    """long [N, K/group]: which candidate (NVFP4: index into `ratios`; MXFP4: into MXFP4_SHIFTS) the
    search picks per block, for a Hessian `hess` = X^T X already in the arithmetic dtype. For reuse by
    the GPTQ quantizer (server/layers/fp4_gptq.py), which applies the same choice to its updated weights."""
    gs = nvfp4_global_scale(weight) if kind == "nvfp4" else None
    return torch.cat(
        [
            _search_choice(weight[i : i + row_chunk], hess, kind, gs, sweeps, ratios)
            for i in range(0, weight.shape[0], row_chunk)
        ]
    )


def search_fp4(
    weight: torch.Tensor,
    x: torch.Tensor,
    kind: Fp4Kind,
    sweeps: int = 2,
    row_chunk: int = 1024,
    dtype: torch.dtype | None = None,
    ratios: tuple[float, ...] = NVFP4_RATIOS,
) -> Fp4Weight:
    """FP4 weights for `weight` [N, K] whose output error on calibration inputs `x` [T, K] is no higher,
    row by row, than round-to-nearest's. `dtype` of the search arithmetic: float64 on the CPU, float32
    on a GPU by default. Rows go `row_chunk` at a time (the candidates' errors are C x rows x K).
    `ratios`: the NVFP4 candidates (absmax multipliers), 1.0 (round-to-nearest) first; a shorter grid
    searches proportionally faster (MXFP4 ignores it)."""
    if not ratios or ratios[0] != 1.0:
        raise ValueError(f"ratios must start with 1.0 (round-to-nearest), got {ratios}")
    dtype = dtype or (torch.float32 if weight.is_cuda else torch.float64)
    xs = x.to(weight.device, dtype)
    hess = xs.T @ xs
    gs = nvfp4_global_scale(weight) if kind == "nvfp4" else None
    parts = [
        _search_rows(weight[i : i + row_chunk], hess, kind, gs, sweeps, ratios)
        for i in range(0, weight.shape[0], row_chunk)
    ]
    return encode_with_scales(weight, kind, torch.cat(parts), gs)


def output_error(weight: torch.Tensor, w: Fp4Weight, x: torch.Tensor) -> torch.Tensor:
    """Per output row, ||x w_n - x w_hat_n|| in float64: what the search minimises."""
    diff = weight.double() - dequantize(w).double()
    return (x.double() @ diff.T).norm(dim=0)
