"""Hook points the native layers expose to interventions (docs/architecture.md §6), as plain per-step objects.

No Python forward hooks: the model calls `StepHooks` at fixed places, and a step without interventions
passes `None`, so plain batches pay one `is None` check per layer. Steering (the common case) is not a
Python callback at all: its per-row tensors go into the fused add + steering + norm between layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from actserve.kernels.steer_rmsnorm_ref import SteeringTensors, apply_steering_ref


class ResidualHook(Protocol):
    """Acts on the residual stream after decoder layer L, for all packed rows at once."""

    def layers(self) -> set[int]: ...

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class RowInput:
    """A fixed-shape per-row input a plugin declares: per packed row `width` values of `dtype`; rows the
    plugin does not own hold `none` (docs/architecture.md §6)."""

    name: str
    dtype: torch.dtype
    width: int
    none: Any


# a plugin's per-row inputs of one step: name -> tensor [rows, width] on the model's device
RowInputs = dict[str, torch.Tensor]

# the projections of a decoder layer a linear-input hook may act on
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LogitsHook(Protocol):
    """Acts on logits after the model and before sampling; must leave rows whose inputs are `none` as
    they are (bit-identical)."""

    def apply(self, logits: torch.Tensor, inputs: RowInputs) -> torch.Tensor: ...


class LinearInputHook(Protocol):
    """Acts on a projection's input [rows, in] before its matmul, per row through its inputs.

    A hook whose `apply` only zeroes the entries below a per-row magnitude may also define
    `thresholds` (`ThresholdHook`), so that the layer fuses the mask into a matmul that skips the
    weights of zeroed inputs instead of calling `apply`. A hook may also define `output`
    (`LinearOutputHook`) to act on the same projection's output."""

    def sites(self) -> set[tuple[int, str]]: ...

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: RowInputs) -> torch.Tensor: ...


@dataclass(frozen=True)
class LinearCall:
    """One projection's call as an output hook sees it: `x_in` its input before any input hook, `x` after
    them (what the matmul read), `y` the product [rows, out] (weight-format choices applied), and
    `matmul(z)` the same product over another input z (e.g. to recompute some outputs from `x_in`)."""

    x_in: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    matmul: Callable[[torch.Tensor], torch.Tensor]


class LinearOutputHook(Protocol):
    """The optional second method of a linear-input hook, at the same sites: the projection's output
    after its matmul, e.g. to add a term computed from the input the hook dropped (R-Sparse's low-rank
    path) or to zero output channels. Rows whose inputs are `none` must come back unchanged."""

    def output(self, layer: int, proj: str, call: LinearCall, inputs: RowInputs) -> torch.Tensor: ...


class ThresholdHook(LinearInputHook, Protocol):
    """A linear-input hook whose `apply(x)` is `x.masked_fill(x.abs() < thr[:, None], 0)`: per-row
    thresholds thr [rows] float32 (<= 0 keeps a row's every bit, +inf zeroes every finite entry).

    `thresholds` hands them to the layer in place of `apply` (None: not this step, call `apply`). The
    layer then computes *every* row of the step with a fused sparse matmul (kernels/sparse_gemv.py,
    through a format's `apply_thresholded`) wherever it has one (CUDA, <= 16 half rows, a transposed
    weight copy, no weight-format choice at the site); elsewhere it calls `apply` and its plain path. The
    fused kernel sums in another order than the plain GEMV, and it reads the union of the rows' active
    inputs, so a hook returns thresholds only for steps whose rows are all its own sparse rows: rows of
    other requests keep the plain path's bits, and padding rows (a decode graph's bucket) may get +inf
    so that they add nothing to the union."""

    def thresholds(self, layer: int, proj: str, inputs: RowInputs) -> torch.Tensor | None: ...

    # Optional, for one-row steps: `counter(layer, proj, inputs) -> (table, at) | None` asks the fused
    # matmul to add the row's entries below its threshold and its entries to table[at] (float64 [slots,
    # 2], at int32 [1], < 0: nothing) in the same launch (`WeightFormat.apply_thresholded`'s `count`);
    # a hook that gives one does not count that site itself in `fused_input`.


