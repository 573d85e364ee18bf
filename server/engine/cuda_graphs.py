"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket and plugin variant.

Every per-step input is a static device buffer (token ids, positions, KV slots, context lengths, block
tables, and the fused table's per-row columns: slot index, scale, normalize, e.g. steering's), filled
from pinned host buffers with three asynchronous copies per step. Batches mixing steered and plain
requests replay the same graph; a row with index -1 is left untouched by the fused kernel.

Graph-safe plugins (docs/architecture.md §6) get static buffers built from their `row_inputs`
declarations plus a row mask, and a *variant* of the graphs captured with their `graph_hooks()`: the
plain variant (no such plugin in the step) is captured at start for every bucket; a step whose rows carry
graph-safe plugins replays the variant of exactly that set, each plugin in the mode it names for the step
(`graph_mode`, "" for most; e.g. a fused path valid only when every row is the plugin's), captured the
first time that set meets that bucket (at most `MAX_VARIANTS` variants), so plain and steering-only steps
never pay for hooks they lack.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from actserve.kernels.steer_rmsnorm_ref import SteeringTensors
from actserve.server.contract.hooks import BoundHooks, PluginHooks, StepHooks
from actserve.server.contract.plugin import InterventionPlugin
from actserve.server.layers.attention import AttentionBatch

log = logging.getLogger(__name__)

# graph variants beyond the plain one (sets of graph-safe plugins and their modes met in steps); later
# sets run eager
MAX_VARIANTS = 8

# the graph-safe plugins of a step and each one's mode (`graph_mode`), sorted by name: which variant of
# the graphs replays it
Variant = tuple[tuple[str, str], ...]

# one plugin's host inputs of a step: (name -> [rows, width] array per declared RowInput, row mask [rows])
HostRows = tuple[dict[str, np.ndarray], np.ndarray]


def variant_of(modes: dict[str, str]) -> Variant:
    """The variant of a step whose graph-safe plugins are `modes` (name -> mode)."""
    return tuple(sorted(modes.items()))


def bucket_sizes(max_bs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_bs]
    sizes += list(range(16, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def smallest_bucket(buckets: list[int], n: int) -> int | None:
    """The first (smallest) of the ascending `buckets` that holds `n`; None when none does."""
    return next((b for b in buckets if b >= n), None)


def capture_graph(fn: Callable[[], torch.Tensor], pool: object) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm `fn` up twice (Triton compiles, cuBLAS picks its kernels), then capture it into `pool`.
    Tensor parallelism: every rank captures the same graphs in the same order (their warm-ups run the
    collectives for real, the capture records NCCL's); the capture is thread-local so that the process
    group's watchdog thread may still query its events meanwhile."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    mode = "thread_local" if dist.is_available() and dist.is_initialized() else "global"
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
        out = fn()
    return graph, out


@dataclass
class DecodeInputs:
    """Host-side arrays for one decode step (rows = sequences)."""

    ids: np.ndarray  # int64 [B]
    positions: np.ndarray  # int64 [B]
    slots: np.ndarray  # int64 [B]
    block_tables: np.ndarray  # int32 [B, width]
    context_lens: np.ndarray  # int64 [B]


class GraphPlugin:
    """A graph-safe plugin as the graphs see it: the hooks they capture and its static per-row inputs
    (device buffers [max_bs, width] per declared RowInput, a row mask, pinned host twins)."""

    def __init__(self, plugin: InterventionPlugin, max_bs: int, device: torch.device) -> None:
        self.name, self.specs, self.plugin = plugin.name, plugin.row_inputs, plugin
        # built when a variant is first captured, not here: the runner (and these graphs) exist before the
        # plugins are bound to the KV cache, and hooks may need what `bind_kv` creates
        self.modes: dict[str, PluginHooks] = {}
        self.host = {
            r.name: torch.full((max_bs, r.width), r.none, dtype=r.dtype).pin_memory() for r in self.specs
        }
        self.dev = {
            r.name: torch.full((max_bs, r.width), r.none, dtype=r.dtype, device=device) for r in self.specs
        }
        self.host_rows = torch.zeros(max_bs, dtype=torch.bool, pin_memory=True)
        self.dev_rows = torch.zeros(max_bs, dtype=torch.bool, device=device)

    def reset(self) -> None:
        """Every row `none` on the device (what a capture's warm-up reads)."""
        for spec in self.specs:
            self.dev[spec.name].fill_(spec.none)
        self.dev_rows.fill_(False)

    def stage(self, rows: HostRows | None, n: int, b: int) -> None:
        """Copy this step's n rows (padding rows up to bucket b: `none`, not owned) to the device. None:
        a tensor-parallel rank other than 0, where this plugin's hooks act on no tensor (logits only)."""
        if rows is None:
            return
        arrays, mask = rows
        for spec in self.specs:
            host = self.host[spec.name]
            host[:n] = torch.from_numpy(arrays[spec.name])
            host[n:b] = spec.none
            self.dev[spec.name][:b].copy_(host[:b], non_blocking=True)
        self.host_rows[:n] = torch.from_numpy(mask)
        self.host_rows[n:b] = False
        self.dev_rows[:b].copy_(self.host_rows[:b], non_blocking=True)

    def hooks(self, mode: str) -> PluginHooks:
        """The plugin's graph hooks in `mode` (built once per mode)."""
        if mode not in self.modes:
            hooks = self.plugin.graph_hooks(mode) if mode else self.plugin.graph_hooks()
            if hooks.residual is not None:
                raise ValueError(
                    f"plugin {self.name}: graph_hooks() cannot hold a residual hook (not capturable)"
                )
            self.modes[mode] = hooks
        return self.modes[mode]

    def bound(self, b: int, mode: str) -> BoundHooks:
        return BoundHooks(self.hooks(mode), {k: v[:b] for k, v in self.dev.items()}, self.dev_rows[:b])


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_blocks: int,
        max_bs: int,
        dummy_slot: int,
        fused_table: tuple[torch.Tensor, torch.Tensor] | None,
        fused_width: int,
        graph_safe: list[InterventionPlugin] | None = None,
    ) -> None:
        """`graph_safe`: plugins (besides the fused one) whose rows may replay from graph variants."""
        dev = kv_caches[0].device
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.dummy_slot, self.max_bs, self.width, self.fused_table = (
            dummy_slot,
            max_bs,
            fused_width,
            fused_table,
        )
        # int64 layout: ids | positions | slots | lens | steer index (max_bs x W) | normalize (max_bs x W)
        n_int = max_bs * (4 + 2 * fused_width)
        self.host_int = torch.zeros(n_int, dtype=torch.long, pin_memory=True)
        self.host_scale = torch.zeros(max_bs, fused_width, dtype=torch.float32, pin_memory=True)
        self.host_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, pin_memory=True)
        self.dev_int = torch.zeros(n_int, dtype=torch.long, device=dev)
        self.scale = torch.zeros(max_bs, fused_width, dtype=torch.float32, device=dev)
        self.tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=dev)
        self.h = self._views(self.host_int)
        self.d = self._views(self.dev_int)
        self.plugins = {p.name: GraphPlugin(p, max_bs, dev) for p in graph_safe or ()}
        self.graphs: dict[tuple[Variant, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.variants: set[Variant] = {()}
        self.pool: object = None
        self.copied = torch.cuda.Event()  # the last step's host-to-device copies
        self.buckets = bucket_sizes(max_bs)
        self._capture()

    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        b, w = self.max_bs, self.width
        return {
            "ids": buf[0:b],
            "pos": buf[b : 2 * b],
            "slots": buf[2 * b : 3 * b],
            "lens": buf[3 * b : 4 * b],
            "index": buf[4 * b : 4 * b + b * w].view(b, w),
            "normalize": buf[4 * b + b * w :].view(b, w),
        }

    def _forward(self, b: int, variant: Variant = ()) -> torch.Tensor:
        d = self.d
        attn = AttentionBatch(d["slots"][:b], [], self.tables[:b], d["lens"][:b], self.block_size)
        tensors = None
        if self.fused_table is not None:
            table, mask = self.fused_table
            tensors = SteeringTensors(table, mask, d["index"][:b], self.scale[:b], d["normalize"][:b])
        bound = [self.plugins[name].bound(b, mode) for name, mode in variant]
        hooks = StepHooks([], tensors, plugins=bound) if tensors is not None or bound else None
        hidden = self.model(d["ids"][:b], d["pos"][:b], self.kv_caches, attn, hooks)
        logits = self.model.compute_logits(hidden)  # None on tensor-parallel ranks other than 0
        if hooks is not None and hooks.logits and logits is not None:
            logits = hooks.apply_logits(logits)
        return logits

    def _reset_inputs(self) -> None:
        """Static inputs every capture's warm-up may read safely: scratch slots, no plugin rows."""
        d = self.d
        d["slots"].fill_(self.dummy_slot)
        d["index"].fill_(-1)
        d["lens"].fill_(1)  # warm-up reads one (scratch) slot per row
        self.tables.fill_(self.dummy_slot // self.block_size)
        for gp in self.plugins.values():
            gp.reset()

    def _capture_one(self, variant: Variant, b: int) -> None:
        """A variant whose plugin hooks fork work onto a side stream is captured without PDL: on the H200
        the KV-retrieval graph at 128k took 5.29 ms a step without it, 5.98 with it (its side stream's
        kernels waited behind the main stream's early-launched ones; kernels/pdl.py)."""
        from actserve.kernels import pdl  # here: it imports Triton, which a CPU-only install lacks

        side = any(self.plugins[name].hooks(mode).side_stream for name, mode in variant)
        with pdl.pdl_suspended() if side else contextlib.nullcontext():
            self.graphs[(variant, b)] = capture_graph(lambda: self._forward(b, variant), self.pool)
        self.pool = self.graphs[(variant, b)][0].pool()

    @torch.inference_mode()
    def _capture(self) -> None:
        self._reset_inputs()
        for b in reversed(self.buckets):
            self._capture_one((), b)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def bucket(self, n: int) -> int | None:
        return smallest_bucket(self.buckets, n)

    def takes(self, modes: dict[str, str]) -> bool:
        """Whether a step whose rows carry plugins `modes` (name -> its `graph_mode`; besides the fused
        one) can replay a graph: each is graph-safe and their variant exists or the budget has room."""
        if any(n not in self.plugins for n in modes):
            return False
        return variant_of(modes) in self.variants or len(self.variants) <= MAX_VARIANTS

    def run(
        self,
        inputs: DecodeInputs,
        fused: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        device_ids: torch.Tensor | None = None,
        plugin_rows: dict[str, HostRows | None] | None = None,
        modes: dict[str, str] | None = None,
    ) -> torch.Tensor | None:
        """fused: host (index, scale, normalize) columns for the n rows, or None. device_ids: the rows'
        input tokens when they are still on the device (chained steps). plugin_rows: graph-safe plugin
        name -> its host inputs of the step; they and their `modes` ("" where absent) pick the variant
        (check `takes` first)."""
        n = len(inputs.ids)
        b = self.bucket(n)
        assert b is not None
        modes = modes or {}
        variant = variant_of({name: modes.get(name, "") for name in plugin_rows or ()})
        if (variant, b) not in self.graphs:  # the first step of this plugin set at this bucket
            torch.cuda.synchronize()  # nothing in flight reads the static inputs the warm-up overwrites
            self._reset_inputs()
            self._capture_one(variant, b)
            self.variants.add(variant)
            log.info("captured a decode CUDA graph for plugins %s at batch size %d", dict(variant), b)
        # a chained step is launched before the previous one's copies have surely run on the device:
        # wait for them before overwriting the pinned buffers they read (normally long done)
        self.copied.synchronize()
        h = self.h
        h["ids"][:n] = torch.from_numpy(inputs.ids)
        h["pos"][:n] = torch.from_numpy(inputs.positions)
        h["slots"][:n] = torch.from_numpy(inputs.slots)
        h["slots"][n:b] = self.dummy_slot  # padding rows: no context, K/V to the scratch slot
        h["lens"][:n] = torch.from_numpy(inputs.context_lens)
        h["lens"][n:b] = 0
        h["index"][:b] = -1
        if fused is not None:
            index, scale, normalize = fused
            w = index.shape[1]
            h["index"][:n, :w] = torch.from_numpy(index)
            h["normalize"][:n, :w] = torch.from_numpy(normalize)
            self.host_scale[:n, :w] = torch.from_numpy(scale)
        nb = inputs.block_tables.shape[1]
        # through numpy: torch splits a copy of over 32768 elements (4 rows of 8192 blocks, 128k tokens)
        # over its intra-op threads, which cost milliseconds per step where they contend for the cores
        self.host_tables.numpy()[:n, :nb] = inputs.block_tables
        self.dev_int.copy_(self.host_int, non_blocking=True)
        self.scale.copy_(self.host_scale, non_blocking=True)
        self.tables[:n].copy_(self.host_tables[:n], non_blocking=True)
        for name, _ in variant:
            assert plugin_rows is not None
            self.plugins[name].stage(plugin_rows[name], n, b)
        self.copied.record()
        if device_ids is not None:
            self.d["ids"][:n].copy_(device_ids)
        graph, out = self.graphs[(variant, b)]
        graph.replay()
        return out[:n] if out is not None else None  # None: a tensor-parallel rank other than 0
