"""What one forward of the model needs, as host data: the runner builds these ops, and with tensor
parallelism rank 0 sends a step's ops to the other ranks in one message before running them itself, so
every rank runs the same forwards (and the same collectives) in the same order (docs/architecture.md §12).

Hooks cross ranks as data: the fused table's per-row columns (the table itself is replicated on every rank
through the plugins' activations, or, for a table the other ranks do not keep, the rows the step reads are
sent with it), and generic residual hooks that carry such a table. Hooks that only observe on rank 0
(`rank_local`) stay there; logits hooks act where the logits are (rank 0). Anything else cannot run on a
split model and raises `TensorParallelError` (plugins that need it are refused before a request runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actserve.kernels.steer_rmsnorm_ref import SteeringTensors, apply_steering_ref
from actserve.server.contract.hooks import StepHooks
from actserve.server.engine.cuda_graphs import DecodeInputs, HostRows
from actserve.server.layers.attention import AttentionBatch, SeqSlice


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank failed, or a step cannot be split over ranks; the ranks may have run
    different collectives since, so the engine stops (`fatal`) and the server exits for a restart."""

    fatal = True


# the previous step's sampled tokens on rank 0's device (chained decode steps): rank 0's op holds the
# tensor; the message carries this marker and the other ranks receive the tokens by a broadcast
ON_DEVICE = "on_device"


@dataclass
class ForwardOp:
    """One eager forward: input ids (host, or `device_ids`), positions, attention metadata (host tensors,
    moved to the device when it runs) and hooks, and the logits it reads: one tensor per entry of
    `logit_rows` (packed row indices on the host; None: every row)."""

    ids: torch.Tensor | None
    positions: torch.Tensor
    attn: AttentionBatch
    hooks: Any = None  # StepHooks (rank 0), PortableHooks (a message), None
    logit_rows: list[torch.Tensor | None] = field(default_factory=list)
    device_ids: torch.Tensor | str | None = None
    # the hooks' fused table is the one every rank keeps replicated (a served step); False: send the rows
    # the step reads (collect mode: the caller's hooks may read tables the other ranks never saw filled)
    shared_table: bool = True


@dataclass
class GraphDecodeOp:
    """A decode step replayed from a CUDA graph (`DecodeGraphs.run`'s arguments)."""

    inputs: DecodeInputs
    fused: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    plugin_rows: dict[str, HostRows | None]
    modes: dict[str, str]
    device_ids: torch.Tensor | str | None = None


@dataclass
class PrefillGraphOp:
    """One prompt (or its rest after a computed context, `start` > 0) replayed from a prefill graph."""

    ids: list[int]
    slots: torch.Tensor
    start: int = 0
    table: list[int] | None = None


Op = ForwardOp | GraphDecodeOp | PrefillGraphOp


@dataclass
class StepMessage:
    """Rank 0 -> the other ranks, once per step: the plugins' activations and releases since the last
    message (`InterventionRegistry.take_journal`), then the step's ops in order."""

    journal: list[tuple[str, str, bytes]]
    ops: list[Op]


@dataclass
class Shutdown:
    """Rank 0 -> the other ranks: stop (the server is stopping)."""


def on_device(attn: AttentionBatch, device: torch.device) -> AttentionBatch:
    """`attn` with its tensors on `device` (a fresh prefill's context slots stay on the host: that path
    reads only their length)."""

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    seqs = attn.seqs
    if not attn.fresh_prefill:
        seqs = [SeqSlice(s.start, s.num_queries, s.context_slots.to(device)) for s in attn.seqs]
    filled = attn.filled
    if filled is not None:
        filled = (filled[0].to(device), filled[1].to(device))
    out = AttentionBatch(
        attn.slot_mapping.to(device), seqs, move(attn.block_tables), move(attn.context_lens), attn.block_size,
        attn.fresh_prefill,
    )  # fmt: skip
    out.decode_seqs, out.decode_rows, out.filled = attn.decode_seqs, move(attn.decode_rows), filled
    out.chunk_tables = move(attn.chunk_tables)
    return out


