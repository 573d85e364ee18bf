"""Host -> device copies of experts for the expert cache (server/layers/expert_cache.py), behind one small
interface so the cache's ordering logic is the same, and tested, on the CPU.

The protocol of a layer call: `begin()` orders the copies that follow after everything the compute stream
has queued so far (the kernels that still read a slot about to be overwritten); `copy(dst, src)` queues
one copy; `mark()` returns a handle for the point after the copies queued so far; `wait(handle)` makes the
compute stream wait for that point before its next kernel; `done(handle)` says, without waiting, whether
the copies before it have landed. The cache keeps one handle per slot whose copy is pending and waits for
exactly the handles of the slots a kernel is about to read (eager steps), or publishes a slot only once
its handle is done (zero-copy steps, which never wait).

`SyncCopier` (CPU, or CUDA without overlap) copies at once; its handles are already reached. `StreamCopier`
(CUDA) copies on a side stream with CUDA events as handles, so a prefetch overlaps the layers before it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


class SyncCopier:
    """Copies at once on the calling thread's stream: every handle is already reached."""

    def __init__(self) -> None:
        self.copies = 0
        self.waits = 0

    def begin(self) -> None:
        """Nothing to order: copies run in program order."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)
        self.copies += 1

    def mark(self) -> Any:
        return self.copies

    def wait(self, handle: Any) -> None:
        self.waits += 1

    def done(self, handle: Any) -> bool:
        return True


class StreamCopier:
    """Copies on a side CUDA stream from pinned host memory; handles are CUDA events on it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.copies = 0
        self.waits = 0

    def begin(self) -> None:
        """The side stream waits for the compute stream's current point: kernels queued before it may
        still read the slots the next copies overwrite."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        self.copies += 1

    def mark(self) -> Any:
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def wait(self, handle: Any) -> None:
        torch.cuda.current_stream(self.device).wait_event(handle)
        self.waits += 1

    def done(self, handle: Any) -> bool:
        return bool(handle.query())


def make_copier(device: torch.device) -> SyncCopier | StreamCopier:
    return StreamCopier(device) if device.type == "cuda" else SyncCopier()


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host tensor, page-locked when `pin` (CUDA), so copies from it are asynchronous DMA. Pinned by
    registering ordinary memory (cudaHostRegister) rather than torch's pinned allocator, which rounds
    every block up to a power of two (a 1.9 GB layer of Mixtral experts would take 2 GiB); falls back to
    `pin_memory()` where registering fails."""
    t = torch.empty(shape, dtype=dtype)
    if not pin or t.numel() == 0:
        return t
    try:
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) != 0:
            raise RuntimeError("cudaHostRegister failed")
        # unregistered before the memory goes back to the host allocator (a later engine in the process
        # may get the same pages)
        weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
        return t
    except Exception:  # noqa: BLE001 - any failure: the allocator's pinned memory instead
        return t.pin_memory()
