"""The sparsity plugin's one linear hook of a step: each method's hook on its own rows, and the per-request
counters of the achieved sparsity.

Rows carry a method index (`METHOD`, -1: none) and a level index (`INPUT`, -1: dense or a prompt row);
each method's hook sees the level index only on its own rows (-1 elsewhere), which every method's hook
leaves bit-identical, so one step mixes methods and levels with tensor ops only (graph-safe). After the
methods, at each site a method sparsifies, every decode row adds to its request's counters (`SLOT`
column 0) of that projection the input entries it skips and the entries it has (CHESS's FFN channels
are counted at the gate_up output, its mask); R-Sparse rows subtract their low-rank path's cost,
counted in input entries (r * (in + out) / out). A request's achieved sparsity weighs each projection's
counts by the multiply-adds one of its input entries costs (`entry_macs`), so it is the share of the
method's multiply-adds saved, also where its sites run at different levels (allocation.py).
"""

from __future__ import annotations

from typing import Any

import torch

from actserve.interventions.base import PROJECTIONS, LinearCall, ModelInfo, RowInputs
from actserve.kernels.sparsity_ops_ref import count_skipped_ref

INPUT = "sparsity_level"  # per row: the level's index into the tables, -1 = dense or not decoding
METHOD = "sparsity_method"  # per row: the index of its method in METHODS, -1 = none
SLOT = "sparsity_slot"  # per row: (counter slot, core slot), -1 = none
METHODS = ("teal", "chess", "r_sparse", "coreinfer")
# the projection inputs each method sparsifies, whose zeros count as its achieved sparsity (CHESS: the q
# part of qkv; its FFN channels also at the gate_up output, `Counters.add_output`)
COUNTED = {
    "teal": PROJECTIONS,
    "chess": ("qkv_proj", "o_proj", "down_proj"),
    "r_sparse": PROJECTIONS,
    "coreinfer": ("down_proj",),
}


def entry_macs(info: ModelInfo) -> torch.Tensor:
    """float64 [methods, projections]: the multiply-adds per token that one zero input entry of each
    projection saves, per method (TEAL, R-Sparse: the projection's output width; CHESS: the q part of qkv,
    o's output, an FFN channel's up row (counted at gate_up) and down column; CoreInfer: a neuron's gate,
    up and down). 1 everywhere when the model's shapes are not known."""
    h, n, hd = info.hidden_size, info.intermediate_size, info.head_dim
    q, kv = info.num_heads * hd, info.num_kv_heads * hd
    if not (n and q and kv):
        return torch.ones(len(METHODS), len(PROJECTIONS), dtype=torch.float64)
    rows = {
        "teal": (q + 2 * kv, h, 2 * n, h),
        "chess": (q, h, h, h),
        "r_sparse": (q + 2 * kv, h, 2 * n, h),
        "coreinfer": (0, 0, 0, 3 * h),
    }
    return torch.tensor([rows[m] for m in METHODS], dtype=torch.float64)