# -- hooks across ranks -----------------------------------------------------------------------------------
@dataclass
class PortableTable:
    """A fused table's per-row inputs (`SteeringTensors`) as host data. `rows`: None when the table is the
    replicated fused table every rank keeps; else (table rows, mask rows) of the slots this step reads,
    with `index` pointing into them."""

    index: torch.Tensor
    scale: torch.Tensor
    normalize: torch.Tensor
    columns: dict[int, list[int]] | None
    rows: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class PortableHooks:
    """A step's hooks for the other ranks: the fused table's inputs and the generic residual hooks (each
    a table), per layer in rank 0's order."""

    table: PortableTable | None
    hooks: list[PortableTable]
    residual: dict[int, list[int]]


def _table(t: SteeringTensors, shared: tuple[torch.Tensor, torch.Tensor] | None) -> PortableTable:
    if shared is not None and t.table is shared[0] and t.layer_mask is shared[1]:
        return PortableTable(t.index.cpu(), t.scale.cpu(), t.normalize.cpu(), t.columns)
    used = torch.unique(t.index[t.index >= 0])
    remap = torch.full((t.table.shape[0],), -1, dtype=torch.long, device=t.index.device)
    remap[used] = torch.arange(used.numel(), device=used.device)
    index = torch.where(t.index >= 0, remap[t.index.clamp(min=0)], t.index)
    rows = (t.table[used].cpu(), t.layer_mask[used].cpu())
    return PortableTable(index.cpu(), t.scale.cpu(), t.normalize.cpu(), t.columns, rows)


def portable_hooks(
    hooks: StepHooks | None, shared: tuple[torch.Tensor, torch.Tensor] | None
) -> PortableHooks | None:
    """What the other ranks need of rank 0's `hooks` (`shared`: the fused table they keep replicated, or
    None to send the rows read). Raises TensorParallelError for a hook that cannot run on a split model."""
    if hooks is None:
        return None
    if hooks.linear or hooks.attention or hooks.moe:
        raise TensorParallelError(
            "a plugin acts inside the layers (linear, attention or expert hooks), which is not supported "
            "with tensor parallelism"
        )
    table = _table(hooks.steer, shared) if hooks.steer is not None else None
    portable: list[PortableTable] = []
    seen: dict[int, int] = {}
    residual: dict[int, list[int]] = {}
    for layer, layer_hooks in hooks.residual.items():
        for hook in layer_hooks:
            if getattr(hook, "rank_local", False):
                continue  # observes rank 0's residual (identical on every rank) and changes nothing
            if id(hook) not in seen:
                tensors = getattr(hook, "tensors", None)
                if not isinstance(tensors, SteeringTensors):
                    raise TensorParallelError(
                        f"residual hook {type(hook).__name__} cannot run on the other tensor-parallel ranks"
                    )
                seen[id(hook)] = len(portable)
                portable.append(_table(tensors, shared))
            residual.setdefault(layer, []).append(seen[id(hook)])
    if table is None and not residual:
        return None
    return PortableHooks(table, portable, residual)


class TableHook:
    """A generic residual hook rebuilt on another rank: a fused table's rows added at its layers."""

    def __init__(self, tensors: SteeringTensors) -> None:
        self.tensors = tensors

    def layers(self) -> set[int]:
        return set(self.tensors.columns or ())

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return apply_steering_ref(hidden, layer, self.tensors)


def _tensors(
    p: PortableTable, shared: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device
) -> SteeringTensors:
    if p.rows is not None:
        table, mask = p.rows[0].to(device), p.rows[1].to(device)
    else:
        assert shared is not None, "the step reads the fused table, which this rank does not keep"
        table, mask = shared
    return SteeringTensors(
        table, mask, p.index.to(device), p.scale.to(device), p.normalize.to(device), columns=p.columns
    )


def local_hooks(
    p: PortableHooks | None, shared: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device
) -> StepHooks | None:
    """Another rank's StepHooks from rank 0's `portable_hooks`, over this rank's replicated table."""
    if p is None:
        return None
    table = _tensors(p.table, shared, device) if p.table is not None else None
    rebuilt = [TableHook(_tensors(h, shared, device)) for h in p.hooks]
    out = StepHooks([], table)
    out.residual = {layer: [rebuilt[i] for i in ids] for layer, ids in p.residual.items()}
    return out
