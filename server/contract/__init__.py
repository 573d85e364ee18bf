"""What interventions and the model layers share, below the engine (docs/architecture.md §1).

Plugins depend on this package (and on actserve.kernels), never on the engine, the API, the models or
the layers; the layers take their hook protocols from here. It imports nothing else from actserve.server
(import-linter contracts in pyproject.toml).
"""

from actserve.server.contract.hooks import (
    PROJECTIONS,
    LinearInput,
    LinearInputHook,
    LogitsHook,
    ResidualHook,
    RowInput,
    RowInputs,
    StepHooks,
)
from actserve.server.contract.model_info import ModelInfo
from actserve.server.contract.plugin import (
    FusedColumns,
    InterventionCapacityError,
    InterventionError,
    InterventionPlugin,
    RowSpan,
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