class LinearWeightsHook(Protocol):
    """Chooses, per row, which of a projection's weight formats its matmul uses (the layer's primary
    format unless a hook picks another). The formats themselves are installed at start from the plugin's
    `weight_formats()` (contract/weights.py `FormatRequest`)."""

    def sites(self) -> dict[tuple[int, str], tuple[str, ...]]:
        """(layer, projection) -> the format keys this hook may pick there."""
        ...

    def select(self, layer: int, proj: str, key: str, inputs: RowInputs) -> torch.Tensor:
        """[rows] bool: the rows whose matmul at this site uses format `key` (False for `none` rows)."""
        ...


class AttentionHook(Protocol):
    """Which KV blocks a decode row reads, and an observer of KV blocks that fill.

    `select` sees a decode step's block tables [rows, width] int32 (the row's logical blocks in order,
    the last one partly filled) and context lengths [rows] int32, and returns a table and lengths of the
    same shapes: a row reads the first `lens[r]` slots of the blocks its new table lists, in order (so a
    row that keeps blocks b0, b5 of a 6-block context has table [b0, b5, ...] and length
    bs + fill(b5)). Rows whose inputs are `none` must come back unchanged. Keys carry their rotary
    position already, so dropping blocks keeps the others' positions. Only decode rows (one new token
    after a computed context) are selected; prefill rows read their whole context. In a CPU step that
    packs prefills and decodes, `q`, the tables, lengths and `inputs` hold the decode rows only (in packed
    order); on CUDA (decode steps, graphs too) every row, and `select` must use device ops of fixed shapes
    only (no host sync). With a sliding window the window counts the selected slots, not positions."""

    def layers(self) -> set[int]: ...

    def select(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, inputs: RowInputs
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def filled(
        self, layer: int, kv_cache: torch.Tensor, blocks: torch.Tensor, rows: torch.Tensor, inputs: RowInputs
    ) -> None:
        """After layer `layer` wrote this step's K/V: physical KV blocks `blocks` [k] int64 became full,
        `rows` [k] int64 the packed row that wrote each one's last token (-1 entries: none). Decode-only
        steps (CUDA decode, graphs too): k = rows, -1 for rows that fill nothing; packed steps (prefills,
        the CPU's mixed steps): the filled blocks only, listed by the runner. `kv_cache` is the layer's
        [2, slots, kv_heads, head_dim] cache (slot = block * block_size + offset, `ModelInfo.block_size`)."""
        ...


class QueryHook(AttentionHook, Protocol):
    """An attention hook that also sees every row's queries (prefill and decode rows alike), before the
    decode rows' block selection: e.g. to keep recent queries for scoring KV blocks later, or running
    statistics of them. Optional: the layers call `queries` only on hooks that define it.

    `q` [rows, heads, head_dim] carries its rotary position (as the KV cache's keys do); `positions`
    [rows] int64 each row's position in its sequence; `inputs` the plugin's row inputs of every packed
    row (rows of other requests hold `none`). Device ops of fixed shapes only: decode CUDA graphs run it."""

    def queries(self, layer: int, q: torch.Tensor, positions: torch.Tensor, inputs: RowInputs) -> None: ...


class MoEHook(Protocol):
    """Routing of a mixture-of-experts layer, per row: which experts and with which weights (e.g. a
    per-request top-k, or keeping rows on resident experts).

    `route` sees the router's logits [rows, experts] (the layer's input through its router, in the model
    dtype) and the model's top_k, and returns (expert ids [rows, k] int64, weights [rows, k] float32) for
    every row, with a width k >= 1 of the hook's choosing (fixed for a hook object, so a decode CUDA graph
    captured with it replays), which may exceed top_k; a column holding no expert has id -1 and weight 0
    (it costs no weight reads and adds exactly +0.0). Rows whose inputs are `none` must get the model's
    own routing: `kernels.moe_ref.route_topk(router_logits, top_k, info.renormalize)` (`ModelInfo.moe`)
    in the first top_k columns, -1 after, so their bits are a plain step's. The layer takes each hook's
    result on its rows only (its row mask), in plugin order. Device ops of fixed shapes only (no host
    sync): decode steps run it inside CUDA graphs."""

    def layers(self) -> set[int]: ...

    def route(
        self, layer: int, router_logits: torch.Tensor, top_k: int, inputs: RowInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids [rows, k] int64, -1 = none; weights [rows, k] float32)."""
        ...


@dataclass
class PluginHooks:
    """One plugin's hooks of one step (or of a CUDA graph); any may be None."""

    residual: ResidualHook | None = None
    logits: LogitsHook | None = None
    linear: LinearInputHook | None = None
    weights: LinearWeightsHook | None = None
    attention: AttentionHook | None = None
    moe: MoEHook | None = None
    # the hooks fork work onto another CUDA stream: a graph capturing them launches its kernels without
    # programmatic dependent launch (kernels/pdl.py `pdl_suspended`)
    side_stream: bool = False

    def __bool__(self) -> bool:
        hooks = (self.residual, self.logits, self.linear, self.weights, self.attention, self.moe)
        return any(h is not None for h in hooks)


@dataclass
class BoundHooks:
    """A plugin's hooks with that step's per-row inputs and the rows its plugin owns ([rows] bool)."""

    hooks: PluginHooks
    inputs: RowInputs
    rows: torch.Tensor


class LinearSite:
    """What plugins do at one projection of one layer in one step, as the layers call it: input hooks
    (`__call__` on the input; `row_mask` [rows] bool says which rows they may change, the others must
    stay on the fast path) and weight-format choices (`choices()`: format key -> [rows] bool)."""

    def __init__(self, layer: int, proj: str) -> None:
        self.layer, self.proj = layer, proj
        self.hooks: list[tuple[LinearInputHook, RowInputs, torch.Tensor]] = []
        # the input hooks that also define `output`, in the same order (a subset of `hooks`)
        self.outputs: list[tuple[LinearOutputHook, RowInputs]] = []
        self.weights: list[tuple[LinearWeightsHook, RowInputs, tuple[str, ...]]] = []
        self._mask: torch.Tensor | None = None

    @property
    def row_mask(self) -> torch.Tensor:
        if self._mask is None:
            masks = [m for _, _, m in self.hooks]
            self._mask = masks[0] if len(masks) == 1 else torch.stack(masks).any(0)
        return self._mask

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for hook, inputs, _ in self.hooks:
            x = hook.apply(self.layer, self.proj, x, inputs)
        return x

    def finish(
        self,
        x_in: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        matmul: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The output hooks over the product `y` of the hooked input `x` (`x_in` before the hooks)."""
        for hook, inputs in self.outputs:
            y = hook.output(self.layer, self.proj, LinearCall(x_in, x, y, matmul), inputs)
        return y

    def thresholds(self) -> torch.Tensor | None:
        """[rows] float32 when every input hook here hands over thresholds this step (`ThresholdHook`):
        their elementwise max, since masks compose so (an entry survives both iff |x| >= both); None
        when some hook does not (the layer then calls them in turn)."""
        out: torch.Tensor | None = None
        for hook, inputs, _ in self.hooks:
            fn = getattr(hook, "thresholds", None)
            thr = fn(self.layer, self.proj, inputs) if fn is not None else None
            if thr is None:
                return None
            out = thr if out is None else torch.maximum(out, thr)
        return out

    def counter(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A hook's count target for the fused matmul (`ThresholdHook.counter`: table float64 [slots, 2],
        at int32 [1]), the first one given; None when no hook gives one."""
        for hook, inputs, _ in self.hooks:
            fn = getattr(hook, "counter", None)
            target = fn(self.layer, self.proj, inputs) if fn is not None else None
            if target is not None:
                return target
        return None

    def fused_input(self, x: torch.Tensor, thr: torch.Tensor) -> None:
        """After a fused thresholded matmul (which called no `apply`): hooks that define `fused_input`
        (e.g. to count the entries below the thresholds) see the site's input as the layer got it (for
        down_proj the [gate | up] the kernel formed silu·mul from) and the thresholds [rows]."""
        for hook, inputs, _ in self.hooks:
            fn = getattr(hook, "fused_input", None)
            if fn is not None:
                fn(self.layer, self.proj, x, thr, inputs)

    def choices(self) -> list[tuple[str, torch.Tensor]]:
        """(format key, [rows] bool) per weight-format choice here, in plugin order (a later plugin's
        choice wins on rows two plugins both pick)."""
        return [
            (key, hook.select(self.layer, self.proj, key, inputs))
            for hook, inputs, keys in self.weights
            for key in keys
        ]


class StepHooks:
    """The hooks of one step: at most one fused steering table, generic residual callbacks, and every
    plugin's other hooks with its per-row inputs, sorted by hook point for the layers to call."""

    def __init__(
        self,
        residual: list[ResidualHook],
        steer: SteeringTensors | None = None,
        plugins: list[BoundHooks] | None = None,
    ) -> None:
        self.steer = steer
        self.plugins = plugins or []
        self.logits: list[tuple[LogitsHook, RowInputs]] = []
        self.linear: dict[int, dict[str, LinearSite]] = {}
        self.attention: dict[int, list[tuple[AttentionHook, RowInputs]]] = {}
        self.moe: dict[int, list[tuple[MoEHook, RowInputs, torch.Tensor]]] = {}
        self.residual: dict[int, list[ResidualHook]] = {}
        for hook in residual + [b.hooks.residual for b in self.plugins if b.hooks.residual is not None]:
            tensors = getattr(hook, "tensors", None)
            if isinstance(tensors, SteeringTensors) and self.steer is None:
                self.steer = tensors
                continue
            for layer in hook.layers():
                self.residual.setdefault(layer, []).append(hook)
        for b in self.plugins:
            h = b.hooks
            if h.logits is not None:
                self.logits.append((h.logits, b.inputs))
            if h.linear is not None:
                for layer, proj in h.linear.sites():
                    site = self._site(layer, proj)
                    site.hooks.append((h.linear, b.inputs, b.rows))
                    if callable(getattr(h.linear, "output", None)):
                        site.outputs.append((h.linear, b.inputs))  # type: ignore[arg-type]
            if h.weights is not None:
                for (layer, proj), keys in h.weights.sites().items():
                    self._site(layer, proj).weights.append((h.weights, b.inputs, tuple(keys)))
            if h.attention is not None:
                for layer in h.attention.layers():
                    self.attention.setdefault(layer, []).append((h.attention, b.inputs))
            if h.moe is not None:
                for layer in h.moe.layers():
                    self.moe.setdefault(layer, []).append((h.moe, b.inputs, b.rows))

    def _site(self, layer: int, proj: str) -> LinearSite:
        sites = self.linear.setdefault(layer, {})
        if proj not in sites:
            sites[proj] = LinearSite(layer, proj)
        return sites[proj]

    def __bool__(self) -> bool:
        plugin_points = self.logits or self.linear or self.attention or self.moe
        return bool(self.residual or self.steer is not None or plugin_points)

    def linear_at(self, layer: int) -> dict[str, LinearSite] | None:
        """Layer `layer`'s projections where some plugin acts (None: none, the plain path)."""
        return self.linear.get(layer)

    def attention_at(self, layer: int) -> list[tuple[AttentionHook, RowInputs]] | None:
        """Layer `layer`'s attention hooks (None: none, the plain path)."""
        return self.attention.get(layer)

    def moe_at(self, layer: int) -> list[tuple[MoEHook, RowInputs, torch.Tensor]] | None:
        """Layer `layer`'s routing hooks with their inputs and row masks (None: the model's routing)."""
        return self.moe.get(layer)

    def apply_logits(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The logits hooks over logits of packed rows `rows` (None: all rows, in order)."""
        for hook, inputs in self.logits:
            cut = inputs if rows is None else {k: v[rows] for k, v in inputs.items()}
            logits = hook.apply(logits, cut)
        return logits

    def after_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The generic hooks only (the native model has already applied steering, fused)."""
        for hook in self.residual.get(layer, ()):
            hidden = hook.apply(layer, hidden)
        return hidden

    def apply_all(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Steering, then the generic hooks: for models without the fused path (transformers fallback)."""
        if self.steer is not None:
            hidden = apply_steering_ref(hidden, layer, self.steer)
        return self.after_layer(layer, hidden)
