"""The `actserve serve` process around uvicorn: graceful drain on SIGTERM / SIGINT, and exit codes.

uvicorn already does the drain's core on a signal: it closes the listening socket (new connections are
refused), closes idle keep-alive connections, lets every connection with a response in progress finish
(a stream ends when its generator does), then runs the app's shutdown (which stops the engine), and
after `timeout_graceful_shutdown` cancels what is left. This adds what an inference server needs on top:

- requests that still reach the app (already-open connections) get 503 "server is shutting down", and
  so does `/health`;
- after `--shutdown-timeout` seconds, the requests still generating are aborted with a clear 503 (a
  stream gets an error event and [DONE]) rather than cut mid-stream, and their sequences are freed;
  uvicorn's own timeout, a few seconds later, only backs this up;
- the process exits 0 after a signal (uvicorn re-raises the signal once done, which would kill the
  process with it), 1 when the engine died (a killed core), 3 when the model failed to load: a
  supervisor restarts the server; the engine core is not restarted in-process.

The engine core ignores SIGTERM (the group's signal reaches it too) and is stopped in order by the app's
shutdown, after the drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn

from actserve.server.api.app import ServerState
from actserve.server.api.errors import APIError

log = logging.getLogger(__name__)
BACKSTOP_S = 5.0  # uvicorn cancels what is left this long after our own shutdown deadline


class ActServer(uvicorn.Server):
    """uvicorn's server with the lifecycle above; `exit_code` is what the process should exit with."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        config.timeout_graceful_shutdown = int(shutdown_timeout + BACKSTOP_S)
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self.exit_code = 0
        state.fatal = self.fail

    def fail(self, code: int, why: str) -> None:
        """Stop because this server can never serve again (any thread). Ignored once it is stopping
        anyway: a load cut short by a SIGTERM is no failure."""
        if self.should_exit:
            return
        log.critical("%s; exiting with code %d", why, code)
        print(f"actserve: error: {why}", file=sys.stderr, flush=True)
        self.exit_code = code
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True  # before uvicorn's first tick: no request gets in after the signal
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.state.draining = True
        engine = self.state.engine
        busy = engine.num_streams() if engine is not None else 0
        log.info("shutting down: %d request(s) in flight, up to %g s to finish", busy, self.shutdown_timeout)
        deadline = asyncio.get_running_loop().call_later(self.shutdown_timeout, self._abort_remaining)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _abort_remaining(self) -> None:
        engine = self.state.engine
        if engine is None:
            return
        limit = self.shutdown_timeout
        why = f"server is shutting down: request aborted after the {limit:g} s shutdown timeout"
        n = engine.interrupt_all(APIError(503, why))
        if n:
            log.warning("shutdown timeout: aborted %d request(s) still generating", n)


def run(state: ServerState, config: uvicorn.Config, shutdown_timeout: float) -> int:
    """Serve until a signal or a fatal error; the process's exit code."""
    server = ActServer(config, state, shutdown_timeout)
    # uvicorn restores the handlers it found once it is done and re-raises the signals it caught: with
    # these no-op handlers that re-raise ends nothing, and the process exits with our code
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return server.exit_code
