"""The bound an offloaded batch-1 decode run is measured against (bench/moe_offload.py), from the expert
cache's counters over its decode steps; no bound where the counters cannot be trusted.

The copy bound is host->device bandwidth / PCIe bytes per token; the bound with copies hidden behind
compute is min(copy bound, the all-resident tok/s). A PCIe byte count of 0 would make the latter the
all-resident speed, which is right only when every lookup really hit. So the counters are checked first:
at batch 1 every decode token routes `top_k` distinct experts at each MoE layer, and each is counted once
as a hit or a miss; a run whose counters saw far fewer lookups lost its statistics (as the H200 run of
issue 15 did: chained decode steps were never counted, every counter read 0), and a run with misses that
were not computed on the CPU but no PCIe bytes is inconsistent. Those get no bound (None) and a note
saying why."""

from __future__ import annotations

from typing import Any

# counted lookups per token below this share of the expected ones: statistics lost (exact at batch 1;
# the margin allows snapshots merged when the device falls behind, which count a union once)
LOOKUP_FLOOR = 0.9


def offload_bound(
    run: dict[str, Any], h2d_bytes_per_s: float, resident_tok_s: float, lookups_per_token: float
) -> dict[str, Any]:
    """`run`: bench `decode()`'s figures (tok_s; per token: lookups, misses, cpu_experts, pcie_bytes;
    absent without counters). `lookups_per_token`: top_k x MoE layers. Returns copy_bound_tok_s,
    copy_bound_frac, bound_tok_s, bound_frac (None where not computed) and bound_note (None, or why)."""
    out: dict[str, Any] = {
        "copy_bound_tok_s": None, "copy_bound_frac": None, "bound_tok_s": None, "bound_frac": None,
        "bound_note": None,
    }  # fmt: skip
    tok_s = run["tok_s"]
    pcie, misses = run.get("pcie_bytes_per_token"), run.get("misses_per_token")
    if pcie is None or misses is None:
        out["bound_note"] = "no expert-cache counters: bound not computed"
        return out
    lookups = run.get("lookups_per_token", 0.0)
    if lookups < LOOKUP_FLOOR * lookups_per_token:
        out["bound_note"] = (
            f"the counters saw {lookups:.2f} expert lookups per token where each token makes "
            f"{lookups_per_token:g} (top_k x MoE layers): statistics lost, bound not computed"
        )
        return out
    moved = misses - run.get("cpu_experts_per_token", 0.0)  # misses not computed on the CPU
    if pcie <= 0 and moved > 0:
        out["bound_note"] = (
            f"{moved:.2f} misses per token not computed on the CPU but no PCIe bytes counted: counters "
            "inconsistent, bound not computed"
        )
        return out
    if pcie > 0:
        copy_bound = h2d_bytes_per_s / pcie
        out.update(copy_bound_tok_s=copy_bound, copy_bound_frac=tok_s / copy_bound)
        bound = min(copy_bound, resident_tok_s)
    else:
        bound = resident_tok_s
        out["bound_note"] = (
            "no PCIe bytes (every lookup hit, or its misses ran on the CPU): the bound is the all-resident "
            "speed"
        )
    out.update(bound_tok_s=bound, bound_frac=tok_s / bound)
    return out
