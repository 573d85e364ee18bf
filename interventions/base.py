"""The intervention plugin contract, under the name third-party plugins import (docs/architecture.md §6).

It lives in `actserve.server.contract` (below the engine, beside the hook protocols and `ModelInfo`);
this module is its stable public name.
"""

from actserve.server.contract import (
    PROJECTIONS,
    FusedColumns,
    InterventionCapacityError,
    InterventionError,
    InterventionPlugin,
    LinearInput,
    LinearInputHook,
    LogitsHook,
    ModelInfo,
    ResidualHook,
    RowInput,
    RowInputs,
    RowSpan,
    StepHooks,
    device_table,
)

__all__ = [
    "FusedColumns",
    "InterventionCapacityError",
    "InterventionError",
    "InterventionPlugin",
    "LinearInput",
    "LinearInputHook",
    "LogitsHook",
    "ModelInfo",
    "PROJECTIONS",
    "ResidualHook",
    "RowInput",
    "RowInputs",
    "RowSpan",
    "StepHooks",
    "device_table",
]
