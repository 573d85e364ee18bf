"""Plain-torch reference of the greedy pick: each row's argmax over float32 logits, ties to the lowest
index, NaN above everything (torch.argmax's rules)."""

from __future__ import annotations

import torch


def argmax_rows_ref(x: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: the index of each row's largest entry of a [rows, V] tensor."""
    return x.argmax(dim=-1)
