"""`sparsity`: activation sparsity per request (issue 14). `{"sparsity": {"method": M, "level": s}}` makes
the request's generated tokens run with a fraction s of some decoder projection inputs zeroed, by method M:

- `teal`: at every projection's input (qkv, o, gate_up, and the down projection's silu(gate)·up) the
  entries with |x| below that layer's and projection's threshold (TEAL);
- `chess`: the FFN's channels whose |silu(gate_i)| * E|up_i| is below one threshold per layer, and the
  q and o projections' inputs below theirs; k and v stay dense (CHESS: chess.py);
- `r_sparse`: every projection's input entries with a low |x_j| * ||W[:, j]||, their product replaced by a
  low-rank one (R-Sparse: r_sparse.py; s is the share of the projection's multiply-adds saved);
- `coreinfer`: the FFN neurons outside the request's core set, chosen from its prompt (CoreInfer:
  coreinfer.py; s is the share of FFN neurons dropped).
The GPU kernel that skips the zeroed weight columns is another part of issue 14: here rows are zeroed,
then multiplied densely (same numbers, no speed-up).

Tables: from the model's calibration (artifact.py; `actserve sparsity calibrate`; CoreInfer needs none),
one resident table per method over the levels 0.00..0.90 by 0.01 on the model's device. A row's method
and level index travel as per-row inputs (-1 = none / dense), so the hook (hooks.py) reads only tensors:
steps mixing methods and levels (and dense rows) are one hook and replay from decode CUDA graphs
(`graph_safe`). Level 0's thresholds and ranks are 0 and the comparisons strict, so rows at -1 or 0 keep
every bit.

Decode only: a row is sparse when it holds a generated token (position >= prompt length); the prompt's
rows stay dense, so the prompt's K/V is a plain request's (`prefix_key` None: sparse and dense requests
share prefix-cache blocks; CoreInfer excepted, whose core set needs every prompt token) and the first
generated token is the dense model's. A step with no decode row of the plugin (and no CoreInfer prompt
row) gets no hook at all.

Metrics: requests by method (`metric_label`) and, per finished request, the achieved sparsity
(`actserve_sparsity_achieved_ratio{method}`), from per-request counters the hook fills on the device.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actserve.interventions.base import (
    PROJECTIONS,
    InterventionCapacityError,
    InterventionError,
    InterventionPlugin,
    LinearInputHook,
    ModelInfo,
    Observation,
    PluginHistogram,
    PluginHooks,
    RowInput,
    RowInputs,
    RowSpan,
)
from actserve.interventions.sparsity.artifact import (
    SparsityCalibration,
    default_path,
    load_calibration,
)
from actserve.interventions.sparsity.chess import ChessHook
from actserve.interventions.sparsity.coreinfer import CoreInferHook, CoreState, Observe, core_size
from actserve.interventions.sparsity.hooks import INPUT, METHOD, METHODS, SLOT, Counters, SparsityHook
from actserve.interventions.sparsity.r_sparse import RSparseHook

log = logging.getLogger(__name__)
LEVEL_STEP = 0.01
MAX_LEVEL = 0.9
NUM_LEVELS = round(MAX_LEVEL / LEVEL_STEP) + 1  # 0.00, 0.01, ..., 0.90
IMPLEMENTED = METHODS
CALIBRATED = ("teal", "chess", "r_sparse")  # the methods whose tables come from the calibration
SLOTS = 256  # requests with a sparsity plan at once (per-request counters)
CORE_SLOTS = 64  # of them CoreInfer requests, by default (per-request core tables [layers, intermediate])
ACHIEVED = PluginHistogram(
    "sparsity_achieved_ratio",
    "Per finished request with activation sparsity: the share of its decode's projection multiply-adds "
    "its method skipped (zero inputs, less R-Sparse's low-rank path), by method.",
    ("method",),
    tuple(round(0.05 * i, 2) for i in range(1, 20)),
)


def levels() -> torch.Tensor:
    """float64 [NUM_LEVELS]: the levels the tables hold, 0.00 ... 0.90."""
    return torch.arange(NUM_LEVELS, dtype=torch.float64) * LEVEL_STEP


def level_index(level: float) -> int:
    return round(level / LEVEL_STEP)


class SparsitySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["teal", "chess", "r_sparse", "coreinfer"] = Field(
        description="teal: zero every projection input below per-layer thresholds; chess: per-channel FFN "
        "thresholds and the q/o projection inputs; r_sparse: input sparsity plus a low-rank path for the "
        "dropped part; coreinfer: the FFN neurons chosen from the prompt (all calibrated on the model's "
        "activations except coreinfer)"
    )
    level: float = Field(
        ge=0.0,
        le=MAX_LEVEL,
        allow_inf_nan=False,
        description="target sparsity, 0 to 0.9 in steps of 0.01 (0: dense): the fraction of the method's "
        "inputs zeroed (r_sparse: of the projections' multiply-adds saved; coreinfer: of the FFN neurons "
        "dropped); applied to generated tokens, the prompt runs dense",
    )

    @field_validator("level")
    @classmethod
    def _on_grid(cls, v: float) -> float:
        if abs(v / LEVEL_STEP - level_index(v)) > 1e-6:
            raise ValueError(f"level must be a multiple of {LEVEL_STEP} in [0, {MAX_LEVEL}], got {v}")
        return v


@dataclass
class SparsityPlan:
    method: str
    level_index: int
    slot: int = field(default=-1, compare=False)  # its counters' slot
    core_slot: int = field(default=-1, compare=False)  # CoreInfer: its core tables' slot
    active: bool = field(default=False, compare=False)
    released: bool = field(default=False, compare=False)


class TealHook:
    """At every site: x with entries |x| < the row's threshold zeroed (-1 rows read level 0's zeros)."""

    def __init__(self, table: torch.Tensor, sites: set[tuple[int, str]]) -> None:
        self.table, self._sites = table, sites  # [levels, layers, projections]

    def sites(self) -> set[tuple[int, str]]:
        return self._sites

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: RowInputs) -> torch.Tensor:
        idx = inputs[INPUT][:, 0].clamp(min=0).long()
        thr = self.table[:, layer, PROJECTIONS.index(proj)][idx]  # [rows]
        return x.masked_fill(x.abs() < thr.unsqueeze(1), 0)


def decode_rows(span: RowSpan) -> tuple[int, int]:
    """The span's packed rows [lo, hi) that hold generated tokens (positions >= prompt_len)."""
    n_prompt = min(span.count, max(0, span.prompt_len - span.pos0))
    return span.start + n_prompt, span.start + span.count


