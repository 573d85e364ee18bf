"""POST /v1/completions: text or token prompts, n choices each, echo, logprobs, SSE streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from actserve.server.api.errors import APIError, as_api_error, error_sse
from actserve.server.api.generation import (
    Choice,
    PlanStream,
    TokenText,
    apply_output,
    build_sequences,
    new_id,
    now,
    run_choices,
    usage,
)
from actserve.server.api.protocol import CompletionRequest
from actserve.server.api.sse import ChunkWriter
from actserve.server.engine.engine_client import EngineClient
from actserve.server.engine.sequence import TokenLogprob


def tokenize_prompts(tokenizer: Any, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return [tokenizer.encode(p) for p in prompt]
    if any(not p for p in prompt):
        raise APIError(400, "prompt: token lists must not be empty", "prompt")
    return [list(p) for p in prompt]


def completion_logprobs(
    entries: list[TokenLogprob | None],
    token_text: TokenText,
    context: list[int],
    offset: int = 0,
    null_first: bool = False,
) -> dict[str, list[Any]]:
    """OpenAI's legacy completions logprobs object for consecutive tokens that follow `context`.

    `text_offset` counts from `offset` (the length of the text already returned before these tokens);
    with `null_first` the first entry is the first prompt token, which has no logprob (null, as OpenAI
    and vLLM return it)."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    ids, pos = list(context), offset
    for k, e in enumerate(entries):
        if e is None:
            continue
        s = token_text(e.token_id, ids)
        tokens.append(s)
        offsets.append(pos)
        if null_first and k == 0:
            lps.append(None)
            tops.append(None)
        else:
            lps.append(e.logprob)
            tops.append({token_text(t, ids): lp for t, lp in e.top} if e.top else None)
        pos += len(s)
        ids.append(e.token_id)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


class CompletionHandler:
    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.token_text = TokenText(self.tokenizer)

    def _logprobs(
        self, req: CompletionRequest, c: Choice, prompt_ids: list[int]
    ) -> dict[str, list[Any]] | None:
        if req.logprobs is None:
            return None
        if not req.echo:
            return completion_logprobs(list(c.logprobs), self.token_text, prompt_ids)
        first = TokenLogprob(prompt_ids[0], float("nan"), [])
        plp = c.prompt_logprobs or [None] * len(prompt_ids)
        entries: list[TokenLogprob | None] = [first, *plp[1:], *c.logprobs]
        return completion_logprobs(entries, self.token_text, [], null_first=True)

    async def __call__(self, req: CompletionRequest, raw: Request) -> Any:
        prompts = tokenize_prompts(self.tokenizer, req.prompt)
        if req.echo and req.logprobs is not None:
            prompt_lp = req.logprobs
        else:
            prompt_lp = None
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: 0 is only allowed with echo=true (prompt scoring)", "max_tokens")
        params = req.sampling_params(req.max_tokens, req.logprobs, prompt_lp)
        rid = new_id("cmpl")
        pairs = await build_sequences(self.engine, rid, prompts, params, req.interventions)
        if req.stream:
            return PlanStream(self._stream(req, rid, prompts, pairs, raw), self.engine, pairs)
        choices = [c for c, _ in pairs]
        async for c, out in run_choices(self.engine, pairs, raw):
            apply_output(c, out)
        body = {
            "id": rid,
            "object": "text_completion",
            "created": now(),
            "model": self.model_name,
            "choices": [self._choice_body(req, c, prompts[c.prompt_index]) for c in choices],
            "usage": usage(choices, prompts),
        }
        return JSONResponse(body)

    def _choice_body(self, req: CompletionRequest, c: Choice, prompt_ids: list[int]) -> dict[str, Any]:
        text = c.text
        if req.echo:
            text = self.tokenizer.decode(prompt_ids, skip_special_tokens=req.skip_special_tokens) + text
        return {
            "index": c.index,
            "text": text,
            "logprobs": self._logprobs(req, c, prompt_ids),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }

    async def _stream(
        self, req: CompletionRequest, rid: str, prompts: list[list[int]], pairs: list[Any], raw: Request
    ) -> AsyncIterator[str]:
        created, choices = now(), [c for c, _ in pairs]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        envelope = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        out_chunks = ChunkWriter(envelope, include_usage)

        sent_echo: set[int] = set()
        lp_offset: dict[int, int] = {}  # per choice: text length the token strings sent so far cover
        try:
            async for c, out in run_choices(self.engine, pairs, raw):
                before = len(c.logprobs)
                apply_output(c, out)
                text = out.text
                lp = None
                pids = prompts[c.prompt_index]
                if req.echo and c.index not in sent_echo:
                    sent_echo.add(c.index)
                    text = self.tokenizer.decode(pids, skip_special_tokens=req.skip_special_tokens) + text
                    if req.logprobs is not None:
                        lp = self._logprobs(req, c, pids)
                elif req.logprobs is not None:
                    context = pids + c.token_ids[:before]
                    offset = lp_offset.get(c.index, 0)
                    lp = completion_logprobs(list(c.logprobs[before:]), self.token_text, context, offset)
                if lp is not None and lp["tokens"]:
                    lp_offset[c.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                if not text and not out.finished and not out.token_ids:
                    continue
                finish = c.finish_reason if out.finished else None
                stop = c.stop_reason if out.finished else None
                if lp is None:
                    yield out_chunks.text(c.index, text, finish, stop)
                    continue
                yield out_chunks.chunk([{
                    "index": c.index, "text": text, "logprobs": lp,
                    "finish_reason": finish, "stop_reason": stop,
                }])  # fmt: skip
            if include_usage:
                yield out_chunks.chunk([], usage(choices, prompts))
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
            err = as_api_error(e)
            yield error_sse(err.status if err else 500, err.message if err else f"internal error: {e}")
        yield "data: [DONE]\n\n"