class Counters:
    """Per projection and request slot: (entries skipped, entries) over its decode rows' sparsified inputs,
    float64 [projections, slots + 1, 2] on the device; slot `slots` takes the rows of no request."""

    def __init__(self, slots: int, device: torch.device, macs: torch.Tensor | None = None) -> None:
        self.table = torch.zeros(len(PROJECTIONS), slots + 1, 2, dtype=torch.float64, device=device)
        # per projection, per method: 1 where the method counts that projection's input zeros
        self.counted = torch.tensor(
            [[p in COUNTED[m] for m in METHODS] for p in PROJECTIONS], dtype=torch.int32, device=device
        )
        # CHESS's FFN channels, counted at the gate_up output (its gate half, zero where masked)
        self.counted_output = torch.tensor([m == "chess" for m in METHODS], dtype=torch.int32, device=device)
        ones = torch.ones(len(METHODS), len(PROJECTIONS), dtype=torch.float64)
        self.macs = macs if macs is not None else ones

    def reset(self, slot: int) -> None:
        self.table[:, slot].zero_()

    def read(self, slot: int, method: str) -> tuple[float, float]:
        """(multiply-adds skipped, multiply-adds) of the slot's counts, weighed by `method`'s entry_macs."""
        counts = self.table[:, slot].cpu()  # [projections, 2]
        skipped, total = (counts * self.macs[METHODS.index(method)].unsqueeze(1)).sum(0).tolist()
        return skipped, total

    def add(self, proj: str, x: torch.Tensor, inputs: RowInputs, cost: torch.Tensor | None) -> None:
        """Count this site's decode rows: zeros of x (less `cost` [rows], R-Sparse's) of x.shape[1]."""
        self._add(proj, x, None, cost, inputs, self.counted[PROJECTIONS.index(proj)])

    def add_output(self, proj: str, y: torch.Tensor, inputs: RowInputs) -> None:
        """Count the zeros of an output y [rows, K] (CHESS's masked gate) for the rows of the methods that
        count it there."""
        self._add(proj, y, None, None, inputs, self.counted_output)

    def add_below(self, proj: str, x: torch.Tensor, thr: torch.Tensor, inputs: RowInputs) -> None:
        """Count a fused step's rows (whose x the kernel thresholded without masking it): the entries
        below each row's threshold thr [rows]."""
        self._add(proj, x, thr, None, inputs, self.counted[PROJECTIONS.index(proj)])

    def target(self, proj: str, inputs: RowInputs) -> torch.Tensor:
        """int32 [rows]: each row's slot where `add_below` would count it at `proj` (a decode row of a
        method that counts there), else -1: what a fused matmul that counts in its own launch is handed
        (the plugin fills it on the host as the row inputs' SLOT column 2 for the fused count site; this
        is its reference)."""
        level, method, slot = inputs[INPUT][:, 0], inputs[METHOD][:, 0], inputs[SLOT][:, 0]
        counted = self.counted[PROJECTIONS.index(proj)]
        on = (level > 0) & (method >= 0) & (counted[method.clamp(min=0).long()] != 0)
        return torch.where(on, slot, -1).to(torch.int32)

    def _add(
        self, proj: str, x: torch.Tensor, thr: torch.Tensor | None, cost: torch.Tensor | None,
        inputs: RowInputs, counted: torch.Tensor,
    ) -> None:  # fmt: skip
        """One launch on CUDA (kernels/sparsity_ops.py, imported there: CPU servers run without Triton),
        its torch reference elsewhere."""
        count = count_skipped_ref
        if x.is_cuda:
            from actserve.kernels.sparsity_ops import count_skipped as count
        cols = (inputs[INPUT][:, 0], inputs[METHOD][:, 0], inputs[SLOT][:, 0])
        count(self.table[PROJECTIONS.index(proj)], x.contiguous(), counted, *cols, thr, cost)


class SparsityHook:
    """The step's hook: `parts` (method index, that method's hook) applied in turn, each through a view of
    the row inputs where rows of other methods are at level -1; `counters` counted after them."""

    def __init__(
        self, parts: list[tuple[int, Any]], counters: Counters, num_layers: int, rsparse: Any = None
    ) -> None:
        self.parts, self.counters, self.rsparse = parts, counters, rsparse
        # where the methods act, and where their zeros are counted (CHESS: also the down projection)
        self._sites: set[tuple[int, str]] = set()
        for m, hook in parts:
            self._sites |= hook.sites()
            self._sites |= {(layer, p) for layer in range(num_layers) for p in COUNTED[METHODS[m]]}
        self._outputs = [(m, h) for m, h in parts if callable(getattr(h, "output", None))]
        self.chess = any(METHODS[m] == "chess" for m, _ in parts)
        self._views: dict[int, tuple[torch.Tensor, RowInputs]] = {}

    def sites(self) -> set[tuple[int, str]]:
        return self._sites

    def view(self, m: int, inputs: RowInputs) -> RowInputs:
        """`inputs` with the level index of rows of other methods than m set to -1 (made once per step and
        method: a step's sites share its input tensors, a new step or a capture brings new ones)."""
        memo = self._views.get(m)
        if memo is None or memo[0] is not inputs[INPUT]:
            level = torch.where(inputs[METHOD] == m, inputs[INPUT], -1)
            memo = self._views[m] = (inputs[INPUT], {**inputs, INPUT: level})
        return memo[1]

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: RowInputs) -> torch.Tensor:
        cost = None
        for m, hook in self.parts:
            if (layer, proj) in hook.sites():
                view = self.view(m, inputs)
                x = hook.apply(layer, proj, x, view)
                if hook is self.rsparse:
                    rank = hook.rank(layer, proj, view).double()
                    cost = rank * (x.shape[1] + hook.u[proj].shape[1]) / hook.u[proj].shape[1]
        self.counters.add(proj, x, inputs, cost)
        return x

    def output(self, layer: int, proj: str, call: LinearCall, inputs: RowInputs) -> torch.Tensor:
        y = call.y
        for m, hook in self._outputs:
            if (layer, proj) in hook.sites():
                y = hook.output(
                    layer, proj, LinearCall(call.x_in, call.x, y, call.matmul), self.view(m, inputs)
                )
        if proj == "gate_up_proj" and self.chess:
            self.counters.add_output(proj, y[:, : y.shape[1] // 2], inputs)
        return y
