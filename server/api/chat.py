"""POST /v1/chat/completions: the model's chat template, then the same engine path as completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from actserve.server.api.admission import Reservation
from actserve.server.api.errors import APIError, as_api_error, error_sse
from actserve.server.api.generation import (
    PlanStream,
    TokenText,
    apply_output,
    now,
    run_choices,
    usage,
)
from actserve.server.api.protocol import ChatCompletionRequest, ChatMessage
from actserve.server.api.request_id import request_ids
from actserve.server.api.sse import ChunkWriter
from actserve.server.api.structured import constrained_sequences
from actserve.server.api.tokens import INLINE_CHARS, PromptEncoder
from actserve.server.engine.engine_client import EngineClient
from actserve.server.engine.sequence import TokenLogprob


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Plain dicts for the template; list content (OpenAI's text parts) is joined into a string."""
    out = []
    for m in messages:
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            parts = []
            for part in m.content:
                if part.get("type") != "text":
                    raise APIError(
                        400, f"messages: content part type {part.get('type')!r} is not supported", "messages"
                    )
                parts.append(str(part.get("text", "")))
            d["content"] = "".join(parts)
        out.append(d)
    return out


def render_chat_text(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool = True,
                     continue_final: bool = False, kwargs: dict[str, Any] | None = None) -> str:  # fmt: skip
    """The chat template applied to the messages; template errors are the caller's input (400)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    try:
        return tokenizer.apply_chat_template(
            message_dicts(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final,
            continue_final_message=continue_final,
            **(kwargs or {}),
        )
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - template errors are the caller's input
        raise APIError(400, f"messages: chat template failed: {e}", "messages") from None


def _content_chars(messages: list[ChatMessage]) -> int:
    return sum(len(m.content) if isinstance(m.content, str) else len(str(m.content or "")) for m in messages)


async def render_chat(encoder: PromptEncoder, messages: list[ChatMessage], add_generation_prompt: bool = True,
                      continue_final: bool = False, kwargs: dict[str, Any] | None = None,
                      bounded: bool = True) -> list[int]:  # fmt: skip
    """Token ids of the rendered conversation. Large conversations render and tokenize in a worker
    thread; with `bounded`, a rendering whose length alone exceeds the context is refused untokenized."""
    args = (encoder.tokenizer, messages, add_generation_prompt, continue_final, kwargs)
    if _content_chars(messages) > INLINE_CHARS:
        text = await run_in_threadpool(render_chat_text, *args)
    else:
        text = render_chat_text(*args)
    if bounded:
        encoder.check_length(text, "messages")
    return await encoder.encode_unbounded(text, add_special_tokens=False)


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText, context: list[int]) -> dict[str, Any]:
    """OpenAI's chat logprobs for consecutive tokens that follow `context` (prompt + earlier output)."""
    ids = list(context)

    def item(t: int, lp: float) -> dict[str, Any]:
        s = token_text(t, ids)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    content = []
    for e in entries:
        content.append({**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]})
        ids.append(e.token_id)
    return {"content": content}


class ChatHandler:
    def __init__(self, engine: EngineClient, model_name: str, encoder: PromptEncoder) -> None:
        self.engine, self.model_name, self.encoder = engine, model_name, encoder
        self.tokenizer = engine.tokenizer
        self.token_text = TokenText(self.tokenizer)

    async def __call__(self, req: ChatCompletionRequest, raw: Request, admitted: Reservation) -> Any:
        """Answer one admitted request; `admitted` is given back when the request ends (a stream takes
        it over and gives it back when it ends)."""
        streaming = False
        try:
            ids = await render_chat(
                self.encoder,
                req.messages,
                req.add_generation_prompt,
                req.continue_final_message,
                req.chat_template_kwargs,
            )
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            params = req.sampling_params(req.max_completion_tokens or req.max_tokens, logprobs, None)
            rid, seq_prefix = request_ids(raw, "chatcmpl")
            pairs = await constrained_sequences(self.engine, seq_prefix, [ids], params, req)
            if req.stream:
                streaming = True
                stream = self._stream(req, rid, [ids], pairs, raw, admitted)
                return PlanStream(stream, self.engine, pairs, admitted)
            return await self._complete(req, rid, ids, pairs, raw, admitted)
        finally:
            if not streaming:
                admitted.close()

    async def _complete(self, req: ChatCompletionRequest, rid: str, ids: list[int], pairs: list[Any],
                        raw: Request, admitted: Reservation) -> JSONResponse:  # fmt: skip
        choices = [c for c, _ in pairs]
        async for c, out in run_choices(self.engine, pairs, raw, admitted):
            apply_output(c, out)
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": now(),
            "model": req.model or self.model_name,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c.logprobs, self.token_text, ids) if req.logprobs else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for c in choices
            ],
            "usage": usage(choices, [ids]),
        }
        return JSONResponse(body)

    async def _stream(
        self,
        req: ChatCompletionRequest,
        rid: str,
        prompts: list[list[int]],
        pairs: list[Any],
        raw: Request,
        admitted: Reservation,
    ) -> AsyncIterator[str]:
        created, choices = now(), [c for c, _ in pairs]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        kind = "chat.completion.chunk"
        envelope = {"id": rid, "object": kind, "created": created, "model": req.model or self.model_name}
        writer = ChunkWriter(envelope, include_usage)
        chunk = writer.chunk

        try:
            for c in choices:
                role = {"role": "assistant", "content": ""}
                yield chunk([{"index": c.index, "delta": role, "logprobs": None, "finish_reason": None}])
            lp_sent: dict[int, int] = {}  # per choice: tokens whose logprobs went out already
            async for c, out in run_choices(self.engine, pairs, raw, admitted):
                apply_output(c, out)
                if not out.text and not out.finished:
                    continue  # text held back (a stop string may follow): its logprobs go with the next chunk
                finish = c.finish_reason if out.finished else None
                stop = c.stop_reason if out.finished else None
                if not req.logprobs:
                    yield writer.delta(c.index, out.text, finish, stop)
                    continue
                before = lp_sent.get(c.index, 0)
                lp_sent[c.index] = len(c.logprobs)
                context = prompts[c.prompt_index] + c.token_ids[:before]
                lp = chat_logprobs(c.logprobs[before:], self.token_text, context)
                delta = {"content": out.text} if out.text else {}
                yield chunk([{
                    "index": c.index, "delta": delta, "logprobs": lp,
                    "finish_reason": finish, "stop_reason": stop,
                }])  # fmt: skip
            if include_usage:
                yield chunk([], usage(choices, prompts))
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
            err = as_api_error(e)
            yield error_sse(err.status if err else 500, err.message if err else f"internal error: {e}")
        yield "data: [DONE]\n\n"
