"""The series the expert cache reports (server/layers/expert_cache.py, expert_zero_copy.py); the engine
exports each as actserve_<name> (docs/api.md, "Metrics")."""

from __future__ import annotations

from actserve.server.layers.telemetry import Series

HITS, MISSES = "moe_expert_cache_hits", "moe_expert_cache_misses"
PREDICTED, USED, CORRECT = "moe_prefetch_predicted", "moe_prefetch_used", "moe_prefetch_correct"
COPY_BYTES, CPU_EXPERTS = "moe_expert_copy_bytes", "moe_cpu_experts"
RESIDENT_BYTES, DISTINCT = "moe_resident_expert_bytes", "moe_step_distinct_experts"
ZERO_COPY_BYTES = "moe_expert_zero_copy_bytes"
SERIES = [
    Series(HITS, "counter", "Experts a MoE layer needed that were resident in its device cache."),
    Series(
        MISSES,
        "counter",
        "Experts a MoE layer needed that were not resident (copied, read from host memory, or run on the "
        "CPU).",
    ),
    Series(
        PREDICTED, "counter", "Experts the prefetcher predicted for a MoE layer (precision = correct / this)."
    ),
    Series(USED, "counter", "Experts used at MoE layers that had a prediction (recall = correct / this)."),
    Series(CORRECT, "counter", "Predicted experts that the layer then used."),
    Series(COPY_BYTES, "counter", "Expert bytes copied host to device (misses, prefetches and refills)."),
    Series(
        ZERO_COPY_BYTES,
        "counter",
        "Expert bytes the kernels read straight from host memory (zero-copy misses; once per expert and "
        "step, more where rows of one step share a missing expert).",
    ),
    Series(
        CPU_EXPERTS, "counter", "Expert computations run on the CPU (one expert at one layer in one step)."
    ),
    Series(RESIDENT_BYTES, "gauge", "Bytes of expert slots on the device (all MoE layers)."),
    Series(
        DISTINCT,
        "histogram",
        "Distinct experts per MoE layer in one step (mean over the layers).",
        (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256),
    ),
]
