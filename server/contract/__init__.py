"""What interventions and the model layers share, below the engine (docs/architecture.md §1).

Plugins depend on this package (and on actserve.kernels), never on the engine, the API, the models or
the layers; the layers take their hook protocols and the weight-format base from here. It imports
nothing else from actserve.server (import-linter contracts in pyproject.toml).
"""

from actserve.server.contract.fp4_format import FP4Format
from actserve.server.contract.hooks import (
    PROJECTIONS,
    AttentionHook,
    BoundHooks,
    LinearCall,
    LinearInputHook,
    LinearOutputHook,
    LinearSite,
    LinearWeightsHook,
    LogitsHook,
    MoEHook,
    PluginHooks,
    QueryHook,
    ResidualHook,
    RowInput,
    RowInputs,
    StepHooks,
    ThresholdHook,
)
from actserve.server.contract.kv_space import KVResidency, KVSpace, KVTier
from actserve.server.contract.model_info import ModelInfo, MoEInfo
from actserve.server.contract.plugin import (
    FusedColumns,
    InterventionCapacityError,
    InterventionError,
    InterventionPlugin,
    Observation,
    PluginHistogram,
    RowSpan,
    device_table,
)
from actserve.server.contract.transposed_format import TransposedFormat
from actserve.server.contract.weights import (
    FormatRequest,
    Shard,
    WeightFormat,
    copy_rows,
)

__all__ = [
    "AttentionHook",
    "BoundHooks",
    "copy_rows",
    "device_table",
    "FormatRequest",
    "FP4Format",
    "FusedColumns",
    "InterventionCapacityError",
    "InterventionError",
    "InterventionPlugin",
    "KVResidency",
    "KVSpace",
    "KVTier",
    "LinearCall",
    "LinearInputHook",
    "LinearOutputHook",
    "LinearSite",
    "LinearWeightsHook",
    "LogitsHook",
    "ModelInfo",
    "MoEHook",
    "Observation",
    "PluginHistogram",
    "MoEInfo",
    "PluginHooks",
    "PROJECTIONS",
    "QueryHook",
    "ResidualHook",
    "RowInput",
    "RowInputs",
    "RowSpan",
    "Shard",
    "StepHooks",
    "ThresholdHook",
    "TransposedFormat",
    "WeightFormat",
]
