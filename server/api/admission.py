"""Admission control (`--max-waiting`): how many sequences may wait for the engine at once.

The count is kept here, on the API side, and covers a sequence from the moment its request is admitted
until its first output arrives (it has been scheduled and prefilled) or its request ends. Reading the
engine's own waiting queue instead let a burst through: a streamed request submits its sequences only
once its response starts, so 200 concurrent streams all saw an empty queue and were all accepted.
Everything here runs on the event loop, so the counter needs no lock."""

from __future__ import annotations

from actserve.server.api.errors import APIError


class Admission:
    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.pending = 0  # admitted sequences that have not produced output yet

    def reserve(self, count: int, param: str) -> Reservation:
        """Admit `count` sequences or refuse: a request that could never fit is a 400 (retrying cannot
        help), one that does not fit now is a 429 (with Retry-After, see errors.error_response)."""
        if count > self.max_waiting:
            raise APIError(
                400,
                f"{param}: the request asks for {count} sequences (prompts x n); this server queues at "
                f"most {self.max_waiting} (--max-waiting)",
                param,
            )
        if self.pending + count > self.max_waiting:
            waiting, limit = self.pending, self.max_waiting
            raise APIError(
                429, f"server overloaded: {waiting} sequences already waiting (limit {limit}); retry later"
            )
        self.pending += count
        return Reservation(self, count)


class Reservation:
    """One request's share of the waiting count; each sequence gives its part back once, at its first
    output (`started`) or when the request ends (`close`, idempotent)."""

    def __init__(self, admission: Admission, count: int) -> None:
        self._admission, self._left = admission, count
        self._started: set[int] = set()

    def started(self, index: int) -> None:
        if index not in self._started and self._left > 0:
            self._started.add(index)
            self._give_back(1)

    def close(self) -> None:
        self._give_back(self._left)

    def _give_back(self, count: int) -> None:
        self._left -= count
        self._admission.pending -= count
