"""The intervention plugin contract, under the name third-party plugins import (docs/architecture.md §6).

It lives in `actserve.server.contract` (below the engine, beside the hook protocols and `ModelInfo`);
this module is its stable public name.
"""

from actserve.server.contract import (
    FusedColumns,
    InterventionCapacityError,
    InterventionError,
    InterventionPlugin,
    ModelInfo,
    ResidualHook,
    RowSpan,
    StepHooks,
    device_table,
)

__all__ = [
    "FusedColumns",
    "InterventionCapacityError",
    "InterventionError",
    "InterventionPlugin",
    "ModelInfo",
    "ResidualHook",
    "RowSpan",
    "StepHooks",
    "device_table",
]
