"""`sparsity`: activation sparsity per request (issue 14). `{"sparsity": {"method": M, "level": s}}` makes
the request's generated tokens run with a fraction s of some decoder projection inputs zeroed, by method M:

- `teal`: at every projection's input (qkv, o, gate_up, and the down projection's silu(gate)·up) the
  entries with |x| below that layer's and projection's threshold (TEAL);
- `chess`: the FFN's channels whose |silu(gate_i)| * E|up_i| is below one threshold per layer, then the
  down input below its threshold, and the q and o projections' inputs below theirs; k and v stay dense
  (CHESS: chess.py);
- `r_sparse`: every projection's input entries with a low |x_j| * ||W[:, j]||, their product replaced by a
  low-rank one (R-Sparse: r_sparse.py);
- `coreinfer`: the FFN neurons outside the request's core set, chosen from its prompt (CoreInfer:
  coreinfer.py; s is the share of FFN neurons dropped).

For the first three s is the share of the multiply-adds of the method's sites saved; each site's own
level, and so its threshold, comes from the calibration's allocation (allocation.py).

Speed (CUDA, TEAL): in a *fused* step, one whose rows are all TEAL sparse decode rows (at most 16, and
their expected union of active inputs at most `MAX_UNION`), the hook hands the layers its thresholds
(`TealHook.thresholds`) and every projection runs the sparse GEMV (kernels/sparse_gemv.py) over a
transposed copy of its weight (`TransposedFormat`, asked for at start with `weight_formats`; option
`kernel`, `--sparsity-kernel off`, leaves it out), which reads only the weight rows of the inputs that
stay active and thresholds and forms silu·mul in its loads. Decode graphs capture that as the plugin's
"fused" graph mode, in which padding rows (-1) read an extra +inf level and so add nothing to the union.
Any other step masks x (`apply`) and runs the plain path: a row of another request (or a prompt row) in
the step would make the union all inputs anyway, and this way it keeps the bits of a server without
the plugin, which the fused kernel's other summation order would not. The other methods mask and
multiply densely (their kernels are not built); each graph mode holds the methods of its steps only.

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
    FormatRequest,
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
    TransposedFormat,
)
from actserve.interventions.sparsity.artifact import (
    SparsityCalibration,
    default_path,
    load_calibration,
)
from actserve.interventions.sparsity.chess import ChessHook
from actserve.interventions.sparsity.coreinfer import CoreInferHook, CoreState, Observe, core_size
from actserve.interventions.sparsity.hooks import (
    COUNTED,
    INPUT,
    METHOD,
    METHODS,
    SLOT,
    Counters,
    SparsityHook,
    entry_macs,
)
from actserve.interventions.sparsity.r_sparse import RSparseHook
from actserve.kernels.gemv_ref import MAX_ROWS
from actserve.kernels.sparsity_ops_ref import threshold_mask_ref

log = logging.getLogger(__name__)
LEVEL_STEP = 0.01
MAX_LEVEL = 0.9
NUM_LEVELS = round(MAX_LEVEL / LEVEL_STEP) + 1  # 0.00, 0.01, ..., 0.90
IMPLEMENTED = METHODS
CALIBRATED = ("teal", "chess", "r_sparse")  # the methods whose tables come from the calibration
FUSED = "fused"  # the graph mode of steps whose rows are all TEAL sparse rows (the sparse GEMV)
TRANSPOSED = "transposed"  # the key of the W^T weight copies the sparse GEMV reads
COUNTED_AT = "qkv_proj"  # a fused step's one counted site per layer
# a step of 2-16 rows is fused only while its rows' union of active inputs is expected (rows taken as
# independent) to cover at most this fraction of the inputs. H200, one Llama-3-8B layer: the 2-16-row
# (loop) kernel pays below ~0.64 active; at 8 rows of 50% (union ~1) it ran at 0.76x the dense GEMV's
# speed (bench/results/sparse_gemv_quick.json). One row is fused at every level above 0: its one-shot
# kernel on W^T is as fast as the dense GEMV even with every input active (1.08x against 1.05x torch
# bf16 at level 0, 1.36x at 0.25; bench/results/sparse_gemv.json); level 0 keeps the dense path's bits
MAX_UNION = 0.6
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
    """At every site: x with entries |x| < the row's threshold zeroed (-1 rows read level 0's zeros).

    `padded` (a fused step: every real row is a sparse row of this plugin): the table with one more
    level, +inf, last, which -1 rows (a graph bucket's padding) read; the hook then hands its thresholds
    to the layers (`thresholds`), which run the sparse GEMV where they can. `counters` (fused steps): the
    per-request counters, fed at each layer's qkv projection from the input and thresholds the fused
    matmul saw: by the sparse GEMV's own launch in one-row steps (`counter`), by a count launch after it
    otherwise (`fused_input`); masked steps count in `SparsityHook`."""

    def __init__(
        self,
        table: torch.Tensor,
        sites: set[tuple[int, str]],
        padded: torch.Tensor | None = None,
        counters: Counters | None = None,
    ) -> None:
        self.table, self._sites, self.padded = table, sites, padded  # [levels, layers, projections]
        self.counters = counters
        self._memo: tuple[torch.Tensor, torch.Tensor] | None = None

    def sites(self) -> set[tuple[int, str]]:
        return self._sites

    def _thresholds(self, inputs: RowInputs) -> torch.Tensor:
        """[rows, layers, projections]: every site's threshold per row, gathered once per forward (its
        sites share the step's input tensor; a new step, or a graph capture, brings a new one)."""
        idx = inputs[INPUT]
        if self._memo is None or self._memo[0] is not idx:
            if self.padded is None:
                thr = self.table[idx[:, 0].clamp(min=0).long()]
            else:
                thr = self.padded[idx[:, 0].long()]  # -1: the last level, +inf
            self._memo = (idx, thr)
        return self._memo[1]

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: RowInputs) -> torch.Tensor:
        thr = self._thresholds(inputs)[:, layer, PROJECTIONS.index(proj)]  # [rows]
        if x.is_cuda and x.stride(1) == 1:
            from actserve.kernels.sparsity_ops import threshold_mask  # Triton: CUDA only

            return threshold_mask(x, thr)  # one launch
        return threshold_mask_ref(x, thr)

    def thresholds(self, layer: int, proj: str, inputs: RowInputs) -> torch.Tensor | None:
        """[rows] float32 (a strided view) in a fused step; None otherwise (the layers call `apply`)."""
        if self.padded is None:
            return None
        return self._thresholds(inputs)[:, layer, PROJECTIONS.index(proj)]

    def counter(self, layer: int, proj: str, inputs: RowInputs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A one-row fused step's count at the qkv input, done by the sparse GEMV's own launch: the
        projection's counters [slots + 1, 2] and the row's slot there (-1: not counted, as
        `count_skipped` decides; filled on the host, `fill_row_inputs`, so no device op makes it). None
        elsewhere (`fused_input` counts)."""
        if self.counters is None or proj != COUNTED_AT or inputs[INPUT].shape[0] != 1:
            return None
        return self.counters.table[PROJECTIONS.index(proj)], inputs[SLOT][:, 2]

    def fused_input(
        self, layer: int, proj: str, x: torch.Tensor, thr: torch.Tensor, inputs: RowInputs
    ) -> None:
        """A fused step's count, at the qkv input only (the smallest, and one per layer: counting costs
        kernel launches on the fast path): its entries below the row's threshold. One-row steps were
        counted by the matmul itself (`counter`)."""
        if self.counters is not None and proj == COUNTED_AT and thr.shape[0] != 1:
            self.counters.add_below(proj, x, thr, inputs)


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
        # (counter slot, core slot, counter slot where a fused step counts: `Counters.target` at COUNTED_AT)
        RowInput(SLOT, torch.int32, 3, -1),
    )
    graph_safe = True
    histograms = (ACHIEVED,)

    def __init__(self, model_info: ModelInfo) -> None:
        super().__init__(model_info)
        self.calibration: SparsityCalibration | None = None
        self.source: Path | None = None
        self.hooks: dict[str, Any] = {}  # method -> its hook over the resident tables
        self.tables: dict[str, torch.Tensor] = {}  # method -> its resident threshold table
        self.padded: dict[str, torch.Tensor] = {}  # method -> its table with a last level of +inf
        self.sites = {(layer, p) for layer in range(model_info.num_layers) for p in PROJECTIONS}
        self.kernel = False  # fused steps run the sparse GEMV (CUDA, option `kernel`)
        self.counters = Counters(SLOTS, model_info.device, entry_macs(model_info))
        self.core: CoreState | None = None
        self._free = list(range(SLOTS - 1, -1, -1))
        self._free_core: list[int] = []
        self._lock = threading.Lock()

    def configure(self, options: Mapping[str, Any]) -> None:
        """Option `calibration` (a file from `actserve sparsity calibrate`); without it, the model folder's
        own calibration file when there is one. A given file that does not load stops the server. Option
        `coreinfer_slots` (default CORE_SLOTS): CoreInfer requests at once, each with core tables [layers,
        intermediate] resident (0: CoreInfer off, nothing allocated). Option `kernel` (default true): on
        CUDA, W^T copies of the projections for TEAL's sparse GEMV."""
        kernel = options.get("kernel", True)
        if not isinstance(kernel, bool):
            raise ValueError(f"sparsity option kernel must be true or false, got {kernel!r}")
        self.kernel = kernel and self.model_info.device.type == "cuda"
        slots = options.get("coreinfer_slots", CORE_SLOTS)
        if not isinstance(slots, int) or slots < 0:
            raise ValueError(f"sparsity option coreinfer_slots must be an integer >= 0, got {slots!r}")
        mi = self.model_info
        if slots and mi.intermediate_size > 0 and mi.moe is None:
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
        table = cal.thresholds(levels()).to(dev)
        self.tables = {"teal": table}
        self.padded = {"teal": torch.cat([table, torch.full_like(table[:1], float("inf"))])}
        self.hooks["teal"] = TealHook(table, self.sites)
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
                {p: t.to(dev) for p, t in rs.scale().items()},
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
        if self.model_info.is_moe:  # the experts are not projections with linear-input hooks
            raise InterventionError(f"{param}: sparsity of mixture-of-experts models is not built", param)
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
        skipped, total = self.counters.read(plan.slot, plan.method)
        return [(ACHIEVED.name, (plan.method,), skipped / total)] if total > 0 else []

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        for s in spans:
            lo, hi = decode_rows(s)
            arrays[INPUT][lo:hi, 0] = s.plan.level_index
            arrays[METHOD][s.start : s.start + s.count, 0] = METHODS.index(s.plan.method)
            arrays[SLOT][s.start : s.start + s.count, :2] = (s.plan.slot, s.plan.core_slot)
            if COUNTED_AT in COUNTED[s.plan.method]:  # as `Counters.target` picks rows, on the host
                arrays[SLOT][lo:hi, 2] = s.plan.slot

    def weight_formats(self) -> list[FormatRequest]:
        """A W^T copy of every projection for the sparse GEMV, when fused steps can run (the kernel on, a
        calibration loaded); it costs the projections' weight bytes once more."""
        if not (self.kernel and self.tables):
            return []
        return [FormatRequest(TRANSPOSED, frozenset(self.sites), TransposedFormat)]

    def fused(self, spans: list[RowSpan], num_rows: int) -> bool:
        """Whether a step of these rows is fused: the kernel is on and all `num_rows` rows (at most
        MAX_ROWS) are TEAL decode rows of these spans, whose union of active inputs, rows taken as
        independent (1 - the product of their levels), stays within MAX_UNION; one row at any level
        above 0."""
        if not self.kernel or num_rows > MAX_ROWS or "teal" not in self.padded:
            return False
        rows, all_zero = 0, 1.0  # the chance that an input is zero in every row
        for s in spans:
            if s.plan.method != "teal":
                return False
            lo, hi = decode_rows(s)
            rows += hi - lo
            all_zero *= (s.plan.level_index * LEVEL_STEP) ** (hi - lo)
        if rows == 1:
            return num_rows == 1 and all_zero > 0
        return rows == num_rows and 1 - all_zero <= MAX_UNION

    def _methods(self, spans: list[RowSpan]) -> set[str]:
        """The methods of the spans that have decode rows here."""
        return {s.plan.method for s in spans if decode_rows(s)[1] > decode_rows(s)[0]}

    def _hook(self, methods: set[str], observe: list[Observe] | None = None) -> SparsityHook:
        """The masking hook of `methods` (CoreInfer observing the prompt chunks `observe`)."""
        parts = []
        for m in METHODS:
            if m in methods and m in self.hooks:
                hook = self.hooks[m]
                if m == "coreinfer" and observe:
                    assert self.core is not None
                    hook = CoreInferHook(self.core, observe)
                parts.append((METHODS.index(m), hook))
        return SparsityHook(parts, self.counters, self.model_info.num_layers, self.hooks.get("r_sparse"))

    def _fused_hook(self) -> TealHook:
        return TealHook(self.tables["teal"], self.sites, self.padded["teal"], self.counters)

    def linear_hook(self, spans: list[RowSpan], num_rows: int) -> LinearInputHook | None:
        """A fused step: TEAL handing its thresholds to the sparse GEMV. Otherwise the methods of the spans
        with decode rows, CoreInfer's prompt chunks observed; None when there is neither (a prompt chunk
        of another method runs the plain path)."""
        if self.fused(spans, num_rows):
            return self._fused_hook()
        methods = self._methods(spans)
        observe: list[Observe] = []
        n = self.model_info.intermediate_size
        for s in spans:
            lo = decode_rows(s)[0]
            if s.plan.method == "coreinfer" and lo > s.start:
                assert self.core is not None
                if s.pos0 == 0:  # the prompt starts (again, after a preemption): a fresh core set
                    self.core.reset(s.plan.core_slot)
                keep = core_size(s.plan.level_index * LEVEL_STEP, n)
                observe.append(Observe(s.plan.core_slot, keep, s.start, lo))
                methods.add("coreinfer")
        return self._hook(methods, observe) if methods else None

    def graph_mode(self, spans: list[RowSpan], num_rows: int) -> str:
        """FUSED for a fused step; the method's name when one method has all the sparse rows (a graph
        with that method's ops only); "" (every method) for a mix."""
        if self.fused(spans, num_rows):
            return FUSED
        methods = self._methods(spans)
        return next(iter(methods)) if len(methods) == 1 else ""

    def graph_hooks(self, mode: str = "") -> PluginHooks:
        if mode == FUSED:
            return PluginHooks(linear=self._fused_hook())
        methods = {mode} if mode else set(self.hooks)
        return PluginHooks(linear=self._hook(methods)) if methods & set(self.hooks) else PluginHooks()

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
