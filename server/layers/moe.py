"""Mixture-of-experts layers: the experts' weights (owned by the layer, in slots) and the sparse MoE block
(router, routing hooks, experts, optional shared expert) of Mixtral, Qwen2/3-MoE and OLMoE.

Storage (docs/architecture.md §5, "MoE experts"): one layer's experts are two stacked parameters,
`w13` [slots, 2 * inter, hidden] (an expert's gate_proj rows, then its up_proj rows: gate/up fused) and
`w2` [slots, hidden, inter], plus `slot_of` [experts] int32, the indirection from expert id to slot.
Every expert is resident by default (slots = experts, slot_of = identity). With expert offloading
(`offload_to_host`, server/layers/expert_cache.py) the layer keeps every expert in a host copy, fewer
slots on the device, and its `cache` resolves each step's experts to slots (copying, or computing on the
CPU) before the kernels run; the kernels, which compute on slots, do not change.

Routing: softmax over the router's logits, top-k, renormalised as the family's config says
(`kernels/moe_ref.route_topk`); then each `moe` hook of the step may change the routing of its rows
(ids and weights, possibly more columns than top_k; -1 columns are empty). On CUDA the experts run in
the fused Triton kernel (`kernels/moe.py`), on the CPU through the plain-torch reference, which loops
over experts as transformers does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from actserve.kernels.moe_ref import PendingSum, fused_moe_ref, route_topk
from actserve.server.contract.hooks import MoEHook, RowInputs
from actserve.server.layers.expert_copier import pinned_empty
from actserve.server.layers.linear import Linear, linear

if TYPE_CHECKING:
    from actserve.server.layers.expert_cache import LayerCache

# a step's moe hooks at one layer: (hook, its row inputs, its rows [rows] bool)
MoEHooks = list[tuple[MoEHook, RowInputs, torch.Tensor]]

# pairs (rows x columns) of one call to the kernel: larger steps are cut into row chunks, so a wide
# per-request top_k at a long prefill does not allocate rows * k * hidden float32 at once
MAX_PAIRS = 1 << 16


class FusedExperts(nn.Module):
    """The experts of one MoE layer: `w13`, `w2` and the expert -> slot table `slot_of` (module doc).

    Reads the checkpoint's per-expert matrices, `{e}.{gate}.weight`, `{e}.{up}.weight` and
    `{e}.{down}.weight` under this module (names per family: `expert_names`)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        expert_names: tuple[str, str, str],
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        e, h, i = num_experts, hidden_size, intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, dtype=params_dtype))
        self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=params_dtype))
        self.register_buffer("slot_of", torch.arange(e, dtype=torch.int32), persistent=False)
        # expert offloading (`offload_to_host`): every expert's weights on the host, and the slots' cache
        self.host_w13: torch.Tensor | None = None
        self.host_w2: torch.Tensor | None = None
        self.cache: LayerCache | None = None
        gate, up, down = expert_names
        # checkpoint name (under this module) -> (expert, parameter, output-row block)
        self._names = {
            f"{x}.{name}.weight": (x, param, part)
            for x in range(e)
            for name, param, part in ((gate, "w13", 0), (up, "w13", 1), (down, "w2", 0))
        }

    def checkpoint_names(self) -> dict[str, tuple[int, str, int]]:
        return self._names

    def offload_to_host(self, slots: int, dtype: torch.dtype, pin: bool) -> None:
        """Before the model is allocated (its parameters still on the meta device): every expert's weights
        in host tensors of `dtype` (page-locked when `pin`), and `slots` device slots instead of one per
        expert. The checkpoint then loads into the host copy."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        self.host_w13 = pinned_empty((e, 2 * i, h), dtype, pin)
        self.host_w2 = pinned_empty((e, h, i), dtype, pin)
        self.w13 = nn.Parameter(torch.empty(slots, 2 * i, h, device="meta", dtype=self.w13.dtype))
        self.w2 = nn.Parameter(torch.empty(slots, h, i, device="meta", dtype=self.w2.dtype))

    def host_weights(self) -> list[torch.Tensor]:
        """The host copies that random initialisation must fill (none unless offloaded)."""
        return [t for t in (self.host_w13, self.host_w2) if t is not None]

    def load_tensor(self, name: str, loaded: torch.Tensor, shard_id: object = None) -> None:
        """One expert's checkpoint matrix into its slot (all resident: the slot is the expert id), or into
        the host copy when offloaded."""
        target = self._names.get(name)
        if target is None:
            raise ValueError(f"FusedExperts reads no checkpoint tensor {name!r}")
        expert, param, part = target
        i = self.intermediate_size
        w13 = self.host_w13 if self.host_w13 is not None else self.w13
        w2 = self.host_w2 if self.host_w2 is not None else self.w2
        dest = w13[expert, part * i : (part + 1) * i] if param == "w13" else w2[expert]
        if dest.shape != loaded.shape:
            raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(loaded)

    def after_loading(self) -> None:
        """Every expert resident in the slot of its own id (the table is not in the checkpoint, and a
        model built on the meta device has no values in it yet); offloaded, the cache fills the slots."""
        with torch.no_grad():
            self.slot_of.copy_(torch.arange(self.num_experts, dtype=torch.int32))
        if self.cache is not None:
            self.cache.fill()

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, top_k: int, pending: bool = False
    ) -> torch.Tensor | PendingSum:
        """x [rows, hidden], expert ids [rows, k] (-1: none), weights [rows, k] float32 -> [rows, hidden].
        `top_k`: the model's experts per row (sizes the decode kernel's grid when k is wider). `pending`:
        the caller's residual add takes the columns unadded (`run_experts`)."""
        if self.cache is not None:
            return self.cache.forward(x, ids, weights, top_k)
        # every expert resident in the slot of its id: the ids are the slots
        return run_experts(x, self.w13, self.w2, ids, weights, top_k, self.num_experts, pending=pending)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, inter={self.intermediate_size}"


