"""Is the engine making progress? The engine (thread or core process) reports each finished step and,
while idle, a heartbeat; this module keeps the time of the last report and says when it is too old.

A stopped (SIGSTOP) or deadlocked engine reports nothing and burns no CPU. A long CPU prefill also
reports nothing until its step ends, but keeps a core busy: on a CPU device the engine's CPU time counts
as progress too, so such a step is not mistaken for a stall. On CUDA it does not (a hung kernel keeps the
host spinning in its wait), and no healthy CUDA step comes near the timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import psutil

log = logging.getLogger(__name__)

BUSY_SHARE = 0.1  # CPU seconds per wall second above which a CPU engine counts as working


def heartbeat_interval(stall_timeout: float) -> float:
    """How often an idle engine reports: often enough that a few late beats never look like a stall."""
    return max(0.05, min(1.0, stall_timeout / 4))


def thread_cpu_clock(thread: threading.Thread) -> Callable[[], float] | None:
    """CPU seconds used by `thread` so far (None where the platform cannot say)."""
    if thread.ident is None or not hasattr(time, "pthread_getcpuclockid"):
        return None
    clock = time.pthread_getcpuclockid(thread.ident)

    def seconds() -> float:
        try:
            return time.clock_gettime(clock)
        except OSError:  # the thread is gone
            return 0.0

    return seconds


def process_cpu_clock(pid: int) -> Callable[[], float]:
    """CPU seconds (user + system) used by process `pid` so far; 0 once it is gone."""
    proc = psutil.Process(pid)

    def seconds() -> float:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            return 0.0
        return t.user + t.system

    return seconds


class Progress:
    """The last sign of life of an engine; thread-safe (one float written, read anywhere)."""

    def __init__(self, timeout: float, cpu_seconds: Callable[[], float] | None = None) -> None:
        self.timeout = timeout
        self.last = time.monotonic()
        self._cpu_seconds = cpu_seconds
        self._cpu = cpu_seconds() if cpu_seconds else 0.0
        self._polled = self.last
        self._exempt = 0

    def beat(self) -> None:
        self.last = time.monotonic()

    @contextlib.contextmanager
    def exempt(self) -> Iterator[None]:
        """A call the engine runs between steps (training a vector can take minutes) is progress while it
        lasts; its caller bounds it."""
        self._exempt += 1
        try:
            yield
        finally:
            self._exempt -= 1
            self.beat()

    def poll(self) -> None:
        """Called periodically: counts CPU time the engine burnt since the last poll, or a running exempt
        call, as progress."""
        now = time.monotonic()
        if self._exempt:
            self.last = now
        if self._cpu_seconds is not None:
            cpu = self._cpu_seconds()
            if cpu - self._cpu >= BUSY_SHARE * (now - self._polled):
                self.last = now
            self._cpu = cpu
        self._polled = now

    def silent_for(self) -> float:
        return time.monotonic() - self.last

    def stalled(self) -> str | None:
        """Why the engine counts as stalled, or None."""
        silent = self.silent_for()
        if silent <= self.timeout:
            return None
        return f"engine stalled: no progress for {silent:.0f} s (--engine-stall-timeout {self.timeout:g})"


def exit_with_parent(parent: int, poll_s: float = 0.5, what: str = "engine core") -> None:
    """A thread that ends this process once `parent` (the server's pid, passed at spawn: it may already
    be gone by the time this runs) is no longer its parent. A SIGKILLed server never stops the core in
    order, and while the model loads nobody reads the pipe, so its EOF would go unseen until then (the
    same holds for a tensor-parallel worker and the rank 0 that spawned it)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("the process that started this one (pid %d) is gone: %s exiting", parent, what)
        os._exit(0)

    threading.Thread(target=watch, name="actserve-core-parent-watch", daemon=True).start()
