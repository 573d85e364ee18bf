"""POST /v1/completions: text or token prompts, n choices each, echo, logprobs, SSE streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from actserve.server.api.admission import Reservation
from actserve.server.api.errors import APIError, as_api_error, error_sse
from actserve.server.api.generation import (
    Choice,
    PlanStream,
    TokenText,
    apply_output,
    now,
    run_choices,
    usage,
)
from actserve.server.api.protocol import CompletionRequest
from actserve.server.api.request_id import request_ids
from actserve.server.api.sse import ChunkWriter
from actserve.server.api.structured import constrained_sequences
from actserve.server.api.tokens import PromptEncoder
from actserve.server.engine.engine_client import EngineClient
from actserve.server.engine.sequence import TokenLogprob


async def tokenize_prompts(encoder: PromptEncoder, prompt: Any) -> list[list[int]]:
    """Token ids of each prompt; text that cannot fit the context is refused before tokenizing."""
    if isinstance(prompt, str):
        return [await encoder.encode(prompt)]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return [await encoder.encode(p, "prompt" if len(prompt) == 1 else f"prompt[{i}]")
                for i, p in enumerate(prompt)]  # fmt: skip
    if any(not p for p in prompt):
        raise APIError(400, "prompt: token lists must not be empty", "prompt")
    return [list(p) for p in prompt]


def completion_logprobs(
    entries: list[TokenLogprob | None],
    token_text: TokenText,
    context: list[int],
    offset: int = 0,
    null_first: bool = False,
    skip_special: bool = True,
) -> tuple[dict[str, list[Any]], int]:
    """OpenAI's legacy completions logprobs object for consecutive tokens that follow `context`, and
    the text position after them.

    `tokens[i]` is the token's own text, special tokens included (`<|start_story|>` is shown even when
    the returned text leaves it out), so every token of the prompt and output is listed. `text_offset[i]`
    is the index in the returned `text` where token i's text begins, counted from `offset` (the length
    of the text returned before these tokens). Offsets advance by what each token adds to that text:
    with `skip_special` (the request's skip_special_tokens) a special token adds nothing, so its offset
    equals the next token's. Wherever a token's text is part of the returned text,
    `text[text_offset[i]:].startswith(tokens[i])`. With `null_first` the first entry is the first
    prompt token, which has no logprob (null, as OpenAI and vLLM return it)."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    ids, pos = list(context), offset
    for k, e in enumerate(entries):
        if e is None:
            continue
        tokens.append(token_text(e.token_id, ids))
        offsets.append(pos)
        if null_first and k == 0:
            lps.append(None)
            tops.append(None)
        else:
            lps.append(e.logprob)
            tops.append({token_text(t, ids): lp for t, lp in e.top} if e.top else None)
        pos += len(token_text(e.token_id, ids, skip_special))
        ids.append(e.token_id)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, pos


class CompletionHandler:
    def __init__(self, engine: EngineClient, model_name: str, encoder: PromptEncoder) -> None:
        self.engine, self.model_name, self.encoder = engine, model_name, encoder
        self.tokenizer = engine.tokenizer
        self.token_text = TokenText(self.tokenizer)

    def _logprobs(
        self, req: CompletionRequest, c: Choice, prompt_ids: list[int]
    ) -> tuple[dict[str, list[Any]], int] | None:
        if req.logprobs is None:
            return None
        sst = req.skip_special_tokens
        if not req.echo:
            return completion_logprobs(list(c.logprobs), self.token_text, prompt_ids, skip_special=sst)
        first = TokenLogprob(prompt_ids[0], float("nan"), [])
        plp = c.prompt_logprobs or [None] * len(prompt_ids)
        entries: list[TokenLogprob | None] = [first, *plp[1:], *c.logprobs]
        return completion_logprobs(entries, self.token_text, [], null_first=True, skip_special=sst)

    async def __call__(self, req: CompletionRequest, raw: Request, admitted: Reservation) -> Any:
        """Answer one admitted request; `admitted` is given back when the request ends (a stream takes
        it over and gives it back when it ends)."""
        streaming = False
        try:
            if req.max_tokens == 0 and not req.echo:
                raise APIError(
                    400, "max_tokens: 0 is only allowed with echo=true (prompt scoring)", "max_tokens"
                )
            prompts = await tokenize_prompts(self.encoder, req.prompt)
            prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
            params = req.sampling_params(req.max_tokens, req.logprobs, prompt_lp)
            rid, seq_prefix = request_ids(raw, "cmpl")
            pairs = await constrained_sequences(self.engine, seq_prefix, prompts, params, req)
            if req.stream:
                streaming = True
                stream = self._stream(req, rid, prompts, pairs, raw, admitted)
                return PlanStream(stream, self.engine, pairs, admitted)
            choices = [c for c, _ in pairs]
            async for c, out in run_choices(self.engine, pairs, raw, admitted):
                apply_output(c, out)
        finally:
            if not streaming:
                admitted.close()
        body = {
            "id": rid,
            "object": "text_completion",
            "created": now(),
            "model": req.model or self.model_name,
            "choices": [self._choice_body(req, c, prompts[c.prompt_index]) for c in choices],
            "usage": usage(choices, prompts),
        }
        return JSONResponse(body)

    def _choice_body(self, req: CompletionRequest, c: Choice, prompt_ids: list[int]) -> dict[str, Any]:
        text = c.text
        if req.echo:
            text = self.tokenizer.decode(prompt_ids, skip_special_tokens=req.skip_special_tokens) + text
        lp = self._logprobs(req, c, prompt_ids)
        return {
            "index": c.index,
            "text": text,
            "logprobs": lp[0] if lp else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }

    async def _stream(
        self,
        req: CompletionRequest,
        rid: str,
        prompts: list[list[int]],
        pairs: list[Any],
        raw: Request,
        admitted: Reservation,
    ) -> AsyncIterator[str]:
        created, choices = now(), [c for c, _ in pairs]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        model = req.model or self.model_name  # the alias the request used, else the first name
        envelope = {"id": rid, "object": "text_completion", "created": created, "model": model}
        out_chunks = ChunkWriter(envelope, include_usage)

        sent_echo: set[int] = set()
        lp_offset: dict[int, int] = {}  # per choice: text length the token strings sent so far cover
        try:
            async for c, out in run_choices(self.engine, pairs, raw, admitted):
                before = len(c.logprobs)
                apply_output(c, out)
                text = out.text
                lp_end = None
                pids = prompts[c.prompt_index]
                if req.echo and c.index not in sent_echo:
                    sent_echo.add(c.index)
                    text = self.tokenizer.decode(pids, skip_special_tokens=req.skip_special_tokens) + text
                    if req.logprobs is not None:
                        lp_end = self._logprobs(req, c, pids)
                elif req.logprobs is not None:
                    context = pids + c.token_ids[:before]
                    offset = lp_offset.get(c.index, 0)
                    lp_end = completion_logprobs(
                        list(c.logprobs[before:]), self.token_text, context, offset, False,
                        req.skip_special_tokens,
                    )  # fmt: skip
                lp = None
                if lp_end is not None:
                    lp, lp_offset[c.index] = lp_end
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
