"""The messages between the API process and the engine-core process (`--engine-process on`), one
dataclass per kind (frozen, slotted: small pickles), dispatched on type at both ends.

API -> core: Add, Abort, Call, Prepare, Release, Stop.
Core -> API: Ready or Failed once; then Outputs once per step (every sequence's delta in one message),
Beat when nothing else was sent for a heartbeat interval (idle, or busy in a call), SeqFailed, Reply,
Dead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actserve.server.contract import ModelInfo
from actserve.server.engine.outputs import SeqOutput
from actserve.server.engine.sequence import Sequence

PackedError = tuple[Any, ...]  # engine_client.pack_error: an exception that survives pickling


# -- API -> core --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Add:
    seq: Sequence


@dataclass(frozen=True, slots=True)
class Abort:
    seq_id: str


@dataclass(frozen=True, slots=True)
class Call:
    """fn(engine, *args) between steps; answered by a Reply with the same call_id."""

    call_id: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Prepare:
    """`count` plan sets for one `interventions` spec, kept in the core; the Reply holds references."""

    call_id: int
    spec: dict[str, Any] | None
    count: int


@dataclass(frozen=True, slots=True)
class Release:
    plan_ids: list[int]


@dataclass(frozen=True, slots=True)
class Stop:
    pass


ToCore = Add | Abort | Call | Prepare | Release | Stop


# -- core -> API --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready:
    """What the API process keeps locally (no round trip per request)."""

    model_name: str
    model_info: ModelInfo
    tokenizer: Any
    max_model_len: int
    interventions: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Failed:
    """The model did not load."""

    error: PackedError


@dataclass(frozen=True, slots=True)
class Outputs:
    outputs: list[SeqOutput]
    num_waiting: int


@dataclass(frozen=True, slots=True)
class Beat:
    num_waiting: int


@dataclass(frozen=True, slots=True)
class SeqFailed:
    """Adding this sequence failed; only its request gets the error."""

    seq_id: str
    error: PackedError


@dataclass(frozen=True, slots=True)
class Reply:
    call_id: int
    ok: bool
    value: Any  # the result, or a PackedError when not ok


@dataclass(frozen=True, slots=True)
class Dead:
    """The core's loop failed (a fatal device error): the process exits."""

    error: PackedError


FromCore = Ready | Failed | Outputs | Beat | SeqFailed | Reply | Dead