def run_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    top_k: int,
    num_experts: int,
    table: torch.Tensor | None = None,
    host: tuple[torch.Tensor, torch.Tensor] | None = None,
    counts: torch.Tensor | None = None,
    pending: bool = False,
) -> torch.Tensor | PendingSum:
    """The experts kernel over `slots` (the plain-torch reference on the CPU), cut into row chunks of at
    most MAX_PAIRS pairs. The path and launch config depend on the model's expert count, not the slot
    count, so an expert cache with fewer slots runs the very kernels the all-resident layer runs.
    `table`, `host`, `counts`: `slots` holds expert ids mapped in the kernel, -1 entries read from the
    host copy, pairs counted per expert (kernels/moe.py). `pending`: a one-chunk CUDA step may return its
    columns unadded (`PendingSum`, kernels/moe.py `defer_sum`) for the caller's residual add to add."""
    if not x.is_cuda:
        return fused_moe_ref(x, w13, w2, slots, weights, table=table, host=host, counts=counts)
    from actserve.kernels.moe import fused_moe, pick_grouped, takes_decode

    k = max(1, slots.shape[1])
    step = max(1, MAX_PAIRS // k)
    extra = {"table": table, "host": host, "counts": counts}

    def call(c: slice, defer: bool = False) -> torch.Tensor | PendingSum:
        rows = x[c].shape[0]
        path = "decode" if takes_decode(rows, top_k, num_experts) else "grouped"
        cfg = pick_grouped(rows * slots.shape[1], num_experts)
        return fused_moe(
            x[c], w13, w2, slots[c], weights[c], path=path, active_k=top_k, grouped_cfg=cfg,
            defer_sum=defer, **extra,
        )  # fmt: skip

    if x.shape[0] <= step:
        return call(slice(None), pending)
    return torch.cat([call(slice(r, r + step)) for r in range(0, x.shape[0], step)])  # type: ignore[misc]


def _widen(t: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    return t if t.shape[1] >= k else F.pad(t, (0, k - t.shape[1]), value=fill)


def apply_moe_hooks(
    hooks: MoEHooks, layer: int, logits: torch.Tensor, top_k: int, ids: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's routing (`ids`, `weights`) with each hook's routing on that hook's rows; the result is
    as wide as the widest of them (-1 / 0 columns added)."""
    for hook, inputs, rows in hooks:
        h_ids, h_w = hook.route(layer, logits, top_k, inputs)
        k = max(ids.shape[1], h_ids.shape[1])
        keep = rows.unsqueeze(1)
        ids = torch.where(keep, _widen(h_ids, k, -1), _widen(ids, k, -1))
        weights = torch.where(keep, _widen(h_w.float(), k, 0.0), _widen(weights, k, 0.0))
    return ids, weights


class SparseMoeBlock(nn.Module):
    """Router (`gate`, [experts, hidden]), experts, and Qwen2-MoE's sigmoid-gated shared expert when
    `shared` is given (a dense MLP module taking (x,)), as transformers' sparse MoE blocks compute."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        expert_names: tuple[str, str, str],
        shared: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Linear(hidden_size, num_experts)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, expert_names)
        self.shared_expert = shared
        if shared is not None:
            self.shared_expert_gate = Linear(hidden_size, 1)

    def route(
        self, x: torch.Tensor, hooks: MoEHooks | None = None, layer: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids [rows, k], weights [rows, k] float32): the router's, then the hooks' on their rows."""
        logits = linear(x, self.gate)
        if logits.is_cuda:  # softmax, top-k and renormalisation in one launch
            from actserve.kernels.moe_route import route_topk as fused_route

            ids, weights = fused_route(logits, self.top_k, self.renormalize)
        else:
            ids, weights = route_topk(logits, self.top_k, self.renormalize)
        if hooks:
            ids, weights = apply_moe_hooks(hooks, layer, logits, self.top_k, ids, weights)
        return ids, weights

    def forward(
        self, x: torch.Tensor, hooks: MoEHooks | None = None, layer: int = 0, pending: bool = False
    ) -> torch.Tensor | PendingSum:
        """`pending`: the caller's residual add takes the experts' columns unadded (`FusedExperts`);
        not with a shared expert, whose output is added to their sum here."""
        ids, weights = self.route(x, hooks, layer)
        out = self.experts(x, ids, weights, self.top_k, pending and self.shared_expert is None)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            out = out + torch.sigmoid(linear(x, self.shared_expert_gate)) * shared
        return out