class SparsityPlugin(InterventionPlugin):
    name = "sparsity"
    description = (
        "Activation sparsity at decode: zero a `level` fraction of the projection inputs of the generated "
        "tokens by one of four methods (teal, chess, r_sparse, coreinfer), calibrated on the model."
    )
    hook_points = ("linear_input", "linear_output")
    spec_model = SparsitySpec
    row_inputs = (
        RowInput(INPUT, torch.int32, 1, -1),
        RowInput(METHOD, torch.int32, 1, -1),
        RowInput(SLOT, torch.int32, 2, -1),
    )
    graph_safe = True
    histograms = (ACHIEVED,)

    def __init__(self, model_info: ModelInfo) -> None:
        super().__init__(model_info)
        self.calibration: SparsityCalibration | None = None
        self.source: Path | None = None
        self.hooks: dict[str, Any] = {}  # method -> its hook over the resident tables
        self.tables: dict[str, torch.Tensor] = {}  # method -> its resident threshold table
        self.sites = {(layer, p) for layer in range(model_info.num_layers) for p in PROJECTIONS}
        self.counters = Counters(SLOTS, model_info.device)
        self.core: CoreState | None = None
        self._free = list(range(SLOTS - 1, -1, -1))
        self._free_core: list[int] = []
        self._lock = threading.Lock()

    def configure(self, options: Mapping[str, Any]) -> None:
        """Option `calibration` (a file from `actserve sparsity calibrate`); without it, the model folder's
        own calibration file when there is one. A given file that does not load stops the server. Option
        `coreinfer_slots` (default CORE_SLOTS): CoreInfer requests at once, each with core tables [layers,
        intermediate] resident (0: CoreInfer off, nothing allocated)."""
        slots = options.get("coreinfer_slots", CORE_SLOTS)
        if not isinstance(slots, int) or slots < 0:
            raise ValueError(f"sparsity option coreinfer_slots must be an integer >= 0, got {slots!r}")
        mi = self.model_info
        if slots and mi.intermediate_size > 0:
            self.core = CoreState(slots, mi.num_layers, mi.intermediate_size, mi.device)
            self.hooks["coreinfer"] = CoreInferHook(self.core)
            self._free_core = list(range(slots - 1, -1, -1))
        given = options.get("calibration")
        path = Path(given) if given else default_path(self.model_info.path)
        if not given and not path.is_file():
            return
        cal = load_calibration(path)
        cal.check_fits(self.model_info)
        if cal.model and cal.model != self.model_info.name:
            log.warning(
                "sparsity calibration %s was made on %r; serving %r", path, cal.model, self.model_info.name
            )
        self.calibration, self.source = cal, path
        dev, dtype = mi.device, mi.dtype
        self.tables = {"teal": cal.thresholds(levels()).to(dev)}
        self.hooks["teal"] = TealHook(self.tables["teal"], self.sites)
        if cal.chess is not None:
            self.tables["chess"] = cal.chess.thresholds(levels(), cal.counts, cal.edges).to(dev)
            q_size = mi.num_heads * mi.head_dim
            up_mean = cal.chess.up_mean.to(dev)
            self.hooks["chess"] = ChessHook(self.tables["chess"], up_mean, q_size, mi.num_layers)
        if cal.rsparse is not None:
            rs = cal.rsparse
            self.tables["r_sparse"] = rs.thresholds(levels(), cal.edges).to(dev)
            self.hooks["r_sparse"] = RSparseHook(
                self.tables["r_sparse"], rs.ranks(levels()).to(dev),
                {p: t.to(dev) for p, t in rs.colnorm.items()},
                {p: t.to(dev, dtype) for p, t in rs.vs.items()},
                {p: t.to(dev, dtype) for p, t in rs.u.items()},
            )  # fmt: skip

    def prepare(self, spec: BaseModel, param: str) -> SparsityPlan | None:
        """The method, level index and slots (the plan); None at level 0, a dense request."""
        assert isinstance(spec, SparsitySpec)
        index = level_index(spec.level)
        if index == 0:
            return None
        if self.model_info.implementation != "native":  # linear-input hooks exist in native models only
            raise InterventionError(f"{param}: sparsity needs the native model implementation", param)
        if spec.method not in self.hooks:
            raise InterventionError(self._missing(spec.method, param), param)
        plan = SparsityPlan(spec.method, index)
        with self._lock:
            core = spec.method == "coreinfer"
            if not self._free or (core and not self._free_core):
                kind = "CoreInfer " if core and self._free else ""
                raise InterventionCapacityError(f"all {kind}sparsity request slots are in use; retry shortly")
            plan.slot = self._free.pop()
            if core:
                plan.core_slot = self._free_core.pop()
        return plan

    def _missing(self, method: str, param: str) -> str:
        if method == "coreinfer":
            return f"{param}: CoreInfer is off on this server (started with --sparsity-coreinfer-slots 0)"
        where = default_path(self.model_info.path)
        how = (
            f"make one with `actserve sparsity calibrate --model {self.model_info.path}` (it writes {where}, "
            "loaded at the next start) or start with --sparsity-calibration FILE"
        )
        if self.calibration is None:
            return f"{param}: this server has no sparsity calibration for {self.model_info.name}; {how}"
        return f"{param}: the sparsity calibration in use ({self.source}) has no {method} tables; {how}"

    def activate(self, plan: SparsityPlan) -> None:  # type: ignore[override]
        """First activation: the request's counters (and core tables) start empty."""
        if plan.active:
            return
        plan.active = True
        self.counters.reset(plan.slot)
        if plan.core_slot >= 0 and self.core is not None:
            self.core.reset(plan.core_slot)

    def release(self, plan: SparsityPlan) -> None:  # type: ignore[override]
        if plan.released or plan.slot < 0:
            return
        plan.released = True
        with self._lock:
            self._free.append(plan.slot)
            if plan.core_slot >= 0:
                self._free_core.append(plan.core_slot)

    def finish_observations(self, plan: SparsityPlan) -> list[Observation]:  # type: ignore[override]
        """The request's achieved sparsity, when it decoded anything sparse (one device read)."""
        if plan.slot < 0 or not plan.active:
            return []
        skipped, total = self.counters.read(plan.slot)
        return [(ACHIEVED.name, (plan.method,), skipped / total)] if total > 0 else []

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        for s in spans:
            lo, hi = decode_rows(s)
            arrays[INPUT][lo:hi, 0] = s.plan.level_index
            arrays[METHOD][s.start : s.start + s.count, 0] = METHODS.index(s.plan.method)
            arrays[SLOT][s.start : s.start + s.count] = (s.plan.slot, s.plan.core_slot)

    def _hook(self, methods: set[str], observe: list[Observe] | None = None) -> SparsityHook:
        parts = []
        for m in METHODS:
            if m in methods and m in self.hooks:
                hook = self.hooks[m]
                if m == "coreinfer" and observe:
                    assert self.core is not None
                    hook = CoreInferHook(self.core, observe)
                parts.append((METHODS.index(m), hook))
        return SparsityHook(parts, self.counters, self.model_info.num_layers, self.hooks.get("r_sparse"))

    def linear_hook(self, spans: list[RowSpan], num_rows: int) -> LinearInputHook | None:
        """The methods of the spans with decode rows, CoreInfer's prompt chunks observed; None when there
        is neither (a prompt chunk of another method runs the plain path)."""
        methods: set[str] = set()
        observe: list[Observe] = []
        n = self.model_info.intermediate_size
        for s in spans:
            lo, hi = decode_rows(s)
            if hi > lo:
                methods.add(s.plan.method)
            if s.plan.method == "coreinfer" and lo > s.start:
                assert self.core is not None
                if s.pos0 == 0:  # the prompt starts (again, after a preemption): a fresh core set
                    self.core.reset(s.plan.core_slot)
                keep = core_size(s.plan.level_index * LEVEL_STEP, n)
                observe.append(Observe(s.plan.core_slot, keep, s.start, lo))
                methods.add("coreinfer")
        return self._hook(methods, observe) if methods else None

    def graph_hooks(self) -> PluginHooks:
        return PluginHooks(linear=self._hook(set(self.hooks)))

    def prefix_key(self, plan: Any) -> Any:
        """None (the prompt runs dense, so its K/V is a plain request's), but for CoreInfer, whose core set
        comes from every prompt token's activations: never shared."""
        return ("coreinfer", uuid.uuid4().hex) if plan.method == "coreinfer" else None

    def metric_label(self, plan: Any) -> str:
        """`actserve_intervention_requests_total{intervention="sparsity", value=<method>}`."""
        return str(plan.method)

    def json_schema(self) -> dict[str, Any]:
        """The spec's schema, and under `x-actserve-calibration` the calibration in use (null: none, so
        requests of the calibrated methods are refused) with the methods it has tables for."""
        schema = super().json_schema()
        cal = self.calibration
        shown: dict[str, Any] | None = None
        if cal is not None:
            shown = {"file": str(self.source), "model": cal.model, "tokens": cal.tokens}
            shown["corrected"] = cal.grid is not None
            shown["methods"] = [m for m in CALIBRATED if m in self.hooks]
        schema["x-actserve-calibration"] = shown
        return schema
