"""Shared request plumbing for completions and chat: sequences from prompts, running many choices at
once, cancelling on disconnect, token strings for logprobs, usage."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from actserve.server.api.admission import Reservation
from actserve.server.api.errors import APIError, as_api_error
from actserve.server.engine.engine_client import EngineClient
from actserve.server.engine.outputs import SeqOutput
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence, TokenLogprob


@dataclass
class Choice:
    """Accumulated state of one choice (one engine sequence)."""

    index: int
    prompt_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


async def build_sequences(
    engine: EngineClient,
    request_id: str,
    prompts: list[list[int]],
    params: SamplingParams,
    interventions: dict[str, Any] | None,
) -> list[tuple[Choice, Sequence]]:
    """n sequences per prompt. Everything is validated before any intervention plan takes resources."""
    vocab = engine.model_info.vocab_size
    bad_stop = [t for t in params.stop_token_ids if not 0 <= t < vocab]
    if bad_stop:
        raise APIError(
            400, f"stop_token_ids: ids must be in [0, {vocab - 1}]; got {bad_stop[0]}", "stop_token_ids"
        )
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        raise APIError(
            400,
            f"min_tokens: must not exceed max_tokens ({params.max_tokens}); got {params.min_tokens}",
            "min_tokens",
        )
    max_tokens: list[int] = []  # resolved per prompt (None: up to the context)
    for i, ids in enumerate(prompts):
        try:
            max_tokens.append(engine.check_fits(len(ids), params.max_tokens))
        except Exception as e:
            err = as_api_error(e)
            raise (
                (err or e)
                if len(prompts) == 1 or err is None
                else APIError(400, f"prompt {i}: {err.message}", err.param)
            ) from None
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {vocab - 1}]; got {bad[0]}", "prompt")
    count = len(prompts) * params.n
    plans = await engine.prepare_interventions(interventions, count) if interventions else [{}] * count
    out: list[tuple[Choice, Sequence]] = []
    for i, ids in enumerate(prompts):
        for j in range(params.n):
            seed = None if params.seed is None else params.seed + j
            p = dataclasses.replace(params, seed=seed, max_tokens=max_tokens[i])
            k = i * params.n + j
            seq = Sequence(
                f"{request_id}-{i}-{j}", list(ids), p, [], interventions=dict(plans[k]), count_prompt=j == 0
            )
            out.append((Choice(index=k, prompt_index=i), seq))
    return out


def release_unsubmitted(engine: EngineClient, pairs: list[tuple[Choice, Sequence]]) -> None:
    """Give back the intervention plans of sequences that never reached the engine (the client left
    before its stream started, or a choice's task was cancelled first); the engine releases the others
    when they finish. Without this a steering slot leaked per such request."""
    for _, seq in pairs:
        if not seq.submitted and seq.interventions:
            engine.release_interventions(seq.interventions)
            seq.interventions = {}


class PlanStream(StreamingResponse):
    """An SSE response that owns its request's prepared plans until the stream hands them to the engine:
    Starlette never starts the body iterator when the client is gone before the first send, so its own
    cleanup would never run."""

    def __init__(
        self,
        body: AsyncIterator[str],
        engine: EngineClient,
        pairs: list[tuple[Choice, Sequence]],
        admitted: Reservation,
    ) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.engine, self.pairs, self.admitted = engine, pairs, admitted

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            release_unsubmitted(self.engine, self.pairs)
            self.admitted.close()


async def watch_disconnect(request: Request | None, on_disconnect: Callable[[], None]) -> None:
    """Call `on_disconnect` when the client hangs up (a non-streamed request has no other way to notice).

    The handler has read the whole body by now, so the next ASGI message is `http.disconnect`, delivered
    the moment the server sees the connection close: waiting on it notices at once. Polling
    `is_disconnected()` every 0.25 s let a short request (480 tokens take 0.4 s in process mode) run to
    its end after its client had gone. A server that answers with anything else is polled instead."""
    while request is not None:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return
        await asyncio.sleep(0.25)


async def run_choices(
    engine: EngineClient,
    pairs: list[tuple[Choice, Sequence]],
    request: Request | None,
    admitted: Reservation | None = None,
) -> AsyncIterator[tuple[Choice, SeqOutput]]:
    """Merge the deltas of all choices as they arrive; stop everything if the client disconnects.
    A choice's first delta means its sequence left the engine's queue: its admission share goes back."""
    if len(pairs) == 1:  # the common case: no task and queue hop per delta
        choice, seq = pairs[0]
        gone = asyncio.CancelledError("client disconnected")
        watcher = asyncio.create_task(watch_disconnect(request, lambda: engine.interrupt(seq.seq_id, gone)))
        try:
            async for out in engine.generate(seq):
                if admitted is not None:
                    admitted.started(choice.index)
                yield choice, out
        finally:
            watcher.cancel()
            release_unsubmitted(engine, pairs)
            if admitted is not None:
                admitted.close()
        return
    queue: asyncio.Queue[tuple[Choice, SeqOutput] | BaseException | None] = asyncio.Queue()

    async def pump(choice: Choice, seq: Sequence) -> None:
        try:
            async for out in engine.generate(seq):
                await queue.put((choice, out))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put(e)
            return
        await queue.put(None)

    tasks = [asyncio.create_task(pump(c, s)) for c, s in pairs]
    stop = asyncio.CancelledError("client disconnected")
    watcher = asyncio.create_task(watch_disconnect(request, lambda: queue.put_nowait(stop)))
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                if admitted is not None:
                    admitted.started(item[0].index)
                yield item
    finally:
        watcher.cancel()
        for t in tasks:
            t.cancel()
        release_unsubmitted(engine, pairs)
        if admitted is not None:
            admitted.close()


def apply_output(choice: Choice, out: SeqOutput) -> None:
    choice.text += out.text
    choice.token_ids += out.token_ids
    choice.logprobs += out.logprobs
    choice.num_prompt_tokens = out.num_prompt_tokens
    choice.num_cached_tokens = out.num_cached_tokens
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs = out.prompt_logprobs
    if out.finished:
        choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason


def usage(choices: list[Choice], prompts: list[list[int]]) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: per prompt, the prompt tokens the
    prefix cache supplied (the least over its n choices, which share the prompt), summed."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(c.token_ids) for c in choices)
    cached: dict[int, int] = {}
    for c in choices:
        cached[c.prompt_index] = min(cached.get(c.prompt_index, c.num_cached_tokens), c.num_cached_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
    }


class TokenText:
    """Text of one token as logprob entries show it: the text it adds after the tokens before it.

    Decoding a token alone is wrong for SentencePiece vocabularies, whose decoder drops the leading
    space of the first piece ("\u2581and" alone is "and", after "run" it is " and"); decoding it after
    a few tokens of context gives the text it really adds, so the token strings of a completion spell
    its text, as OpenAI's do. Special tokens keep their text (they are shown, not skipped).

    With `skip_special=True` the call instead gives what the token adds to text decoded with
    skip_special_tokens, which is what the returned `text` is: "" for a special token, and e.g. no
    leading space for the first word after a skipped BOS. `text_offset`s advance by this."""

    CONTEXT = 4  # tokens of context; enough for SentencePiece spaces and multi-byte characters

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._special = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self._single = lru_cache(maxsize=65536)(
            lambda i, skip: tokenizer.decode([i], skip_special_tokens=skip)
        )
        self._context = lru_cache(maxsize=4096)(
            lambda ids, skip: tokenizer.decode(list(ids), skip_special_tokens=skip)
        )

    def __call__(
        self, token_id: int, context: list[int] | tuple[int, ...] = (), skip_special: bool = False
    ) -> str:
        if skip_special and token_id in self._special:
            return ""
        ctx = tuple(context[-self.CONTEXT :])
        if not ctx:
            return self._single(token_id, skip_special)
        before = self._context(ctx, skip_special)
        after = self._tokenizer.decode([*ctx, token_id], skip_special_tokens=skip_special)
        if after.startswith(before) and not before.endswith("\ufffd"):
            return after[len(before) :]
        return self._single(token_id, skip_special)  # a split multi-byte character: the bare token


def now() -> int:
    return int(time.time())
