"""`sparsity`: activation sparsity per request (issue 14). `{"sparsity": {"method": "teal", "level": 0.5}}`
zeroes, at every decoder projection's input (qkv, o, gate_up, and the down projection's silu(gate)·up),
the entries with |x| below that layer's and projection's threshold, so that a fraction `level` of them
is zero on text like the calibration text (TEAL). Only TEAL is built; CHESS, R-Sparse and CoreInfer are
named in the refusal of an unknown method.

Thresholds: from the model's calibration (artifact.py; `actserve sparsity calibrate`), one resident
table per method, TEAL's [levels 0.00..0.90 by 0.01, layers, projections] float32 on the model's
device. A row's level index travels as a per-row input (-1 = dense), so the hook reads only tensors:
steps mixing levels (and dense rows) are one hook and replay from decode CUDA graphs (`graph_safe`).
Level 0's thresholds are 0 and the comparison is strict, so rows at -1 or 0 keep every bit.

Decode only, as in TEAL: a row is sparse when it holds a generated token (position >= prompt length);
the prompt's rows stay dense. So the prompt's K/V is a plain request's (`prefix_key` is None: sparse and
dense requests share prefix-cache blocks), and the first generated token, predicted from the prompt's
last row, is the dense model's. A step in which none of the plugin's rows is a decode row gets no hook at
all (the plain path, bit for bit on CUDA too, where a one-row down projection fuses silu·mul).

Speed (CUDA): the hook is a `ThresholdHook`. In a *fused* step, one whose rows are all this plugin's
sparse decode rows (at most 16, and their expected union of active inputs at most `MAX_UNION`), it hands
the layers its thresholds and every projection runs the sparse GEMV (kernels/sparse_gemv.py) over a
transposed copy of its weight (`TransposedFormat`, asked for at start with `weight_formats`; option
`kernel`, `--sparsity-kernel off`, leaves it out), which reads only the weight rows of the inputs that
stay active and thresholds and forms silu·mul in its loads. Decode graphs capture that as the plugin's
"fused" graph mode, in which padding rows (-1) read an extra +inf level and so add nothing to the union.
Any other step masks x (`apply`) and runs the plain path: a row of another request (or a prompt row) in
the step would make the union all inputs anyway, and this way it keeps the bits of a server without
the plugin, which the fused kernel's other summation order would not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actserve.interventions.base import (
    PROJECTIONS,
    FormatRequest,
    InterventionError,
    InterventionPlugin,
    LinearInputHook,
    ModelInfo,
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
from actserve.kernels.gemv_ref import MAX_ROWS

log = logging.getLogger(__name__)
LEVEL_STEP = 0.01
MAX_LEVEL = 0.9
NUM_LEVELS = round(MAX_LEVEL / LEVEL_STEP) + 1  # 0.00, 0.01, ..., 0.90
IMPLEMENTED = ("teal",)
PLANNED = ("chess", "r_sparse", "coreinfer")  # issue 14, not built: refused with their own message
INPUT = "sparsity_level"  # per row: the level's index into the method's table, -1 = dense
FUSED = "fused"  # the graph mode of steps whose rows are all sparse rows of this plugin
TRANSPOSED = "transposed"  # the key of the W^T weight copies the sparse GEMV reads
# a step is fused only while its rows' union of active inputs is expected (rows taken as independent)
# to cover at most this fraction of the inputs. H200, one Llama-3-8B layer, one row
# (bench/results/sparse_gemv.json): the sparse GEMV takes ~57 + 81 x active us, the dense GEMV 109 us,
# so it pays below ~0.64 active; at 8 rows of 50% (union ~1) it ran at 0.76x the dense GEMV's speed
MAX_UNION = 0.6


def levels() -> torch.Tensor:
    """float64 [NUM_LEVELS]: the levels the tables hold, 0.00 ... 0.90."""
    return torch.arange(NUM_LEVELS, dtype=torch.float64) * LEVEL_STEP


def level_index(level: float) -> int:
    return round(level / LEVEL_STEP)


class SparsitySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["teal"] = Field(
        description="teal: zero the projection inputs below per-layer thresholds calibrated on the model's "
        "activations (CHESS, R-Sparse and CoreInfer are not built yet)"
    )
    level: float = Field(
        ge=0.0,
        le=MAX_LEVEL,
        allow_inf_nan=False,
        description="target fraction of zero entries at every projection input, 0 to 0.9 in steps of 0.01 "
        "(0: dense); applied to generated tokens, the prompt runs dense",
    )

    @field_validator("level")
    @classmethod
    def _on_grid(cls, v: float) -> float:
        if abs(v / LEVEL_STEP - level_index(v)) > 1e-6:
            raise ValueError(f"level must be a multiple of {LEVEL_STEP} in [0, {MAX_LEVEL}], got {v}")
        return v


@dataclass(frozen=True)
class SparsityPlan:
    method: str
    level_index: int


class TealHook:
    """At every site: x with entries |x| < the row's threshold zeroed (-1 rows read level 0's zeros).

    `padded` (a fused step: every real row is a sparse row of this plugin): the table with one more
    level, +inf, last, which -1 rows (a graph bucket's padding) read; the hook then hands its thresholds
    to the layers (`thresholds`), which run the sparse GEMV where they can."""

    def __init__(
        self, table: torch.Tensor, sites: set[tuple[int, str]], padded: torch.Tensor | None = None
    ) -> None:
        self.table, self._sites, self.padded = table, sites, padded  # [levels, layers, projections]
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
        return x.masked_fill(x.abs() < thr.unsqueeze(1), 0)

    def thresholds(self, layer: int, proj: str, inputs: RowInputs) -> torch.Tensor | None:
        """[rows] float32 (a strided view) in a fused step; None otherwise (the layers call `apply`)."""
        if self.padded is None:
            return None
        return self._thresholds(inputs)[:, layer, PROJECTIONS.index(proj)]


def decode_rows(span: RowSpan) -> tuple[int, int]:
    """The span's packed rows [lo, hi) that hold generated tokens (positions >= prompt_len)."""
    n_prompt = min(span.count, max(0, span.prompt_len - span.pos0))
    return span.start + n_prompt, span.start + span.count


class SparsityPlugin(InterventionPlugin):
    name = "sparsity"
    description = (
        "Activation sparsity at decode (TEAL): zero the smallest entries of every projection input of the "
        "generated tokens, a `level` fraction of them, by thresholds calibrated on the model."
    )
    hook_points = ("linear_input",)
    spec_model = SparsitySpec
    row_inputs = (RowInput(INPUT, torch.int32, 1, -1),)
    graph_safe = True

    def __init__(self, model_info: ModelInfo) -> None:
        super().__init__(model_info)
        self.calibration: SparsityCalibration | None = None
        self.source: Path | None = None
        self.tables: dict[str, torch.Tensor] = {}  # method -> its resident threshold table
        self.padded: dict[str, torch.Tensor] = {}  # method -> its table with a last level of +inf
        self.sites = {(layer, p) for layer in range(model_info.num_layers) for p in PROJECTIONS}
        self.kernel = False  # fused steps run the sparse GEMV (CUDA, option `kernel`)

    def configure(self, options: Mapping[str, Any]) -> None:
        """Option `calibration` (a file from `actserve sparsity calibrate`); without it, the model folder's
        own calibration file when there is one. A given file that does not load stops the server. Option
        `kernel` (default true): on CUDA, W^T copies of the projections for the sparse GEMV."""
        kernel = options.get("kernel", True)
        if not isinstance(kernel, bool):
            raise ValueError(f"sparsity option kernel must be true or false, got {kernel!r}")
        self.kernel = kernel and self.model_info.device.type == "cuda"
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
        table = cal.thresholds(levels()).to(self.model_info.device)
        self.tables = {"teal": table}
        self.padded = {"teal": torch.cat([table, torch.full_like(table[:1], float("inf"))])}

    def weight_formats(self) -> list[FormatRequest]:
        """A W^T copy of every projection for the sparse GEMV, when fused steps can run (the kernel on, a
        calibration loaded); it costs the projections' weight bytes once more."""
        if not (self.kernel and self.tables):
            return []
        return [FormatRequest(TRANSPOSED, frozenset(self.sites), TransposedFormat)]

    def fused(self, spans: list[RowSpan], num_rows: int) -> bool:
        """Whether a step of these rows is fused: the kernel is on and all `num_rows` rows (at most
        MAX_ROWS) are decode rows of these spans, whose union of active inputs, rows taken as independent
        (1 - the product of their levels), stays within MAX_UNION."""
        if not self.kernel or num_rows > MAX_ROWS:
            return False
        rows, dense = 0, 1.0
        for s in spans:
            lo, hi = decode_rows(s)
            rows += hi - lo
            dense *= (s.plan.level_index * LEVEL_STEP) ** (hi - lo)
        return rows == num_rows and 1 - dense <= MAX_UNION

    def parse(self, value: Any, param: str) -> BaseModel:
        """A planned method gets its own refusal (not built yet), before the schema's generic one."""
        method = value.get("method") if isinstance(value, dict) else None
        if isinstance(method, str) and method in PLANNED:
            where = f"{param}.method"
            raise InterventionError(
                f"{where}: method {method!r} is not built yet; implemented: {', '.join(IMPLEMENTED)}", where
            )
        return super().parse(value, param)

    def prepare(self, spec: BaseModel, param: str) -> SparsityPlan | None:
        """The method and level index (the plan); None at level 0, a dense request."""
        assert isinstance(spec, SparsitySpec)
        index = level_index(spec.level)
        if index == 0:
            return None
        if self.model_info.implementation != "native":  # linear-input hooks exist in native models only
            raise InterventionError(f"{param}: sparsity needs the native model implementation", param)
        if self.model_info.is_moe:  # the experts are not projections with linear-input hooks
            raise InterventionError(f"{param}: sparsity of mixture-of-experts models is not built", param)
        if spec.method not in self.tables:
            where = default_path(self.model_info.path)
            raise InterventionError(
                f"{param}: this server has no sparsity calibration for {self.model_info.name}; make one with "
                f"`actserve sparsity calibrate --model {self.model_info.path}` (it writes {where}, loaded at "
                "the next start) or start with --sparsity-calibration FILE",
                param,
            )
        return SparsityPlan(spec.method, index)

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        for s in spans:
            lo, hi = decode_rows(s)
            arrays[INPUT][lo:hi, 0] = s.plan.level_index

    def linear_hook(self, spans: list[RowSpan], num_rows: int) -> LinearInputHook | None:
        """None when no row of these spans is a decode row (a prompt chunk runs the plain path)."""
        if not any(decode_rows(s)[1] > decode_rows(s)[0] for s in spans):
            return None
        return self._hook(self.fused(spans, num_rows))

    def graph_mode(self, spans: list[RowSpan], num_rows: int) -> str:
        return FUSED if self.fused(spans, num_rows) else ""

    def graph_hooks(self, mode: str = "") -> PluginHooks:
        if "teal" not in self.tables:
            return PluginHooks()
        return PluginHooks(linear=self._hook(mode == FUSED))

    def _hook(self, fused: bool) -> TealHook:
        return TealHook(self.tables["teal"], self.sites, self.padded["teal"] if fused else None)

    def prefix_key(self, plan: Any) -> None:
        """None: the prompt runs dense, so its K/V is a plain request's."""
        return None

    def json_schema(self) -> dict[str, Any]:
        """The spec's schema, and under `x-actserve-calibration` the calibration in use (null: none, so
        sparse requests are refused)."""
        schema = super().json_schema()
        cal = self.calibration
        shown: dict[str, Any] | None = None
        if cal is not None:
            shown = {"file": str(self.source), "model": cal.model, "tokens": cal.tokens}
            shown["corrected"] = cal.grid is not None
        schema["x-actserve-calibration"] = shown
        return schema
