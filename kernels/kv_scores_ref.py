"""Plain-torch reference of `kv_scores`: each row's score of each KV block it lists, read through the
block's per-block summary vectors (KV retrieval, docs/architecture.md §10).

scores[r, c] = sum over kv heads g and dims d of a[r, g, d] * x[tables[r, c], g, d]
                                              (+ b[r, g, d] * y[tables[r, c], g, d])
for the columns c < ncols[r]; -inf elsewhere. With x a block's representative key and a the row's query
summed over each KV head's query heads, that is InfLLM's relevance; with (x, y) = (max, min) of a block's
keys and (a, b) = the positive and negative parts of the query, Quest's upper bound of q.k.
"""

from __future__ import annotations

import torch


def kv_scores_ref(
    a: torch.Tensor,
    x: torch.Tensor,
    tables: torch.Tensor,
    ncols: torch.Tensor,
    b: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """a, b [R, Hk, D]; x, y [ids, Hk, D]; tables [R, W] int32; ncols [R] int -> [R, W] float32."""
    out = torch.full(tables.shape, float("-inf"), dtype=torch.float32, device=a.device)
    for r in range(tables.shape[0]):
        n = int(ncols[r])
        if n <= 0:
            continue
        ids = tables[r, :n].long()
        s = torch.einsum("gd,cgd->c", a[r].float(), x[ids].float())
        if b is not None and y is not None:
            s = s + torch.einsum("gd,cgd->c", b[r].float(), y[ids].float())
        out[r, :n] = s
    return out
