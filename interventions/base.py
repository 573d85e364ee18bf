"""The intervention plugin contract, under the name third-party plugins import (docs/architecture.md §6).

It lives in `actserve.server.contract` (below the engine, beside the hook protocols and `ModelInfo`);
this module is its stable public name.
"""

from actserve.server.contract import (
    PROJECTIONS,
    AttentionHook,
    BoundHooks,
    FormatRequest,
    FusedColumns,
    InterventionCapacityError,
    InterventionError,
    InterventionPlugin,
    LinearInputHook,
    LinearSite,
    LinearWeightsHook,
    LogitsHook,
    ModelInfo,
    MoEHook,
    PluginHooks,
    ResidualHook,
    RowInput,
    RowInputs,
    RowSpan,
    Shard,
    StepHooks,
    WeightFormat,
    copy_rows,
    device_table,
)

__all__ = [
    "AttentionHook",
    "BoundHooks",
    "copy_rows",
    "device_table",
    "FormatRequest",
    "FusedColumns",
    "InterventionCapacityError",
    "InterventionError",
    "InterventionPlugin",
    "LinearInputHook",
    "LinearSite",
    "LinearWeightsHook",
    "LogitsHook",
    "ModelInfo",
    "MoEHook",
    "PluginHooks",
    "PROJECTIONS",
    "ResidualHook",
    "RowInput",
    "RowInputs",
    "RowSpan",
    "Shard",
    "StepHooks",
    "WeightFormat",
]
