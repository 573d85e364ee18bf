"""The intervention plugin contract (docs/architecture.md §6); `actserve.interventions.base` is its public
name for third-party plugins.

A plugin owns one key of a request's `interventions` object. The API thread validates and prepares
(`spec_model`, `prepare`); the engine thread activates a plan when its sequence first runs, asks the
plugin for a per-step hook over the packed rows, and releases the plan when the sequence ends.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from actserve.server.contract.hooks import (
    AttentionHook,
    LinearInputHook,
    LinearWeightsHook,
    LogitsHook,
    MoEHook,
    PluginHooks,
    ResidualHook,
    RowInput,
)
from actserve.server.contract.kv_space import KVResidency, KVSpace
from actserve.server.contract.model_info import ModelInfo
from actserve.server.contract.weights import FormatRequest


class InterventionError(ValueError):
    """A spec that does not fit the loaded model; becomes a 400 naming `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class InterventionCapacityError(RuntimeError):
    """Server-side resources for plans are exhausted right now; becomes a 503."""


@dataclass
class RowSpan:
    """One sequence's rows in a packed step: rows [start, start+count) hold positions [pos0, pos0+count)."""

    plan: Any
    start: int
    count: int
    pos0: int
    prompt_len: int
    # the sequence's generated token ids so far, on the host (read-only; complete only for plugins that
    # declare `needs_output_tokens`, since other steps may launch before the last token is known)
    output_token_ids: Sequence[int] = ()
    # the sequence's KV block table on the host (read-only; ids as in `KVSpace`, host-tier ids included)
    block_table: Sequence[int] = ()


@dataclass(frozen=True)
class PluginHistogram:
    """A Prometheus histogram a plugin observes once per finished request (`finish_observations`): the
    engine creates it as `actserve_<name>` with labels `model_name` and `labels`, in its own registry."""

    name: str
    doc: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]


# one observation of a finished request: (histogram name, its label values in `labels` order, value)
Observation = tuple[str, tuple[str, ...], float]


# a fused step's per-row columns on the host: (table index int64, scale float32, normalize bool), each
# [rows, width]; index -1 = nothing for that row and column
FusedColumns = tuple[np.ndarray, np.ndarray, np.ndarray]


class InterventionPlugin(ABC):
    """One intervention kind. Instances are created once per loaded model."""

    name: ClassVar[str]
    description: ClassVar[str]
    hook_points: ClassVar[tuple[str, ...]]
    spec_model: ClassVar[type[BaseModel]]
    # the name of another plugin whose plans this plugin's plans are (e.g. fixed rows in its resident
    # table): when that plugin is in the registry, this plugin's rows of a step join its rows and go
    # through its hook (one fused kernel, one set of CUDA-graph inputs) instead of a hook of their own
    contributes_to: ClassVar[str | None] = None
    # columns one row of this plugin's plans may take in a fused step (`fused_columns`); the CUDA-graph
    # width is the fused plugin's count plus those of the plugins contributing to it
    graph_columns: ClassVar[int] = 0
    # fixed-shape per-row inputs this plugin's hooks read (`fill_row_inputs`); the registry packs them
    # per step and hands them to the hooks through `StepHooks`
    row_inputs: ClassVar[tuple[RowInput, ...]] = ()
    # its `graph_hooks()` act on every site its rows may need and read only `row_inputs` tensors (no host
    # work per step), so decode steps with its rows replay from CUDA graphs (captured with those hooks)
    graph_safe: ClassVar[bool] = False
    # its per-step work reads each row's generated tokens (`RowSpan.output_token_ids`, e.g. to advance a
    # grammar). When its only hook point is "logits", the engine may launch a step's forward before the
    # previous tokens reach the host and bind this plugin's logits hook (and fill its row inputs) once
    # they have, just before sampling; with any other hook point no step of its rows launches early
    needs_output_tokens: ClassVar[bool] = False
    # per-request histograms this plugin reports at each request's finish (`finish_observations`)
    histograms: ClassVar[tuple[PluginHistogram, ...]] = ()
    # how the plugin runs when the model is split over tensor-parallel ranks (docs/architecture.md §12):
    # "replicated": every rank keeps the plugin and gets each plan's `activate` / `release` (the plans are
    # pickled to the other ranks), and its residual hooks run on every rank over the replicated residual
    # (a fused table must be filled by `activate` alone); "rank0": its hooks act on the logits only, which
    # exist on rank 0 alone; None (the default): refused with --tensor-parallel-size above 1 (its requests
    # get a 400, its options stop the server)
    tp_mode: ClassVar[str | None] = None

    def __init__(self, model_info: ModelInfo) -> None:
        self.model_info = model_info
        # what this plugin offers beyond requests (e.g. a store of named vectors); the API reaches it
        # with `EngineClient.plugin_call(name, fn, ...)`, which runs fn(plugin, ...) where plugins live
        self.service: Any = None
        self._peers: Mapping[str, InterventionPlugin] = {}  # the registry's plugins; set by the registry

    def configure(self, options: Mapping[str, Any]) -> None:  # noqa: B027 - optional
        """Server start, before any request: this plugin's own options (`EngineConfig.plugin_options`
        under its name; {} when none were given). Raise to refuse them (the server does not start)."""

    def bind(self, peers: Mapping[str, InterventionPlugin]) -> None:
        """The registry hands each plugin the plugins loaded beside it (see `peer`)."""
        self._peers = peers

    def peer(self, name: str) -> InterventionPlugin | None:
        """Another plugin of the same registry by name (None when not loaded), for plugins that use
        another's API, e.g. to reserve rows in its table."""
        return self._peers.get(name)

    def fused_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(table [slots, num_layers, hidden], layer mask [slots, num_layers]) when this plugin's rows go
        through the fused residual-add + table + norm kernel; CUDA graphs capture with it. None: not fused."""
        return None

    def fused_columns(self, spans: list[RowSpan], num_rows: int) -> FusedColumns | None:
        """The per-row columns of a fused step on the host (graph steps copy them into static inputs);
        None when no row uses the table. Only called on a plugin whose `fused_table` is not None."""
        return None

    def parse(self, value: Any, param: str) -> BaseModel:
        """The request's raw spec validated into `spec_model`; the first error becomes an
        InterventionError naming the field under `param`. Plugins override it to refuse oversized input
        cheaply before the schema walks every element."""
        try:
            return self.spec_model.model_validate(value)
        except ValidationError as e:
            err = e.errors()[0]
            loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"])
            where = f"{param}{loc}"
            raise InterventionError(f"{where}: {err['msg']}", where) from None

    @abstractmethod
    def prepare(self, spec: BaseModel, param: str) -> Any:
        """Check `spec` against the model and return a plan; raise InterventionError(param=...) if invalid.
        None: the spec asks for nothing a plain request lacks (e.g. the default setting spelled out), so
        no plan is kept and the request runs, and shares prefix-cache blocks, as if it had no such key.

        Runs on the API thread, so it must not touch engine-owned device state."""

    def activate(self, plan: Any) -> None:  # noqa: B027 - optional
        """Engine thread, before the plan's first step: make its data resident."""

    def release(self, plan: Any) -> None:  # noqa: B027 - optional
        """Engine thread, when the sequence finishes, aborts or is preempted: free resident data."""

    def finish_observations(self, plan: Any) -> list[Observation]:
        """Engine thread, when the sequence finishes or is aborted, just before `release(plan)`: values to
        observe in this plugin's `histograms` (e.g. a per-request statistic its hooks accumulated on the
        device). Default: none."""
        return []

    def residual_hook(self, spans: list[RowSpan], num_rows: int) -> ResidualHook | None:
        """Per-step hook on the residual stream for the rows whose sequences carry a plan of this plugin
        (None, the default: nothing to do there, e.g. a logits-only plugin)."""
        return None

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:  # noqa: B027
        """Write this step's rows of `spans` into `arrays` (name -> host array [rows, width] per declared
        `RowInput`, pre-filled with its `none`); rows of other requests must keep `none`."""

    def logits_hook(self, spans: list[RowSpan], num_rows: int) -> LogitsHook | None:
        """Per-step hook on logits before sampling for these rows (None: nothing to do)."""
        return None

    def linear_hook(self, spans: list[RowSpan], num_rows: int) -> LinearInputHook | None:
        """Per-step hook on projection inputs for these rows (None: nothing to do). Native models only:
        the transformers fallback does not call it, so a plugin that needs it refuses in `prepare` when
        `model_info.implementation != "native"`."""
        return None

    def weights_hook(self, spans: list[RowSpan], num_rows: int) -> LinearWeightsHook | None:
        """Per-step choice of weight format per row and projection (None: the primary format for all).
        Native models only, as `linear_hook`; the formats come from `weight_formats()`."""
        return None

    def weight_formats(self) -> list[FormatRequest]:
        """Extra weight formats this plugin's rows may use, installed on the named projections at start
        (before CUDA graphs are captured)."""
        return []

    def attention_hook(self, spans: list[RowSpan], num_rows: int) -> AttentionHook | None:
        """Per-step KV-block selection at decode and observer of filled KV blocks (None: nothing to do).
        Native models only, as `linear_hook`."""
        return None

    def moe_hook(self, spans: list[RowSpan], num_rows: int) -> MoEHook | None:
        """Per-step routing of mixture-of-experts layers for these rows (None: the model's routing)."""
        return None

    def step_hooks(self, spans: list[RowSpan], num_rows: int) -> PluginHooks:
        """All of this plugin's hooks for one eager step (the per-point methods above)."""
        return PluginHooks(
            residual=self.residual_hook(spans, num_rows),
            logits=self.logits_hook(spans, num_rows),
            linear=self.linear_hook(spans, num_rows),
            weights=self.weights_hook(spans, num_rows),
            attention=self.attention_hook(spans, num_rows),
            moe=self.moe_hook(spans, num_rows),
        )

    def graph_hooks(self, mode: str = "") -> PluginHooks:
        """The hooks a decode CUDA graph captures for this plugin (`graph_safe` plugins only): the same
        kinds as `step_hooks`, but independent of any step's spans (every site its rows may need) and
        reading only `row_inputs` tensors, so that rows holding `none` stay as they are. Residual hooks
        other than a fused table cannot be captured. `mode`: the variant `graph_mode` named (only plugins
        that name one other than "" need the argument)."""
        raise NotImplementedError(f"{self.name} declares graph_safe but does not define graph_hooks()")

    def graph_mode(self, spans: list[RowSpan], num_rows: int) -> str | None:
        """Which variant of this plugin's graph hooks a decode step of these rows replays: "" (the
        default, `graph_hooks()`), or a name the plugin picks from the step's spans on the host, e.g. a
        faster path valid only when every row of the step is its own; the engine captures one graph per
        (plugin set, modes, batch bucket) and builds that variant's hooks with `graph_hooks(mode)`. None:
        no captured variant fits these rows (e.g. a per-row width beyond the captured one); the step runs
        eager. Only asked of `graph_safe` plugins."""
        return ""

    def kv_block_bytes(self) -> int:
        """Bytes of device memory this plugin keeps per KV block id (e.g. a summary of each block's keys):
        the engine sizes the KV cache with it, so each block costs its K/V plus this. 0 by default."""
        return 0

    def reserved_kv_blocks(self) -> int:
        """GPU KV blocks to set aside for this plugin when the server has a host tier (e.g. to recall
        offloaded blocks into); they are given in `bind_kv` (`KVSpace.reserved`). 0 by default."""
        return 0

    def bind_kv(self, kv: KVSpace) -> None:  # noqa: B027 - optional
        """Once the KV cache is sized (before any request): its block ids and host tier, to allocate side
        data per block id or use the reserved blocks. Native models only."""

    def kv_residency(self, plan: Any) -> KVResidency | None:
        """With a host tier: which blocks of this plan's sequence stay on the GPU (the others move to the
        host once its prompt is computed); None, the default: all of them (its hooks read any block)."""
        return None

    def blocks_moved(self, src: torch.Tensor, dst: torch.Tensor) -> None:  # noqa: B027 - optional
        """KV blocks `src` [n] int64 now live at ids `dst` [n] (a move between tiers): side data kept per
        block id follows them. Engine thread, between steps."""

    def stats(self) -> dict[str, float]:
        """Cumulative counters of this plugin (name -> value, never decreasing), exported as
        `actserve_intervention_stat_total{intervention, stat}`; read between steps, at most once a second
        on a busy server (a plugin may sync its device counters here). {} by default."""
        return {}

    def gauges(self) -> dict[str, float]:
        """Current levels of this plugin (name -> value, may go down), exported as
        `actserve_intervention_gauge{intervention, gauge}` and read like `stats`. {} by default."""
        return {}

    def prefix_key(self, plan: Any) -> Hashable | None:
        """What about `plan` changes the K/V of the request's prompt tokens, for the prefix cache: None
        when nothing does (a logits-only or generation-only plan: the prompt's KV is a plain request's),
        else a key equal for plans whose prompt KV is equal (e.g. vector identity, layers and scale). The
        default never shares: a plugin that does not say is assumed to change every prompt's KV."""
        return ("unshared", self.name, uuid.uuid4().hex)

    def metric_label(self, plan: Any) -> str | None:
        """The `value` label under which a sequence carrying `plan` is counted in
        `actserve_intervention_requests_total{intervention, value}` (e.g. which weights it asked for);
        None, the default: "" (the plugin's requests are counted under its name alone). Keep the set of
        values small: each one is a time series."""
        return None

    def json_schema(self) -> dict[str, Any]:
        return self.spec_model.model_json_schema()


def device_table(rows: int, shape: tuple[int, ...], info: ModelInfo) -> torch.Tensor:
    """A zeroed resident table in the model's dtype and device (one way to allocate plugin storage)."""
    return torch.zeros(rows, *shape, dtype=info.dtype, device=info.device)
