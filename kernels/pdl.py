"""Programmatic dependent launch (Hopper+): a kernel may start while the one before it finishes.

Every decode-step kernel is launched with the PDL attribute and calls `pdl_sync` before it reads
anything a previous kernel wrote (griddepcontrol.wait: the previous grid has completed and its writes
are visible) and then lets the next kernel launch early (griddepcontrol.launch_dependents). Weight
loads, which no kernel writes, may be issued before the wait: that is where the gain is, the next
GEMV streaming weights while the previous kernel drains. Measured on the H200 (bench/results/
pdl_ab.json): batch-1 graph step 4.38 -> 4.31 ms, but batch 8 4.67 -> 4.90 ms, so the default
(ACTSERVE_PDL=single) uses it for one-row launches only; ACTSERVE_PDL=1 everywhere, 0 never. Off on the
CPU, under the Triton interpreter and below compute capability 9, and within `pdl_suspended()` (a CUDA
graph whose kernels share the device with a side stream: the main stream's next kernel, launched early,
holds the queue ahead of the side stream's; measured in bench/results/kv_retrieval_speed_side_stream_ab.json).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch
import triton
import triton.language as tl


@functools.cache
def pdl_mode(device_index: int = 0) -> str:
    """ "all", "single" (one-row launches only) or "off"."""
    mode = os.environ.get("ACTSERVE_PDL", "single")
    if os.environ.get("TRITON_INTERPRET") == "1" or mode == "0":
        return "off"
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability(device_index)[0] >= 9):
        return "off"
    return "all" if mode == "1" else "single"


_local = threading.local()


@contextlib.contextmanager
def pdl_suspended() -> Iterator[None]:
    """Kernels launched (or captured) by this thread within the block go without PDL."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth


def pdl_args(t: torch.Tensor) -> dict[str, bool]:
    """Launch keywords for a kernel whose rows are `t`'s first dimension: the USE_PDL constexpr and
    Triton's launch flag."""
    mode = pdl_mode(t.device.index or 0) if t.is_cuda and not getattr(_local, "depth", 0) else "off"
    on = mode == "all" or (mode == "single" and t.shape[0] == 1)
    return {"USE_PDL": on, "launch_pdl": on}


@triton.jit
def pdl_sync(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
